"""Object stores through fsspec: s3:// (s3fs), gs:// and gcs:// (gcsfs), and whatever else fsspec knows.

Credentials and endpoints come from each store's standard environment: for S3 and S3-compatible
stores AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN / AWS_PROFILE, AWS_REGION
and AWS_ENDPOINT_URL (or AWS_ENDPOINT_URL_S3) as botocore reads them; for GCS
GOOGLE_APPLICATION_CREDENTIALS or the metadata server. Nothing here reads a secret itself.

http(s):// stays on urllib (pipeline.urls) and `pipe:` on webdataset's gopen: both already
stream without an extra dependency.
"""

from __future__ import annotations

import functools
import os

STORE_SCHEMES = ("s3", "gs", "gcs")
"""URL schemes opened through fsspec (each needs its package: s3fs, gcsfs)."""

READ_BLOCK_BYTES = 8 << 20
"""Read-ahead per request: shards are read front to back, so large sequential blocks."""

_PACKAGES = {"s3": "s3fs", "gs": "gcsfs", "gcs": "gcsfs"}
_SETTINGS_PREFIXES = ("AWS_", "GOOGLE_", "GCS", "FSSPEC_")


def scheme_of(url: str) -> str:
    return url.split("://", 1)[0].lower() if "://" in url else ""


def is_store_url(url: str) -> bool:
    """True for a URL an fsspec object store reads (s3://, gs://, gcs://)."""
    return scheme_of(url) in STORE_SCHEMES


def filesystem(url: str):
    """The fsspec filesystem for a store URL; a missing package is named with how to install it."""
    scheme = scheme_of(url)
    settings = tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith(_SETTINGS_PREFIXES)))
    try:
        return _filesystem(scheme, os.getpid(), settings)
    except ImportError as error:
        package = _PACKAGES.get(scheme, f"the fsspec backend for {scheme}://")
        raise ImportError(f"{url}: reading {scheme}:// needs {package} (pip install {package})") from error


@functools.lru_cache(maxsize=8)
def _filesystem(scheme: str, pid: int, settings: tuple):
    """One client per process and environment: keyed by pid because fsspec's async clients do not
    survive fork (DataLoader workers), and by the store settings so a changed endpoint is used."""
    import fsspec

    return fsspec.filesystem(scheme, skip_instance_cache=True)


def open_store(url: str, timeout_s: float):
    """A readable binary stream of an object; a missing object raises FileNotFoundError."""
    fs = filesystem(url)
    # Open (an HTTP HEAD for S3) now, so a missing or unreadable object fails here, inside the retries.
    return fs.open(url, "rb", block_size=READ_BLOCK_BYTES, cache_type="readahead")


def write_store(url: str, data: bytes) -> None:
    """Write one object (a manifest `pipeline index` writes beside remote shards)."""
    with filesystem(url).open(url, "wb") as handle:
        handle.write(data)


def list_store(prefix: str, suffixes: tuple[str, ...]) -> list[str]:
    """URLs of the objects directly under `prefix` whose names end in one of `suffixes`, sorted."""
    fs = filesystem(prefix)
    scheme = scheme_of(prefix)
    names = fs.ls(prefix.rstrip("/"), detail=False)
    return sorted(f"{scheme}://{name}" for name in names if name.endswith(suffixes))
