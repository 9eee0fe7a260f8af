"""Atomic file writes, with nothing but the standard library (the ops' self-check cache uses it
on a torch-only install)."""
import contextlib
import os


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path beside `path`; it replaces `path` when the block succeeds and is
    removed when it fails, so readers never see a half-written file."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
