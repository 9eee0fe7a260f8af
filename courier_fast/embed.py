"""Item embeddings and the features COURIER feeds a CTR model (`courier-fast embed`).

ItemEmbeddings holds, for every item of items.parquet: item_ids (n,) int64, vectors (n, d)
float32 with unit L2 norm, and cluster_ids (n,) int64 from k-means over those vectors
(scikit-learn). Saved as .safetensors or .parquet (atomically). simscore() gives the paper's
SimScore features: the cosine between a shown item's image and each history image.
"""
import os

import numpy as np
import torch

from courier_fast.data.format import atomic_path, write_table

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

    def with_clusters(self, k, seed=0):
        """A copy with cluster_ids from k-means (k clusters, k-means++ init) over the vectors."""
        from sklearn.cluster import KMeans

        k = min(int(k), len(self))
        labels = KMeans(n_clusters=k, n_init=3, random_state=seed).fit_predict(self.vectors)
        return ItemEmbeddings(self.item_ids, self.vectors, labels)

    def save(self, path):
        path = check_out_path(path)
        clusters = self.cluster_ids if self.cluster_ids is not None else np.full(len(self), -1, np.int64)
        if path.endswith(".safetensors"):
            from safetensors.numpy import save_file
            with atomic_path(path) as tmp:
                save_file({"item_id": self.item_ids, "embedding": self.vectors, "cluster_id": clusters}, tmp)
        else:
            import pyarrow as pa
            d = self.vectors.shape[1]
            emb = pa.FixedSizeListArray.from_arrays(pa.array(self.vectors.reshape(-1)), d)
            write_table(pa.table({"item_id": self.item_ids, "embedding": emb, "cluster_id": clusters}), path)

    @classmethod
    def load(cls, path):
        path = str(path)
        if not os.path.exists(path):
            raise FileNotFoundError(f"embeddings: {path} does not exist")
        try:
            if path.endswith(".safetensors"):
                from safetensors.numpy import load_file
                t = load_file(path)
                ids, vec, clusters = t["item_id"], t["embedding"], t["cluster_id"]
            else:
                import pyarrow.parquet as pq
                t = pq.read_table(path)
                ids = t.column("item_id").to_numpy()
                vec = np.stack(t.column("embedding").to_numpy(zero_copy_only=False))
                clusters = t.column("cluster_id").to_numpy()
        except Exception as exc:  # noqa: BLE001  (safetensors and pyarrow raise their own types)
            raise ValueError(f"embeddings: {path} is not an embedding file ({exc})") from exc
        return cls(ids, vec, None if (clusters < 0).all() else clusters)


@torch.no_grad()
def encode_items(encoder, items, image_size=None, batch_size=256, device="cpu", decoder="auto"):
    """ItemEmbeddings of every item of the item table with `encoder` (an ImageEncoder) in eval mode."""
    from courier_fast.data.decode import ImageDecoder

    dec = ImageDecoder(backend=decoder, device=device, size=image_size)
    ids = items.column("item_id").to_numpy()
    images = items.column("image")
    was_training = encoder.training
    encoder.eval()
    out = []
    for start in range(0, len(ids), batch_size):
        chunk = [images[i].as_py() for i in range(start, min(start + batch_size, len(ids)))]
        x = dec(chunk, item_ids=ids[start:start + len(chunk)]).to(device)
        out.append(encoder(x).float().cpu())
    encoder.train(was_training)
    vectors = torch.cat(out) if out else torch.zeros(0, encoder.embed_dim)
    return ItemEmbeddings(ids, vectors.numpy())


def simscore(emb, history_ids, pv_ids):
    """Cosine of each shown item to each history item: history (R, L), pv (R, P) ids (-1 pad)
    -> (R, P, L) float32, 0 where either side is padding."""
    h_rows, p_rows = emb.rows(history_ids), emb.rows(pv_ids)
    table = np.vstack([emb.vectors, np.zeros((1, emb.vectors.shape[1]), np.float32)])  # row -1 = zeros
    return np.einsum("rpd,rld->rpl", table[p_rows], table[h_rows]).astype(np.float32)


def embed_checkpoint(checkpoint, data, clusters=32, batch_size=256, device="auto", seed=0):
    """ItemEmbeddings of every item of `data` with the encoder of a train() checkpoint.pt or an
    encoder.safetensors (+ k-means cluster IDs when clusters > 0), at the image size it was
    trained at. Only the encoder is rebuilt (courier_fast.checkpoint.load_encoder)."""
    from courier_fast.checkpoint import load_encoder
    from courier_fast.data import read_items

    encoder, image_size = load_encoder(checkpoint)
    items = read_items(os.path.join(data, "items.parquet"))
    dev = "cuda" if device == "auto" and torch.cuda.is_available() else "cpu" if device == "auto" else device
    emb = encode_items(encoder.to(dev), items, image_size, batch_size, dev)
    return emb.with_clusters(clusters, seed) if clusters else emb


def embed(checkpoint, data, out, clusters=32, batch_size=256, device="auto", seed=0):
    """embed_checkpoint(), saved to `out` (.safetensors or .parquet; checked before any work)."""
    check_out_path(out)
    emb = embed_checkpoint(checkpoint, data, clusters, batch_size, device, seed)
    emb.save(out)
    return emb
