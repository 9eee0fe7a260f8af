"""Item images read on demand: JPEG bytes held in the item table, or files named by it.

An item table (see format.py) carries either `image` (the encoded bytes, in memory) or
`image_path` (a file per item; absolute, or relative to `root`). ItemImages gives the encoded
bytes of any rows of that table without ever reading the whole catalogue: in path mode only the
path strings stay resident and each call reads just the files asked for (a small thread pool,
since reading many small files is latency-bound). The bytes go to ImageDecoder unchanged.
"""
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

IO_THREADS = 8


def resolve_paths(paths, root):
    """Absolute, normalised paths: each of `paths` (str) as is when absolute, else joined to `root`."""
    root = os.path.abspath(root or ".")
    return [os.path.normpath(p if os.path.isabs(p) else os.path.join(root, p)) for p in paths]


def missing_files(paths, threads=IO_THREADS):
    """Boolean array: True where `paths[i]` is not an existing regular file (stat in parallel)."""
    paths = list(paths)
    if not paths:
        return np.zeros(0, dtype=bool)
    with ThreadPoolExecutor(threads) as pool:
        return ~np.fromiter(pool.map(os.path.isfile, paths, chunksize=1024), dtype=bool, count=len(paths))


def _read_file(path):
    with open(path, "rb") as f:
        return f.read()


class ItemImages:
    """Encoded images of an item table's rows.

    items: a pyarrow Table with `item_id` and either `image` (binary) or `image_path` (string).
    root: the directory relative paths are taken from (load_dataset passes absolute paths).
    read(rows) -> list of bytes, one per row position (int array-like), in that order.
    """

    def __init__(self, items, root=None, threads=IO_THREADS):
        names = items.column_names
        if "image" in names:
            self.mode, self._images = "bytes", items.column("image")
        elif "image_path" in names:
            self.mode, self._paths = "path", items.column("image_path").combine_chunks()
            self.root = os.path.abspath(root or ".")
        else:
            raise ValueError(f"items: column 'image' or 'image_path' is missing (have {names})")
        self._ids = items.column("item_id")
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="courier-fast-io") if self.mode == "path" else None

    def __len__(self):
        return len(self._ids)

    def paths(self, rows):
        """Absolute file paths of `rows` (path mode only)."""
        if self.mode != "path":
            raise ValueError("these items carry image bytes, not paths")
        return resolve_paths((self._paths[int(r)].as_py() for r in rows), self.root)

    def read(self, rows):
        rows = [int(r) for r in rows]
        if self.mode == "bytes":
            return [self._images[r].as_py() for r in rows]
        paths = self.paths(rows)
        try:
            return list(self._pool.map(_read_file, paths))
        except OSError as exc:  # deleted or unreadable since load_dataset checked it
            k = paths.index(exc.filename) if exc.filename in paths else 0
            raise ValueError(f"item {self._ids[rows[k]].as_py()}: cannot read image file {paths[k]}: "
                             f"{exc.strerror or exc}") from exc

    def close(self):
        if self._pool is not None:
            self._pool.shutdown(wait=False)
