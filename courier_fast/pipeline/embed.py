"""Item embeddings and the features COURIER feeds a CTR model (`courier-fast embed`).

embed() writes an ItemEmbeddings table (embeddings.py: item_ids, unit vectors, k-means cluster
ids; .safetensors, .parquet or a directory of parts) for every item of items.parquet, with the
encoder of a checkpoint: in memory here, streamed and sharded over torchrun ranks by
catalogue.py.

Imports go one way: embed -> catalogue -> (encode, embeddings); encode.py holds the decode +
encode loop (encoded_batches, resolve_device, also importable from here) and embeddings.py the
table (ItemEmbeddings, simscore, the file format) that evaluation reads without the encoder.
"""
import os

import numpy as np

from courier_fast.pipeline.catalogue import embed_catalogue
from courier_fast.pipeline.embeddings import SUFFIXES, ItemEmbeddings, check_out_path, simscore  # noqa: F401
from courier_fast.pipeline.encode import encoded_batches, resolve_device

def encode_items(encoder, items, image_size=None, batch_size=256, device="cpu", decoder="auto", progress=False):
    """ItemEmbeddings of every item of the item table with `encoder` (an ImageEncoder) in eval mode."""
    parts = list(encoded_batches(encoder, items, None, image_size, batch_size, device, decoder, progress))
    vectors = np.concatenate([v for _, v in parts]) if parts else np.zeros((0, encoder.embed_dim), np.float32)
    return ItemEmbeddings(items.column("item_id").to_numpy(), vectors)


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
