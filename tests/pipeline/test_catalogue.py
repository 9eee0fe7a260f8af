"""Catalogue-scale embedding: parts + manifest equal the in-memory embedding, resume after a kill
(in process, and a SIGKILL at a fixed part), refuse another plan or another checkpoint's content
(not its path or mtime), CUDA device set before the first collective, 2 gloo ranks, eval on the
parts; k-means backends; embed -> catalogue -> (encode, embedding_files), never back."""
import ast
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch.multiprocessing as mp

from courier_fast.pipeline import cluster
import courier_fast.pipeline.catalogue as catalogue_module
from courier_fast.pipeline.catalogue import embed_catalogue
from courier_fast.pipeline.embed import embed, embed_checkpoint
from courier_fast.pipeline.embeddings import ItemEmbeddings
from courier_fast.pipeline.evaluate import evaluate
from courier_fast.training.loop import TrainConfig, train

pytestmark = pytest.mark.usefixtures("one_thread")
BACKENDS = ["sklearn"] + (["faiss"] if cluster.faiss_available() else [])


@pytest.fixture(scope="module")
def checkpoint(world, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("run"))
    return train(TrainConfig(data=world, out=out, encoder="test_efficientnet", embed_dim=16, batch_size=8,
                             steps=2, progress=False))["checkpoint"]


@pytest.fixture(scope="module")
def in_memory(world, checkpoint):
    return embed_checkpoint(checkpoint, world, clusters=0, batch_size=16, device="cpu")


def _by_id(emb):
    order = np.argsort(emb.item_ids)
    return emb.item_ids[order], emb.vectors[order], None if emb.cluster_ids is None else emb.cluster_ids[order]


def test_parts_equal_the_in_memory_embedding(world, checkpoint, in_memory, tmp_path):
    out = str(tmp_path / "emb")
    manifest = embed_catalogue(checkpoint, world, out, clusters=4, batch_size=5, device="cpu", chunk_size=16,
                               kmeans="sklearn")
    assert manifest["items"] == 60 and manifest["dim"] == 16 and len(manifest["parts"]) == 4  # 16+16+16+12
    assert manifest["clusters"] == 4 and manifest["kmeans"] == "sklearn"
    assert sorted(os.listdir(os.path.join(out, "parts"))) == [f"part-{c:06d}.parquet" for c in range(4)]
    got = ItemEmbeddings.load(out)
    ids, vec, clusters = _by_id(got)
    ref_ids, ref_vec, _ = _by_id(in_memory)
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_allclose(vec, ref_vec, rtol=1e-4, atol=1e-5)
    from safetensors.numpy import load_file
    centres = load_file(os.path.join(out, "centroids.safetensors"))["centroids"]
    np.testing.assert_array_equal(clusters, cluster.assign(vec, centres))
    assert len(set(clusters.tolist())) > 1
    some = ids[[3, 17, 40]]
    part = ItemEmbeddings.load(out, item_ids=some)
    assert sorted(part.item_ids.tolist()) == sorted(some.tolist())


def _dying_encoder(monkeypatch):
    """Make catalogue's encoding loop raise KeyboardInterrupt on the third chunk (a kill while
    encoding chunk 2); -> the list of chunk calls (extend it to 3 entries to stop the dying)."""
    real, chunks = catalogue_module.encoded_batches, []

    def dies_on_third_chunk(encoder, items, rows, *a, **k):
        chunks.append(len(chunks))
        if len(chunks) == 3:
            raise KeyboardInterrupt
        return real(encoder, items, rows, *a, **k)

    monkeypatch.setattr(catalogue_module, "encoded_batches", dies_on_third_chunk)
    return chunks


def _interrupted(world, checkpoint, out, monkeypatch):
    """`out` holding emb-000000 and emb-000001 of a run killed while encoding chunk 2 (of 4)."""
    chunks = _dying_encoder(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        embed_catalogue(checkpoint, world, out, clusters=3, device="cpu", chunk_size=16, kmeans="sklearn")
    assert sorted(os.listdir(os.path.join(out, "parts"))) == ["emb-000000.parquet", "emb-000001.parquet"]
    chunks.clear()
    chunks.extend([None] * 3)  # no more dying
    return chunks


def test_resume_reuses_finished_parts(world, checkpoint, tmp_path, monkeypatch):
    ref_out = str(tmp_path / "reference")
    embed_catalogue(checkpoint, world, ref_out, clusters=3, device="cpu", chunk_size=16, kmeans="sklearn")
    out = str(tmp_path / "emb")
    chunks = _interrupted(world, checkpoint, out, monkeypatch)
    with pytest.raises(ValueError, match="unfinished"):
        ItemEmbeddings.load(out)
    embed_catalogue(checkpoint, world, out, clusters=3, device="cpu", chunk_size=16, kmeans="sklearn")
    assert len(chunks) == 3 + 2  # only chunks 2 and 3 were encoded again
    ref, got = _by_id(ItemEmbeddings.load(ref_out)), _by_id(ItemEmbeddings.load(out))
    np.testing.assert_array_equal(got[0], ref[0])
    np.testing.assert_allclose(got[1], ref[1], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(got[2], ref[2])
    assert not any(n.startswith("emb-") for n in os.listdir(os.path.join(out, "parts")))


def test_another_plan_is_refused(world, checkpoint, tmp_path):
    out = str(tmp_path / "emb")
    embed_catalogue(checkpoint, world, out, clusters=0, device="cpu", chunk_size=16)
    with pytest.raises(ValueError, match="another embedding run .*chunk_size"):
        embed_catalogue(checkpoint, world, out, clusters=0, device="cpu", chunk_size=8)
    again = embed_catalogue(checkpoint, world, out, clusters=0, device="cpu", chunk_size=16)  # finished: a no-op
    assert again["items"] == 60


def _sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def test_resume_knows_the_checkpoint_by_its_content(world, checkpoint, tmp_path, monkeypatch):
    """The same bytes at another path with another mtime resume; other bytes are refused, naming both."""
    out = str(tmp_path / "emb")
    chunks = _interrupted(world, checkpoint, out, monkeypatch)
    moved = str(tmp_path / "moved" / "checkpoint.pt")
    os.makedirs(os.path.dirname(moved))
    shutil.copyfile(checkpoint, moved)
    os.utime(moved, ns=(os.stat(checkpoint).st_mtime_ns + 10**9,) * 2)
    import torch
    ckpt = torch.load(checkpoint, weights_only=True)
    name = next(k for k in ckpt["model"] if k.startswith("encoder.") and ckpt["model"][k].is_floating_point())
    ckpt["model"][name] = ckpt["model"][name] + 1
    other = str(tmp_path / "other.pt")
    torch.save(ckpt, other)
    with pytest.raises(ValueError) as info:
        embed_catalogue(other, world, out, clusters=3, device="cpu", chunk_size=16, kmeans="sklearn")
    for word in (os.path.abspath(checkpoint), _sha256(checkpoint), other, _sha256(other)):
        assert word in str(info.value)
    assert chunks == [None] * 3  # refused before encoding anything
    manifest = embed_catalogue(moved, world, out, clusters=3, device="cpu", chunk_size=16, kmeans="sklearn")
    assert len(chunks) == 3 + 2  # chunks 0 and 1 reused
    assert manifest["checkpoint_sha256"] == _sha256(checkpoint)
    assert all(catalogue_module.part_checkpoint(os.path.join(out, p)) == _sha256(checkpoint) for p in manifest["parts"])


def test_a_part_of_another_checkpoint_is_refused(world, checkpoint, tmp_path, monkeypatch):
    """A part file whose metadata names another checkpoint (copied in from another run) is not reused."""
    import pyarrow.parquet as pq
    out = str(tmp_path / "emb")
    _interrupted(world, checkpoint, out, monkeypatch)
    part = os.path.join(out, "parts", "emb-000001.parquet")
    t = pq.read_table(part)
    pq.write_table(t.replace_schema_metadata({b"courier_fast.checkpoint_sha256": b"0" * 64}), part)
    with pytest.raises(ValueError, match=f"{part} was embedded with a checkpoint of sha256 0{{64}}, not with "
                                         f".*{_sha256(checkpoint)}"):
        embed_catalogue(checkpoint, world, out, clusters=3, device="cpu", chunk_size=16, kmeans="sklearn")


class _Recorded(Exception):
    pass


def test_cuda_device_is_set_before_the_first_collective(world, checkpoint, tmp_path, monkeypatch):
    """Under torchrun on GPUs (LOCAL_RANK 1 of 2): torch.cuda.set_device(cuda:1) comes before the
    process group is joined and before its first collective (recorded with stand-ins; CPU only)."""
    import torch
    import torch.distributed as dist

    import courier_fast.training.loop as training_module
    calls = []
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.append(("set_device", torch.device(d))))
    monkeypatch.setattr(dist, "is_initialized", lambda: False)

    def init_process_group(backend, *a, **k):
        calls.append(("init_process_group", backend))

    def collective(name):
        def record(*a, **k):
            calls.append((name,))
            raise _Recorded
        return record

    monkeypatch.setattr(dist, "init_process_group", init_process_group)
    monkeypatch.setattr(dist, "get_rank", lambda *a: 1)
    monkeypatch.setattr(dist, "get_world_size", lambda *a: 2)
    for name in ("broadcast_object_list", "barrier", "all_gather_object", "broadcast", "all_reduce"):
        monkeypatch.setattr(dist, name, collective(name))
    assert training_module.dist is dist
    with pytest.raises(_Recorded):
        embed_catalogue(checkpoint, world, str(tmp_path / "emb"), clusters=0, device="cuda", chunk_size=16)
    assert calls[:2] == [("set_device", torch.device("cuda", 1)), ("init_process_group", "nccl")]
    assert len(calls) == 3 and len(calls[2]) == 1  # then the first collective, and nothing ran before it


def test_imports_go_one_way():
    """Within pipeline/: embed -> catalogue -> (encode, embeddings): no module below imports one
    above it, not even inside a function (tests/test_layers.py checks the layers between packages)."""
    import courier_fast.pipeline

    root = os.path.dirname(courier_fast.pipeline.__file__)
    above = {"catalogue": {"courier_fast.pipeline.embed"},
             "encode": {"courier_fast.pipeline.embed", "courier_fast.pipeline.catalogue", "courier_fast.pipeline.embeddings"},
             "embeddings": {"courier_fast.pipeline.embed", "courier_fast.pipeline.catalogue", "courier_fast.pipeline.encode"}}
    for module, forbidden in above.items():
        with open(os.path.join(root, f"{module}.py")) as f:
            tree = ast.parse(f.read())
        imported = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module:
                imported |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
            elif isinstance(node, ast.Import):
                imported |= {a.name for a in node.names}
        assert not imported & forbidden, (module, imported & forbidden)


def test_file_output_assembles_and_removes_parts(world, checkpoint, in_memory, tmp_path):
    path = tmp_path / "emb.safetensors"
    emb = embed(checkpoint, world, str(path), clusters=0, device="cpu", chunk_size=7)
    assert os.listdir(tmp_path) == ["emb.safetensors"]
    np.testing.assert_allclose(_by_id(emb)[1], _by_id(in_memory)[1], rtol=1e-4, atol=1e-5)


def test_eval_reads_the_parts_directory(world, checkpoint, tmp_path):
    out = str(tmp_path / "emb")
    embed(checkpoint, world, out, clusters=4, device="cpu", chunk_size=16, kmeans="sklearn")
    file = str(tmp_path / "emb.parquet")
    ItemEmbeddings.load(out).save(file)
    a, b = evaluate(world, out), evaluate(world, file)
    # the file is re-normalised on load: features ~1e-7 apart, through a fitted CTR model whose
    # AUC on this tiny world moves by one swapped pair (~1e-3) for such a change
    assert a.keys() == b.keys() and a["train_rows"] == b["train_rows"] and a["test_rows"] == b["test_rows"]
    assert all(a[k] == pytest.approx(b[k], rel=1e-4, abs=2e-3) for k in ("auc", "gauc", "logloss"))


# ----------------------------------------------------------------------------- a real kill
def _cli(world, checkpoint, out):
    return [sys.executable, "-m", "courier_fast", "embed", "--checkpoint", checkpoint, "--data", world, "--out", out,
            "--clusters", "3", "--kmeans", "sklearn", "--chunk-size", "4", "--batch-size", "1", "--device", "cpu",
            "--no-progress"]


# the CLI in a process that SIGKILLs itself right after writing a given part file (no hook in the package:
# the test wraps catalogue's write_table from outside)
_KILL_AFTER = """
import os, signal, sys
import courier_fast.pipeline.catalogue as catalogue
from courier_fast.cli import main
real, last = catalogue.write_table, sys.argv.pop(1)
def write_table(table, path):
    real(table, path)
    if os.path.basename(path) == last:
        os.kill(os.getpid(), signal.SIGKILL)
catalogue.write_table = write_table
sys.exit(main(sys.argv[1:]))
"""


def test_resume_after_sigkill_equals_uninterrupted(world, checkpoint, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ref_out = str(tmp_path / "reference")
    embed_catalogue(checkpoint, world, ref_out, clusters=3, batch_size=1, device="cpu", chunk_size=4, kmeans="sklearn")
    out = str(tmp_path / "killed")
    cli = _cli(world, checkpoint, out)
    killed = subprocess.run([sys.executable, "-c", _KILL_AFTER, "emb-000002.parquet", *cli[3:]], env=env,
                            capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert sorted(os.listdir(os.path.join(out, "parts"))) == [f"emb-{c:06d}.parquet" for c in range(3)]
    assert not os.path.exists(os.path.join(out, "manifest.json"))
    done = subprocess.run(cli, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    ref, got = _by_id(ItemEmbeddings.load(ref_out)), _by_id(ItemEmbeddings.load(out))
    np.testing.assert_array_equal(got[0], ref[0])
    np.testing.assert_allclose(got[1], ref[1], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(got[2], ref[2])


# ----------------------------------------------------------------------------- 2 gloo ranks
def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _embed_rank(rank, port, world, checkpoint, out):
    import torch
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank))
    import torch.distributed as dist
    manifest = embed_catalogue(checkpoint, world, out, clusters=3, device="cpu", chunk_size=16, kmeans="sklearn")
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(manifest, f)
    # a file output: the same parts under <file>.parts, assembled by rank 0 alone
    got = embed(checkpoint, world, os.path.join(out, "all.parquet"), clusters=3, device="cpu", chunk_size=16,
                kmeans="sklearn")
    assert (got is None) == (rank != 0)
    dist.destroy_process_group()


@pytest.mark.distributed
def test_two_ranks_share_the_parts(world, checkpoint, tmp_path):
    out = str(tmp_path / "emb")
    one = str(tmp_path / "one")
    mp.spawn(_embed_rank, args=(_free_port(), world, checkpoint, out), nprocs=2)
    m0, m1 = (json.load(open(os.path.join(out, f"rank{r}.json"))) for r in range(2))
    assert m0 == m1 and m0["world_size"] == 2 and len(m0["parts"]) == 4
    embed_catalogue(checkpoint, world, one, clusters=3, device="cpu", chunk_size=16, kmeans="sklearn")
    b = _by_id(ItemEmbeddings.load(one))
    for got in (ItemEmbeddings.load(out), ItemEmbeddings.load(os.path.join(out, "all.parquet"))):
        a = _by_id(got)
        np.testing.assert_array_equal(a[0], b[0])
        np.testing.assert_allclose(a[1], b[1], rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(a[2], b[2])
    assert not os.path.exists(os.path.join(out, "all.parquet.parts"))


# ----------------------------------------------------------------------------- k-means
@pytest.mark.parametrize("backend", BACKENDS)
def test_kmeans_separates_blobs_and_is_seeded(backend):
    rng = np.random.default_rng()
    centres = rng.normal(size=(3, 8)) * 5
    labels = rng.integers(0, 3, 300)
    labels[:3] = [0, 1, 2]
    x = (centres[labels] + 0.1 * rng.normal(size=(300, 8))).astype(np.float32)
    fitted = cluster.fit_centroids(x, 3, seed=5, backend=backend)
    got = cluster.assign(x, fitted)
    for k in range(3):  # one cluster per blob
        assert len(set(got[labels == k].tolist())) == 1
    assert len(set(got.tolist())) == 3
    np.testing.assert_array_equal(cluster.fit_centroids(x, 3, seed=5, backend=backend), fitted)


def test_kmeans_backend_choice_and_sample():
    assert cluster.resolve_backend("auto") == ("faiss" if cluster.faiss_available() else "sklearn")
    with pytest.raises(ValueError, match="kmeans backend"):
        cluster.resolve_backend("gpu")
    rows = cluster.sample(10_000, 4, seed=1)
    assert len(rows) == 4 * cluster.SAMPLE_PER_CENTRE and np.all(np.diff(rows) > 0)
    np.testing.assert_array_equal(rows, cluster.sample(10_000, 4, seed=1))
    np.testing.assert_array_equal(cluster.sample(50, 4), np.arange(50))
    with pytest.raises(ValueError, match="non-empty"):
        cluster.fit_centroids(np.zeros((0, 3)), 2)
