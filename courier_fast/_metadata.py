"""Versions of installed distributions, for build_info() and the self-check's cache key."""
import importlib.metadata


def dist_version(dist_name):
    """The installed version of distribution `dist_name` (e.g. "triton"), or None."""
    try:
        return importlib.metadata.version(dist_name)
    except importlib.metadata.PackageNotFoundError:
        return None
