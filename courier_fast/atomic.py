"""Atomic file writes, cache-file reads and the user cache directory, with nothing but the standard library (the
ops' self-check verdicts and the Triton autotuner's choices are cached there on a torch-only
install)."""
import contextlib
import json
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


def cache_dir():
    """The user cache directory: $COURIER_FAST_CACHE_DIR, else $XDG_CACHE_HOME/courier_fast, else
    ~/.cache/courier_fast."""
    root = os.environ.get("COURIER_FAST_CACHE_DIR")
    if root:
        return root
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "courier_fast")


def read_json(path):
    """The JSON in `path`, or None when it is missing or unreadable (a cache file is then rebuilt)."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None
