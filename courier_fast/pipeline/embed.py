"""Item embeddings and the features COURIER feeds a CTR model (`courier-fast embed`).

ItemEmbeddings holds, for every item of items.parquet: item_ids (n,) int64, vectors (n, d)
float32 with unit L2 norm, and cluster_ids (n,) int64 from k-means over those vectors
(faiss when installed, else scikit-learn: cluster.py). Saved as .safetensors or .parquet
(atomically), or as a directory of parts with a manifest (catalogue.py: streamed, sharded over
torchrun ranks, resumable); load() reads all three. simscore() gives the paper's
SimScore features: the cosine between a shown item's image and each history image.

Imports go one way: embed -> catalogue -> (encode, embedding_files); encode.py holds the
decode + encode loop (encoded_batches, resolve_device, also importable from here) and
embedding_files.py the table format both write.
"""
import os

import numpy as np

from courier_fast.pipeline.catalogue import embed_catalogue
from courier_fast.data.format import atomic_path, write_table
from courier_fast.pipeline.embeddings import embedding_table, is_parts_dir, load_parts, table_columns
from courier_fast.pipeline.encode import encoded_batches, resolve_device

SUFFIXES = (".safetensors", ".parquet")


def check_out_path(path):
    """An embedding file path: a known suffix and an existing directory (checked before any work)."""
    path = str(path)
    if not path.endswith(SUFFIXES):
        raise ValueError(f"out must end with one of {SUFFIXES}, got {path!r}")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"out: directory {folder} does not exist")
    return path


class ItemEmbeddings:
    def __init__(self, item_ids, vectors, cluster_ids=None):
        item_ids = np.asarray(item_ids, dtype=np.int64)
        vectors = np.asarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or vectors.shape[0] != item_ids.shape[0]:
            raise ValueError(f"vectors must be (n, d) with n = len(item_ids) = {len(item_ids)}, got {vectors.shape}")
        if not np.isfinite(vectors).all():
            raise ValueError("vectors contain NaN or Inf")
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        self.item_ids, self.vectors = item_ids, vectors / np.maximum(norms, 1e-12)
        self.cluster_ids = None if cluster_ids is None else np.asarray(cluster_ids, dtype=np.int64)
        self._order = np.argsort(item_ids)

    def __len__(self):
        return len(self.item_ids)

    def rows(self, ids):
        """Row of each id (any shape); -1 for ids < 0 (padding). Unknown ids raise KeyError."""
        ids = np.asarray(ids, dtype=np.int64)
        pos = np.searchsorted(self.item_ids[self._order], ids.clip(min=0))
        pos = pos.clip(max=len(self.item_ids) - 1)
        rows = self._order[pos]
        bad = (ids >= 0) & (self.item_ids[rows] != ids)
        if bad.any():
            raise KeyError(f"item id {int(ids[bad][0])} has no embedding")
        return np.where(ids >= 0, rows, -1)

    def with_clusters(self, k, seed=0, backend="auto"):
        """A copy with cluster_ids from k-means (k clusters) over the vectors: fitted on a
        sample of at most 256 k of them, every vector then assigned (courier_fast.pipeline.cluster)."""
        from courier_fast.pipeline import cluster

        rows = cluster.sample(len(self), k, seed)
        centres = cluster.fit_centroids(self.vectors[rows], k, seed, backend)
        return ItemEmbeddings(self.item_ids, self.vectors, cluster.assign(self.vectors, centres))

    def save(self, path):
        path = check_out_path(path)
        clusters = self.cluster_ids if self.cluster_ids is not None else np.full(len(self), -1, np.int64)
        if path.endswith(".safetensors"):
            from safetensors.numpy import save_file
            with atomic_path(path) as tmp:
                save_file({"item_id": self.item_ids, "embedding": self.vectors, "cluster_id": clusters}, tmp)
        else:
            write_table(embedding_table(self.item_ids, self.vectors, clusters), path)

    @classmethod
    def load(cls, path, item_ids=None):
        """From a .safetensors / .parquet file or a parts directory (catalogue.py); with
        `item_ids`, only those (a directory is filtered part by part, never read whole)."""
        path = str(path)
        if not os.path.exists(path):
            raise FileNotFoundError(f"embeddings: {path} does not exist")
        if os.path.isdir(path) and not is_parts_dir(path):
            raise ValueError(f"embeddings: {path} is a directory without manifest.json (an unfinished "
                             f"`courier-fast embed`? run it again to finish)")
        try:
            if is_parts_dir(path):
                ids, vec, clusters = load_parts(path, item_ids)
                item_ids = None
            elif path.endswith(".safetensors"):
                from safetensors.numpy import load_file
                t = load_file(path)
                ids, vec, clusters = t["item_id"], t["embedding"], t["cluster_id"]
            else:
                import pyarrow.parquet as pq
                ids, vec, clusters = table_columns(pq.read_table(path))
        except ValueError:
            raise
        except Exception as exc:  # noqa: BLE001  (safetensors and pyarrow raise their own types)
            raise ValueError(f"embeddings: {path} is not an embedding file ({exc})") from exc
        if item_ids is not None:
            keep = np.isin(ids, np.asarray(item_ids, np.int64))
            ids, vec, clusters = ids[keep], vec[keep], clusters[keep]
        return cls(ids, vec, None if len(clusters) == 0 or (clusters < 0).all() else clusters)


def encode_items(encoder, items, image_size=None, batch_size=256, device="cpu", decoder="auto", progress=False):
    """ItemEmbeddings of every item of the item table with `encoder` (an ImageEncoder) in eval mode."""
    parts = list(encoded_batches(encoder, items, None, image_size, batch_size, device, decoder, progress))
    vectors = np.concatenate([v for _, v in parts]) if parts else np.zeros((0, encoder.embed_dim), np.float32)
    return ItemEmbeddings(items.column("item_id").to_numpy(), vectors)


def simscore(emb, history_ids, pv_ids):
    """Cosine of each shown item to each history item: history (R, L), pv (R, P) ids (-1 pad)
    -> (R, P, L) float32, 0 where either side is padding."""
    h_rows, p_rows = emb.rows(history_ids), emb.rows(pv_ids)
    table = np.vstack([emb.vectors, np.zeros((1, emb.vectors.shape[1]), np.float32)])  # row -1 = zeros
    return np.einsum("rpd,rld->rpl", table[p_rows], table[h_rows]).astype(np.float32)


def embed_checkpoint(checkpoint, data, clusters=32, batch_size=256, device="auto", seed=0):
    """ItemEmbeddings of every item of `data` with the encoder of a train() checkpoint.pt or an
    encoder.safetensors (+ cluster IDs when clusters > 0), at the image size it was trained at;
    in memory (catalogue.embed_catalogue streams to disk instead). Only the encoder is rebuilt
    (courier_fast.models.checkpoint.load_encoder)."""
    from courier_fast.models.checkpoint import load_encoder
    from courier_fast.data import read_items

    encoder, image_size = load_encoder(checkpoint)
    items = read_items(os.path.join(data, "items.parquet"))
    dev = resolve_device(device)
    emb = encode_items(encoder.to(dev), items, image_size, batch_size, dev)
    return emb.with_clusters(clusters, seed) if clusters else emb


def embed(checkpoint, data, out, clusters=32, batch_size=256, device="auto", seed=0, **catalogue_options):
    """Embed every item of `data` into `out`: a .safetensors / .parquet file (checked before any
    work; -> its ItemEmbeddings) or a directory of parts (-> the manifest dict). Both stream
    through catalogue.embed_catalogue, so both resume after a kill and shard over torchrun
    ranks (a file is assembled from `<out>.parts/` by rank 0 at the end; other ranks get None).
    catalogue_options: chunk_size, kmeans, progress."""
    if is_directory_out(out):
        return embed_catalogue(checkpoint, data, out, clusters, batch_size, device, seed, **catalogue_options)
    import torch.distributed as dist

    check_out_path(out)
    work = f"{out}.parts"
    embed_catalogue(checkpoint, data, work, clusters, batch_size, device, seed, **catalogue_options)
    if dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
        return None  # rank 0 assembles the file
    emb = ItemEmbeddings.load(work)
    emb.save(out)
    import shutil
    shutil.rmtree(work)
    return emb


def is_directory_out(path):
    """Whether an output path names a directory of parts: an existing directory, a trailing
    slash, or a name without a suffix."""
    path = str(path)
    return os.path.isdir(path) or path.endswith(os.sep) or not os.path.splitext(os.path.basename(path))[1]
