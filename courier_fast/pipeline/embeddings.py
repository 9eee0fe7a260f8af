"""The item-embedding table: ItemEmbeddings in memory, simscore() over it, and its files, shared by
embed.py (one .safetensors or .parquet file), catalogue.py (a directory of parts with a manifest)
and evaluate.py (which reads the table, never the encoder).

ItemEmbeddings holds, for every item of items.parquet: item_ids (n,) int64, vectors (n, d)
float32 with unit L2 norm, and cluster_ids (n,) int64 from k-means over those vectors
(faiss when installed, else scikit-learn: cluster.py). save() writes it atomically; load()
reads all three forms. simscore() gives the paper's SimScore features: the cosine between a
shown item's image and each history image.

A table has item_id int64, embedding fixed_size_list<float32>[d] (unit norm) and cluster_id int64
(-1 without k-means). A part of a catalogue run also carries, in its parquet schema metadata,
the sha256 of the checkpoint that embedded it (CHECKPOINT_KEY), so a resumed run can tell its
own parts from another checkpoint's. A finished parts directory has manifest.json (format
FORMAT) listing the parts; load_parts() reads it back, optionally only some item ids.
"""
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from courier_fast.data.format import atomic_path, write_table

FORMAT = "courier_fast.item_embeddings/1"
CHECKPOINT_KEY = b"courier_fast.checkpoint_sha256"


def embedding_table(ids, vectors, clusters, checkpoint_sha256=None):
    """A pyarrow table of ids (n,) int64, vectors (n, d) float32 and cluster ids (n,) int64, with
    the checkpoint's sha256 in its schema metadata when given."""
    vectors = np.ascontiguousarray(vectors, np.float32)
    emb = pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), vectors.shape[1])
    t = pa.table({"item_id": pa.array(ids, pa.int64()), "embedding": emb, "cluster_id": pa.array(clusters, pa.int64())})
    return t if checkpoint_sha256 is None else t.replace_schema_metadata({CHECKPOINT_KEY: checkpoint_sha256.encode()})


def table_columns(t):
    """(item_id (n,) int64, embedding (n, d) float32, cluster_id (n,) int64) of an embedding table."""
    d = t.schema.field("embedding").type.list_size
    vec = t.column("embedding").combine_chunks().flatten().to_numpy().astype(np.float32, copy=False).reshape(-1, d)
    return t.column("item_id").to_numpy(), vec, t.column("cluster_id").to_numpy()


def part_checkpoint(path):
    """The checkpoint sha256 recorded in a part file's metadata, or None (a file without one)."""
    value = (pq.read_schema(path).metadata or {}).get(CHECKPOINT_KEY)
    return None if value is None else value.decode()


def is_parts_dir(path):
    return os.path.isdir(path) and os.path.exists(os.path.join(path, "manifest.json"))


def load_parts(path, item_ids=None):
    """(item_ids (n,), vectors (n, d), cluster_ids (n,)) of a finished parts directory; only the
    ids in `item_ids` when given (each part filtered as it is read)."""
    with open(os.path.join(path, "manifest.json")) as f:
        manifest = json.load(f)
    if manifest.get("format") != FORMAT:
        raise ValueError(f"embeddings: {path}/manifest.json is not a {FORMAT} manifest")
    keep = None if item_ids is None else pa.array(np.unique(np.asarray(item_ids, np.int64)))
    ids, vecs, clusters = [], [], []
    for rel in manifest["parts"]:
        t = pq.read_table(os.path.join(path, rel))
        if keep is not None:
            t = t.filter(pc.is_in(t.column("item_id"), keep))
        i, v, c = table_columns(t)
        ids.append(i)
        vecs.append(v)
        clusters.append(c)
    return np.concatenate(ids), np.concatenate(vecs), np.concatenate(clusters)


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


def simscore(emb, history_ids, pv_ids):
    """Cosine of each shown item to each history item: history (R, L), pv (R, P) ids (-1 pad)
    -> (R, P, L) float32, 0 where either side is padding."""
    h_rows, p_rows = emb.rows(history_ids), emb.rows(pv_ids)
    table = np.vstack([emb.vectors, np.zeros((1, emb.vectors.shape[1]), np.float32)])  # row -1 = zeros
    return np.einsum("rpd,rld->rpl", table[p_rows], table[h_rows]).astype(np.float32)
