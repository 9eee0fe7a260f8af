"""k-means for the Cluster ID feature (docs/design.md §1), at catalogue scale.

fit_centroids(sample (n, d) float32, k, seed, backend) -> (k, d) float32 centres;
assign(vectors (n, d), centres (k, d)) -> (n,) int64, the nearest centre (squared L2), in
batches. Backends: "faiss" (faiss.Kmeans; on its GPUs when the faiss build has some),
"sklearn" (MiniBatchKMeans, 3 initialisations), "auto" = faiss when installed, else sklearn;
both start from k-means++ centres.
Both are deterministic for a seed. Centres are fitted on a sample of at most
`SAMPLE_PER_CENTRE` x k vectors (faiss' own default cap), so memory does not grow with the
catalogue; sample() draws it.
"""
import importlib.util

import numpy as np

BACKENDS = ("auto", "faiss", "sklearn")
SAMPLE_PER_CENTRE = 256


def faiss_available():
    return importlib.util.find_spec("faiss") is not None


def resolve_backend(backend="auto"):
    """The backend `backend` means here ("auto" -> faiss when installed, else sklearn)."""
    if backend not in BACKENDS:
        raise ValueError(f"kmeans backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "faiss" if faiss_available() else "sklearn"
    if backend == "faiss" and not faiss_available():
        raise ValueError("kmeans backend 'faiss' but faiss is not installed (pip install faiss-cpu)")
    return backend


def sample_size(n, k):
    """How many of n vectors fit_centroids needs for k centres."""
    return min(int(n), SAMPLE_PER_CENTRE * int(k))


def fit_centroids(sample, k, seed=0, backend="auto", niter=20):
    """(k', d) float32 centres, k' = min(k, len(sample)), of k-means over `sample`."""
    x = np.ascontiguousarray(sample, dtype=np.float32)
    if x.ndim != 2 or len(x) == 0:
        raise ValueError(f"sample must be a non-empty (n, d) array, got shape {x.shape}")
    k = min(int(k), len(x))
    if k <= 0:
        raise ValueError(f"k must be > 0, got {k}")
    backend = resolve_backend(backend)
    if backend == "faiss":
        import faiss

        from sklearn.cluster import kmeans_plusplus

        gpu = hasattr(faiss, "get_num_gpus") and faiss.get_num_gpus() > 0
        km = faiss.Kmeans(x.shape[1], k, niter=niter, seed=int(seed), gpu=gpu, verbose=False,
                          max_points_per_centroid=SAMPLE_PER_CENTRE,
                          min_points_per_centroid=1)  # small catalogues are fine: no warning on stderr
        # faiss starts from k random points, which often puts two centres in one dense region
        init, _ = kmeans_plusplus(x, k, random_state=int(seed))
        km.train(x, init_centroids=np.ascontiguousarray(init, dtype=np.float32))
        return np.asarray(km.centroids, dtype=np.float32).reshape(k, x.shape[1])
    from sklearn.cluster import MiniBatchKMeans

    km = MiniBatchKMeans(n_clusters=k, random_state=int(seed), n_init=3, max_iter=niter * 5,
                         batch_size=min(len(x), 4096))
    km.fit(x)
    return km.cluster_centers_.astype(np.float32)


def assign(vectors, centroids, batch=65536):
    """(n,) int64: the nearest centre of each vector (squared L2; ties -> the lower index)."""
    c = np.asarray(centroids, dtype=np.float32)
    c_sq = (c * c).sum(1)
    out = np.empty(len(vectors), dtype=np.int64)
    for start in range(0, len(vectors), batch):
        x = np.asarray(vectors[start:start + batch], dtype=np.float32)
        out[start:start + len(x)] = np.argmin(c_sq[None, :] - 2 * x @ c.T, axis=1)
    return out


def sample(n, k, seed=0):
    """Sorted positions in range(n) of the vectors fit_centroids trains on (seeded)."""
    m = sample_size(n, k)
    if m == n:
        return np.arange(n)
    return np.sort(np.random.default_rng([int(seed), 7]).choice(n, size=m, replace=False))
