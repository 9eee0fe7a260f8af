"""The item-embedding table on disk, shared by embed.py (one .parquet file) and catalogue.py (a
directory of parts with a manifest).

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
