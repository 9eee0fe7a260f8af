"""Catalogue-scale embedding: stream the items, shard them over torchrun ranks, resume.

embed_catalogue(checkpoint, data, out) embeds every item of data/items.parquet (images read
lazily, data/images.py) into the directory `out` (the table format: embedding_files.py):

    plan.json                  what is embedded (the checkpoint's sha256 and path, data, item
                               count and id digest, chunk size, clusters, seed); a rerun with
                               another plan is refused (the checkpoint path may differ: its
                               content is what counts)
    parts/part-000012.parquet  chunk 12 of the items in id order: item_id int64, embedding
                               fixed_size_list<float32>[d] (unit norm), cluster_id int64 (-1 when
                               clusters=0); the checkpoint's sha256 in the parquet metadata
    centroids.safetensors      the k-means centres (k, d) float32
    manifest.json              written last, by rank 0: {"format", "items", "dim", "parts",
                               "clusters", "kmeans", "chunk_size", "world_size", "checkpoint",
                               "checkpoint_sha256", "data"}

Chunk c (`chunk_size` items) belongs to rank c mod W (W = WORLD_SIZE; under torchrun the ranks
join a process group: gloo on CPU, NCCL on GPUs, each rank on cuda:LOCAL_RANK, set before the
first collective; `out` must be a directory every rank sees). The checkpoint file's sha256 is
read once per run (rank 0, sent to the others). Phases, each skipped for what is already on disk,
so a killed run started again continues: encode (rank r writes parts/emb-c.parquet atomically),
fit centres (rank 0, on a seeded sample of every part: cluster.py), assign (rank r rewrites its
parts as part-c.parquet), manifest. A part already on disk is reused only when its metadata holds
this run's checkpoint sha256.
"""
import hashlib
import json
import os

import numpy as np
import pyarrow.parquet as pq
import torch
import torch.distributed as dist

from courier_fast.pipeline import cluster
from courier_fast.data.format import atomic_path, write_table
from courier_fast.pipeline.embeddings import FORMAT, embedding_table, part_checkpoint, table_columns
from courier_fast.pipeline.embeddings import is_parts_dir, load_parts  # noqa: F401  (catalogue.load_parts, as before)
from courier_fast.pipeline.encode import encoded_batches, resolve_device

CHUNK_SIZE = 16384


def _part(out, c, stage):
    return os.path.join(out, "parts", f"{stage}-{c:06d}.parquet")


def _write_json(obj, path):
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        json.dump(obj, f, indent=2)


def _read_vectors(path):
    return table_columns(pq.read_table(path))


def _barrier(world):
    if world > 1:
        dist.barrier()


def file_sha256(path, block=1 << 20):
    """The sha256 hex digest of a file, read `block` bytes at a time."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(block), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _checkpoint_sha256(checkpoint, rank, world):
    """The checkpoint's sha256, read once per run: by rank 0, broadcast to the other ranks."""
    digest = [file_sha256(checkpoint) if rank == 0 else None]
    if world > 1:
        dist.broadcast_object_list(digest, src=0)
    return digest[0]


def _plan(checkpoint, checkpoint_sha256, data, ids, chunk_size, clusters, seed):
    return {"checkpoint": os.path.abspath(checkpoint), "checkpoint_sha256": checkpoint_sha256,
            "data": os.path.abspath(data), "items": int(len(ids)),
            "item_ids_sha1": hashlib.sha1(np.ascontiguousarray(ids, np.int64).tobytes()).hexdigest(),
            "chunk_size": int(chunk_size), "clusters": int(clusters), "seed": int(seed)}


_WHERE_ONLY = ("checkpoint",)  # the checkpoint's path: the same content elsewhere is the same run


def _check_plan(out, plan):
    """Whether `out` holds a plan.json; a different one is a ValueError naming what differs."""
    path = os.path.join(out, "plan.json")
    if not os.path.exists(path):
        return False
    with open(path) as f:
        old = json.load(f)
    if old.get("checkpoint_sha256") != plan["checkpoint_sha256"]:
        raise ValueError(f"out: {out} holds parts embedded with checkpoint {old.get('checkpoint')} (sha256 "
                         f"{old.get('checkpoint_sha256') or 'not recorded'}), not with {plan['checkpoint']} (sha256 "
                         f"{plan['checkpoint_sha256']}); use a new --out or delete that directory")
    differ = sorted(k for k in set(old) | set(plan) if k not in _WHERE_ONLY and old.get(k) != plan.get(k))
    if differ:
        raise ValueError(f"out: {out} holds another embedding run (it differs in {', '.join(differ)}); "
                         f"use a new --out or delete that directory")
    return True


def _check_parts(out, chunks, plan):
    """Every part of `chunks` already on disk must come from this run's checkpoint."""
    for c in chunks:
        for stage in ("emb", "part"):
            path = _part(out, c, stage)
            if os.path.exists(path) and part_checkpoint(path) != plan["checkpoint_sha256"]:
                raise ValueError(f"out: {path} was embedded with a checkpoint of sha256 "
                                 f"{part_checkpoint(path) or 'not recorded'}, "
                                 f"not with {plan['checkpoint']} (sha256 {plan['checkpoint_sha256']}); use a new "
                                 f"--out or delete that directory")


def _place(device):
    """The device string of this rank: "cuda" -> cuda:LOCAL_RANK. A CUDA device is made current
    here, before any process group exists: NCCL collectives run on the current device."""
    dev = resolve_device(device)
    if dev == "cuda":
        dev = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    if torch.device(dev).type == "cuda":
        torch.cuda.set_device(torch.device(dev))
    return dev


def embed_catalogue(checkpoint, data, out, clusters=32, batch_size=256, device="auto", seed=0,
                    chunk_size=CHUNK_SIZE, kmeans="auto", progress=False):
    """Embed every item of `data` into the directory `out` (see the module docstring), resuming
    what a previous run of the same plan left; -> the manifest dict (on every rank)."""
    from courier_fast.models.checkpoint import load_encoder
    from courier_fast.data import read_items
    from courier_fast.ops.distributed import setup_distributed

    if clusters < 0 or batch_size <= 0 or chunk_size <= 0:
        raise ValueError("clusters must be >= 0, batch_size and chunk_size > 0")
    kmeans = cluster.resolve_backend(kmeans) if clusters else None
    if not os.path.isfile(checkpoint):
        raise FileNotFoundError(f"checkpoint: {checkpoint} does not exist")
    parent = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(parent):
        raise FileNotFoundError(f"out: directory {parent} does not exist")
    items = read_items(os.path.join(data, "items.parquet"))  # validates (and checks image files) first
    dev = _place(device)
    rank, world = setup_distributed(torch.device(dev).type)
    order = np.argsort(items.column("item_id").to_numpy(), kind="stable")
    ids = items.column("item_id").to_numpy()[order]
    plan = _plan(checkpoint, _checkpoint_sha256(checkpoint, rank, world), data, ids, chunk_size, clusters, seed)
    sha = plan["checkpoint_sha256"]
    n_chunks = -(-len(ids) // chunk_size)
    manifest_path = os.path.join(out, "manifest.json")
    if rank == 0:
        os.makedirs(os.path.join(out, "parts"), exist_ok=True)
        if not _check_plan(out, plan):
            _write_json(plan, os.path.join(out, "plan.json"))
    _barrier(world)
    if rank != 0:
        _check_plan(out, plan)
    if os.path.exists(manifest_path):
        with open(manifest_path) as f:
            return json.load(f)

    mine = [c for c in range(rank, n_chunks, world)]
    _check_parts(out, mine, plan)
    todo = [c for c in mine if not (os.path.exists(_part(out, c, "part")) or os.path.exists(_part(out, c, "emb")))]
    if todo:
        encoder, image_size = load_encoder(checkpoint)
        encoder = encoder.to(dev)
        bar = None
        if progress and rank == 0:
            from tqdm.auto import tqdm
            done_items = sum(min(chunk_size, len(ids) - c * chunk_size) for c in mine if c not in todo)
            bar = tqdm(total=sum(min(chunk_size, len(ids) - c * chunk_size) for c in mine), initial=done_items,
                       desc=f"embed (rank 0 of {world})", unit="item", dynamic_ncols=True)
        for c in todo:
            rows = order[c * chunk_size:(c + 1) * chunk_size]
            got = list(encoded_batches(encoder, items, rows, image_size, batch_size, dev))
            vec = np.concatenate([v for _, v in got])
            vec /= np.maximum(np.linalg.norm(vec, axis=1, keepdims=True), 1e-12)
            write_table(embedding_table(ids[c * chunk_size:c * chunk_size + len(rows)], vec,
                                        np.full(len(rows), -1, np.int64), sha), _part(out, c, "emb"))
            if bar is not None:
                bar.update(len(rows))
        if bar is not None:
            bar.close()
    del items
    _barrier(world)

    centres_path = os.path.join(out, "centroids.safetensors")
    if clusters:
        from safetensors.numpy import load_file, save_file
        if rank == 0 and not os.path.exists(centres_path):
            centres = cluster.fit_centroids(_sample_vectors(out, n_chunks, chunk_size, len(ids), clusters, seed),
                                            clusters, seed, kmeans)
            with atomic_path(centres_path) as tmp:
                save_file({"centroids": centres}, tmp)
        _barrier(world)
        centres = load_file(centres_path)["centroids"]
        for c in mine:
            if not os.path.exists(_part(out, c, "part")):
                part_ids, vec, _ = _read_vectors(_part(out, c, "emb"))
                write_table(embedding_table(part_ids, vec, cluster.assign(vec, centres), sha), _part(out, c, "part"))
            if os.path.exists(_part(out, c, "emb")):
                os.remove(_part(out, c, "emb"))
    else:
        for c in mine:
            if os.path.exists(_part(out, c, "emb")):
                os.replace(_part(out, c, "emb"), _part(out, c, "part"))
    _barrier(world)
    if rank == 0:
        dim = pq.read_schema(_part(out, 0, "part")).field("embedding").type.list_size
        _write_json({"format": FORMAT, "items": int(len(ids)), "dim": int(dim),
                     "parts": [os.path.relpath(_part(out, c, "part"), out) for c in range(n_chunks)],
                     "clusters": int(len(centres)) if clusters else 0, "kmeans": kmeans, "chunk_size": int(chunk_size),
                     "world_size": world, "checkpoint": plan["checkpoint"], "checkpoint_sha256": sha,
                     "data": plan["data"]}, manifest_path)
    _barrier(world)
    with open(manifest_path) as f:
        return json.load(f)


def _sample_vectors(out, n_chunks, chunk_size, n, k, seed):
    """The rows cluster.sample() picks, read chunk by chunk from the emb- (or part-) files."""
    rows = cluster.sample(n, k, seed)
    picked = []
    for c in range(n_chunks):
        lo, hi = np.searchsorted(rows, [c * chunk_size, (c + 1) * chunk_size])
        if hi > lo:
            path = _part(out, c, "emb") if os.path.exists(_part(out, c, "emb")) else _part(out, c, "part")
            picked.append(_read_vectors(path)[1][rows[lo:hi] - c * chunk_size])
    return np.concatenate(picked)
