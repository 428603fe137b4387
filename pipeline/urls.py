"""Where shards live: local paths, brace patterns, http(s):// URLs, object stores and `pipe:` commands.

Standard library, fsspec for object stores (pipeline.stores) and webdataset's `gopen` for `pipe:`
and other schemes; no torch.
"""

from __future__ import annotations

import io
import random
import re
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from braceexpand import braceexpand

from pipeline.manifest import (MANIFEST_NAME, MAX_MANIFEST_BYTES, SHARD_SUFFIXES, Manifest, check_shard_name,
                               parse_manifest, read_manifest)

_SHARD_IN_URL = re.compile(r"([^/\s'\"?=]+\.(?:tar\.gz|tgz|tar))")  # the operator's URL: any file-ish word
from pipeline.stores import is_store_url, open_store

# Not seeded from anything ranks share: ranks (and DataLoader workers, which copy their parent's
# `random` state) must not wait the same time and retry in step against the same store.
_JITTER = random.SystemRandom()


class ShardOpenError(OSError):
    """A shard or manifest URL that could not be opened (after retries, for remote ones)."""


class UnsupportedURLError(ShardOpenError):
    """A URL scheme nothing here can read (retrying would not help)."""


@dataclass(frozen=True)
class RetryPolicy:
    """How hard to try opening a remote URL before giving up."""

    attempts: int = 4
    """Tries per URL (1 means no retry); local paths are never retried."""
    backoff_s: float = 0.5
    """Longest wait before the second try (the wait is jittered in [half, all] of it); doubled for every further try."""
    timeout_s: float = 60.0
    """Socket timeout for http(s) connections and reads."""

    def delay_s(self, retry_number: int) -> float:
        """Wait before retry `retry_number` (1 = the first): exponential back-off with "equal jitter",
        uniform in [b/2, b] for b = backoff_s * 2**(retry_number-1): the wait still grows, and ranks
        that failed together spread their retries instead of hitting the store at the same moment."""
        limit = self.backoff_s * 2 ** (retry_number - 1)
        return _JITTER.uniform(limit / 2, limit)


DEFAULT_RETRY = RetryPolicy()


def is_remote(url: str) -> bool:
    return "://" in url and not url.startswith("file://")


def expand_urls(spec: str) -> list[str]:
    """`a-{000..002}.tar` -> three URLs; `::` joins several specs (as in webdataset)."""
    urls = [url for part in spec.split("::") for url in braceexpand(part)]
    if not urls:
        raise ValueError(f"{spec!r} names no shards")
    return urls


def is_shard_spec(location: str) -> bool:
    """True for a shard list (pattern, .tar URL, pipe: command), False for a directory/prefix."""
    return (location.startswith("pipe:") or "{" in location or "::" in location
            or location.rstrip("/").endswith(SHARD_SUFFIXES))


def shard_name(url: str) -> str:
    """The tar file name a URL or pipe: command refers to (its last `*.tar`, `*.tar.gz`, `*.tgz` word)."""
    names = _SHARD_IN_URL.findall(url)
    if not names:
        raise ValueError(f"{url!r}: no *.tar, *.tar.gz or *.tgz file name in it")
    return names[-1]


def sibling(url: str, name: str) -> str:
    """The URL (or pipe: command) for file `name` in the same place as shard URL `url`.

    `name` is pasted into the URL, which for `pipe:` is a shell command: it must be manifest.json
    or a plain shard file name (pipeline.manifest.SHARD_NAME), checked here, where it is pasted,
    whatever checked it before.
    """
    if name != MANIFEST_NAME:
        check_shard_name(name)
    own = shard_name(url)
    head, _, tail = url.rpartition(own)
    return head + name + tail


class _Prefixed(io.RawIOBase):
    """A stream whose first bytes were already read (to see whether a pipe produced anything)."""

    def __init__(self, head: bytes, stream) -> None:
        self.head, self.stream = head, stream

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        if self.head:
            if size < 0:
                data, self.head = self.head + self.stream.read(), b""
                return data
            data, self.head = self.head[:size], self.head[size:]
            if len(data) < size:
                data += self.stream.read(size - len(data))
            return data
        return self.stream.read(size)

    def close(self) -> None:
        if not self.closed:
            try:
                self.stream.close()
            finally:
                super().close()


def runs_a_command(url: str) -> bool:
    """True for a location that is run, not read: `pipe:` and webdataset's other gopen schemes
    (sftp, scp, ais...) start programs; local paths, file://, http(s):// and object stores do not."""
    if url.startswith("pipe:"):
        return True
    return is_remote(url) and not url.startswith(("http://", "https://")) and not is_store_url(url)


def _open_once(url: str, timeout_s: float):
    if url.startswith(("http://", "https://")):
        return urllib.request.urlopen(url, timeout=timeout_s)
    if is_store_url(url):
        return open_store(url, timeout_s)
    from webdataset.gopen import gopen, gopen_schemes

    scheme = url.split("://", 1)[0] if not url.startswith("pipe:") else "pipe"
    if scheme not in gopen_schemes:
        raise UnsupportedURLError(f"{url}: no reader for {scheme}:// URLs; use http(s)://, or a "
                                  f"pipe: command such as 'pipe:aws s3 cp {url} -'")
    stream = gopen(url, "rb")
    head = stream.read(512)  # a failed command exits before writing: Pipe.read raises here
    if not head:
        stream.close()
        raise ShardOpenError(f"{url}: produced no data")
    return _Prefixed(head, stream)


def _retryable(error: Exception) -> bool:
    if isinstance(error, (UnsupportedURLError, FileNotFoundError, PermissionError, ImportError)):
        return False  # an object that is not there, or not ours to read, will not appear on retry
    if isinstance(error, urllib.error.HTTPError):
        return error.code >= 500 or error.code in (408, 429)
    return isinstance(error, (OSError, ValueError))


def open_url(url: str, retry: RetryPolicy = DEFAULT_RETRY):
    """A readable binary stream for a local path, file://, http(s)://, pipe: or gopen URL.

    Remote URLs are retried with jittered exponential back-off (not 4xx answers or missing
    objects, which will not change);
    the final error names the URL and the number of attempts.
    """
    if not is_remote(url) and not url.startswith("pipe:"):
        path = url.removeprefix("file://")
        try:
            return open(path, "rb")
        except OSError as error:
            raise ShardOpenError(f"{url}: cannot open: {error.strerror or error}") from error
    last: Exception | None = None
    attempts = max(1, retry.attempts)
    for attempt in range(attempts):
        if attempt:
            time.sleep(retry.delay_s(attempt))
        try:
            return _open_once(url, retry.timeout_s)
        except UnsupportedURLError:
            raise
        except Exception as error:  # urllib, sockets and subprocesses raise many types; name the URL once
            last = error
            if not _retryable(error):
                break
    tries = f"{attempt + 1} attempt{'s' if attempt else ''}"
    raise ShardOpenError(f"{url}: cannot open after {tries}: {last}") from last


def read_manifest_at(url: str, retry: RetryPolicy = DEFAULT_RETRY) -> Manifest:
    """The manifest at a path, URL or pipe: command; errors name where it was looked for."""
    local = not is_remote(url) and not url.startswith("pipe:")
    if local and Path(url).name == MANIFEST_NAME:
        return read_manifest(Path(url.removeprefix("file://")).parent)
    if local and not Path(url.removeprefix("file://")).is_file():
        raise FileNotFoundError(f"no manifest at {url}")
    chunks, size = [], 0
    with open_url(url, retry) as stream:
        while size <= MAX_MANIFEST_BYTES:  # a remote manifest may be endless: read no more than the limit
            chunk = stream.read(1 << 20)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    return parse_manifest(b"".join(chunks), url)


def _shards_base(manifest: Manifest, location: str) -> str:
    """Where the shards of a manifest at `location` are: its folder, or the folder `pipeline index
    --out` recorded. That record comes from a file, so it may name a folder, never a command."""
    base = manifest.extra.get("index", {}).get("base") if isinstance(manifest.extra.get("index"), dict) else None
    if base is None:
        return location.rpartition("/")[0] or "."
    if not isinstance(base, str) or base.startswith("pipe:") or not (is_remote(base) or base.startswith("/")) or any(
            c in base for c in "\n\r\0"):
        raise ValueError(f"{location}: extra.index.base {str(base)[:80]!r} is not a folder URL or absolute path")
    return base.rstrip("/")


def resolve_split(location: str, split: str, retry: RetryPolicy = DEFAULT_RETRY
                  ) -> tuple[list[str], list[int], Manifest]:
    """(shard URLs, sample counts, manifest) of one split, from any supported location.

    A directory or URL prefix holds manifest.json; a shard list (brace pattern, `.tar` URL,
    pipe: command) finds manifest.json beside its first shard. A shard list of another split
    (the trainer asks for "val" with a train pattern) means that split's shards in the same place.
    """
    if location.endswith(".json"):  # a manifest written elsewhere (`pipeline index --out`)
        manifest = read_manifest_at(location, retry)
        base = _shards_base(manifest, location)
        infos = manifest.shards(split)
        return [f"{base}/{info.name}" for info in infos], [i.num_samples for i in infos], manifest
    if is_shard_spec(location):
        urls = expand_urls(location)
        manifest = read_manifest_at(sibling(urls[0], MANIFEST_NAME), retry)
        entries = []
        for url in urls:
            try:
                entries.append(manifest.shard_info(shard_name(url)))
            except KeyError:
                raise ValueError(f"{url}: shard {shard_name(url)} is not in the manifest beside it") from None
        splits = {entry_split for entry_split, _ in entries}
        if splits == {split}:
            return urls, [info.num_samples for _, info in entries], manifest
        if len(splits) > 1:
            raise ValueError(f"{location!r} mixes splits {sorted(splits)}; name one split's shards")
        infos = manifest.shards(split)
        return [sibling(urls[0], info.name) for info in infos], [i.num_samples for i in infos], manifest
    if is_remote(location):
        base = location.rstrip("/")
        manifest = read_manifest_at(f"{base}/{MANIFEST_NAME}", retry)
        infos = manifest.shards(split)
        return [f"{base}/{info.name}" for info in infos], [i.num_samples for i in infos], manifest
    directory = Path(location.removeprefix("file://"))
    manifest = read_manifest(directory)
    infos = manifest.shards(split)
    return [str(directory / info.name) for info in infos], [i.num_samples for i in infos], manifest
