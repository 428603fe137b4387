"""Shards from a real HTTP server, brace patterns and pipe: commands read exactly as local files."""

from __future__ import annotations

import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest

from pipeline.loader import iter_eval_batches, open_split
from pipeline.shards import read_shard_images
from pipeline.urls import RetryPolicy, ShardOpenError, open_url
from tests.conftest import free_port

FAST_RETRY = RetryPolicy(attempts=3, backoff_s=0.05, timeout_s=5)


@pytest.fixture(scope="module")
def http_shards(small_shards):
    """small_shards served by a real `python -m http.server` on 127.0.0.1."""
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1",
                               "--directory", str(small_shards)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(100):
            try:
                urllib.request.urlopen(f"{base}/manifest.json", timeout=1).close()
                break
            except OSError:
                time.sleep(0.1)
        else:
            pytest.fail("http.server did not start")
        yield base
    finally:
        server.terminate()
        server.wait(10)


def read_all(location: str, split: str):
    shards = open_split(location, split, retry=FAST_RETRY)
    parts = [read_shard_images(url, shards.manifest.image_shape) for url in shards.urls]
    return shards, np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def test_http_reads_the_same_as_local(small_shards, http_shards):
    local, local_images, local_labels = read_all(str(small_shards), "train")
    remote, remote_images, remote_labels = read_all(http_shards, "train")
    assert remote.urls[0].startswith("http://127.0.0.1:") and remote.counts == local.counts
    assert np.array_equal(remote_images, local_images) and np.array_equal(remote_labels, local_labels)
    # the validation loader too, through the same streaming path the trainer uses
    val_local = list(iter_eval_batches(open_split(str(small_shards), "val"), batch_size=50, rank=0, world_size=1))
    val_http = list(iter_eval_batches(open_split(http_shards, "val", FAST_RETRY), batch_size=50, rank=0,
                                      world_size=1, retry=FAST_RETRY))
    assert len(val_http) == len(val_local) == 3
    for (x1, y1, m1), (x2, y2, m2) in zip(val_local, val_http):
        assert x1.equal(x2) and y1.equal(y2) and m1.equal(m2)


def test_brace_pattern_over_http_and_val_beside_it(small_shards, http_shards):
    pattern = f"{http_shards}/train-{{000000..000011}}.tar"
    shards = open_split(pattern, "train", FAST_RETRY)
    assert len(shards.urls) == 12 and shards.num_samples == 1080
    val = open_split(pattern, "val", FAST_RETRY)  # the trainer asks for val with the same location
    assert [u.rsplit("/", 1)[1] for u in val.urls] == ["val-000000.tar", "val-000001.tar"]
    _, local_images, _ = read_all(str(small_shards), "val")
    http_images = np.concatenate([read_shard_images(u, val.manifest.image_shape)[0] for u in val.urls])
    assert np.array_equal(http_images, local_images)


def test_local_brace_pattern_selects_those_shards(small_shards):
    shards = open_split(f"{small_shards}/train-{{000002..000004}}.tar", "train")
    assert [u.rsplit("/", 1)[1] for u in shards.urls] == ["train-000002.tar", "train-000003.tar",
                                                          "train-000004.tar"]
    assert shards.counts == [90, 90, 90]


def test_pipe_commands_read_the_same_as_local(small_shards):
    pattern = f"pipe:cat {small_shards}/train-{{000000..000002}}.tar"
    shards = open_split(pattern, "train")
    assert shards.urls[0] == f"pipe:cat {small_shards}/train-000000.tar"
    for url in shards.urls:
        local = read_shard_images(url.removeprefix("pipe:cat "), shards.manifest.image_shape)
        piped = read_shard_images(url, shards.manifest.image_shape)
        assert np.array_equal(local[0], piped[0]) and np.array_equal(local[1], piped[1])


def test_unreachable_url_is_named_after_retries():
    url = f"http://127.0.0.1:{free_port()}/train-000000.tar"  # nothing listens there
    started = time.monotonic()
    with pytest.raises(ShardOpenError, match=r"train-000000\.tar: cannot open after 3 attempts"):
        open_url(url, FAST_RETRY)
    assert time.monotonic() - started >= (0.05 + 0.1) / 2  # it waited between the tries (jittered)


def test_retry_waits_grow_and_are_jittered():
    policy = RetryPolicy(backoff_s=1.0)
    for retry in (1, 2, 3):
        waits = [policy.delay_s(retry) for _ in range(200)]
        limit = 2 ** (retry - 1)
        assert all(limit / 2 <= w <= limit for w in waits)
        assert len(set(waits)) > 150  # spread out, so ranks that failed together do not retry in step


def test_missing_remote_shard_is_not_retried_and_named(http_shards):
    with pytest.raises(ShardOpenError, match=r"nope\.tar: cannot open after 1 attempt: HTTP Error 404"):
        open_url(f"{http_shards}/nope.tar", FAST_RETRY)


def test_failing_pipe_and_missing_file_are_named(tmp_path):
    with pytest.raises(ShardOpenError, match="pipe:cat .*missing.tar: cannot open after 3 attempts"):
        open_url(f"pipe:cat {tmp_path}/missing.tar", FAST_RETRY)
    with pytest.raises(ShardOpenError, match="missing.tar: cannot open"):
        open_url(f"{tmp_path}/missing.tar")


def test_no_manifest_beside_a_pattern_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no manifest.json in"):
        open_split(f"{tmp_path}/train-{{000000..000001}}.tar", "train")


def test_training_batches_over_http_equal_local_ones(small_shards, http_shards):
    import itertools

    from pipeline.loader import batches_per_epoch, make_train_loader

    epochs = []
    for location in (str(small_shards), http_shards):
        shards = open_split(location, "train", FAST_RETRY)
        count = batches_per_epoch(shards.num_samples, 60, 2)
        loader = make_train_loader(shards, batch_size=60, rank=1, world_size=2, seed=5, num_workers=2,
                                   epoch=3, retry=FAST_RETRY)
        epochs.append(list(itertools.islice(loader, count)))
        assert loader.dataset.errors.num_skipped_samples == 0
    assert len(epochs[0]) == len(epochs[1]) == 9
    for (x1, y1), (x2, y2) in zip(*epochs):
        assert x1.equal(x2) and y1.equal(y2)


def test_unknown_scheme_says_how_to_read_it():
    from pipeline.urls import UnsupportedURLError

    with pytest.raises(UnsupportedURLError, match=r"foo://b/train-000000\.tar: no reader for foo:// URLs.*pipe:"):
        open_url("foo://b/train-000000.tar", FAST_RETRY)
