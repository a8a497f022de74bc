"""Shards and target stores on object storage (issue 19), end to end against a real S3 API: moto's server on
127.0.0.1, with IAM authentication on (so wrong credentials are refused as by AWS), started once for the module
and stopped by its pid.

The chain: make-shards -> s3; cache-targets from s3 shards -> s3 store, in-process and on a dask LocalCluster;
verify; pretrain streaming shards and targets from s3. Each s3 result equals the local one made from the same
inputs; no credential reaches a store, a run directory or the output."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from s3fs import S3FileSystem

from tec_pipeline import storage
from tec_pipeline.data.shards import iter_shard_fields, load_manifest
from tec_pipeline.stage1 import CacheConfig, cache_targets
from tec_pipeline.store.target_store import TargetStore
from tests.conftest import (
    SLOW_WRITER,
    assert_one_line_error,
    free_port,
    kill_half_way,
    needs_fashion_mnist,
    tec_in_process,
)

pytestmark = [needs_fashion_mnist, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[1]
BUCKET = "tec-test"
ARRAYS = ("features", "attention", "topk_index", "boxes", "valid", "done")
STAGE1 = ["--views", "2", "--topk", "4", "--chunk-rows", "64", "--batch-size", "32", "--codec", "fp32"]
SETUP_ACTIONS = 4  # create user, put its policy, create its key, create the bucket: then authentication is on


class S3:
    """The running server: endpoint, a valid key pair, and the environment a user would set."""

    def __init__(self, endpoint: str, key: str, secret: str) -> None:
        self.endpoint, self.key, self.secret = endpoint, key, secret
        self.env = {"AWS_ACCESS_KEY_ID": key, "AWS_SECRET_ACCESS_KEY": secret, "AWS_ENDPOINT_URL": endpoint,
                    "AWS_DEFAULT_REGION": "us-east-1"}

    def url(self, name: str) -> str:
        return f"s3://{BUCKET}/{name}"

    def objects(self, prefix: str) -> bytes:
        """Every object under `prefix`, concatenated (to search for a leaked secret)."""
        fs, path = storage.filesystem(self.url(prefix))
        return b"".join(fs.cat_file(p) for p in fs.find(path))


def _start_moto(port: int) -> subprocess.Popen[bytes]:
    env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": str(SETUP_ACTIONS)}
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.time() + 30
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/moto-api/", timeout=1)
            return proc
        except OSError:
            if time.time() > deadline or proc.poll() is not None:
                proc.kill()
                raise RuntimeError("moto server did not start") from None
            time.sleep(0.1)


@pytest.fixture(scope="module")
def s3() -> Iterator[S3]:
    import boto3

    port = free_port()
    proc = _start_moto(port)
    try:
        endpoint = f"http://127.0.0.1:{port}"
        kw = {"endpoint_url": endpoint, "region_name": "us-east-1", "aws_access_key_id": "setup",
              "aws_secret_access_key": "setup"}
        iam = boto3.client("iam", **kw)
        iam.create_user(UserName="tec")
        iam.put_user_policy(UserName="tec", PolicyName="all", PolicyDocument=json.dumps(
            {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}))
        key = iam.create_access_key(UserName="tec")["AccessKey"]
        boto3.client("s3", **kw).create_bucket(Bucket=BUCKET)
        server = S3(endpoint, key["AccessKeyId"], key["SecretAccessKey"])
        with pytest.MonkeyPatch.context() as mp:  # the standard variables: in-process runs and children use them
            for name, value in server.env.items():
                mp.setenv(name, value)
            yield server
        storage.use({})
        S3FileSystem.clear_instance_cache()
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(autouse=True)
def _no_options_left_over() -> Iterator[None]:
    """Storage options are process state: a test's CLI run must not lend its options to the next test."""
    yield
    storage.use({})


@pytest.fixture()
def no_credentials_in_env(s3: S3, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The AWS_* variables removed (credentials must come from options), with fresh filesystem instances."""
    for name in s3.env:
        monkeypatch.delenv(name)
    S3FileSystem.clear_instance_cache()
    yield
    S3FileSystem.clear_instance_cache()


def _arrays(url: str) -> dict[str, np.ndarray]:
    group = zarr.open_group(TargetStore.open(url).group().store, mode="r")
    return {name: group[name][...] for name in ARRAYS}


def _assert_same_store(url: str, reference: Path) -> None:
    ours, ref = _arrays(url), _arrays(str(reference))
    for name in ARRAYS:
        assert np.array_equal(ours[name], ref[name]), name


@pytest.fixture(scope="module")
def s3_shards(s3: S3) -> str:
    """make-shards straight to s3 (credentials and endpoint from the standard environment variables)."""
    import cli

    url = s3.url("shards")
    cli.main(["make-shards", "fashion-mnist", "--out", url, "--shard-size", "128", "--limit", "300", "--seed", "0"])
    return url


def _stage1(shards: str | Path, base: Path, out: str | Path, loader_workers: int = 0) -> None:
    """Stage 1 in this process with the settings of STAGE1."""
    cache_targets(CacheConfig(shards=str(shards), base_model=str(base), out=str(out), views=2, topk=4, chunk_rows=64,
                              batch_size=32, codec="fp32", loader_workers=loader_workers))


@pytest.fixture(scope="module")
def local_store(fmnist_shards: Path, pico_base: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("s3ref") / "local.zarr"
    _stage1(fmnist_shards, pico_base, out)
    return out


@pytest.fixture(scope="module")
def s3_store(s3: S3, s3_shards: str, pico_base: Path) -> str:
    url = s3.url("store.zarr")
    _stage1(s3_shards, pico_base, url, loader_workers=1)  # a forked decode process reads the s3 shards too
    return url


def test_make_shards_to_s3_writes_the_local_bytes(s3_shards: str, fmnist_shards: Path) -> None:
    ours, local = load_manifest(s3_shards), load_manifest(fmnist_shards)
    assert ours.fingerprint == local.fingerprint and ours.shards == local.shards  # same tars, byte for byte


def test_index_shards_on_s3(s3: S3, fmnist_shards: Path, capfd: pytest.CaptureFixture[str]) -> None:
    url = s3.url("indexed")
    fs, path = storage.filesystem(url)
    for tar in sorted(fmnist_shards.glob("*.tar")):
        fs.put_file(str(tar), f"{path}/{tar.name}")
    proc = tec_in_process(capfd, "index-shards", url)
    assert proc.returncode == 0, proc.stderr
    assert load_manifest(url).fingerprint == load_manifest(fmnist_shards).fingerprint


def test_shards_stream_in_ranged_blocks_with_skip_by_row(s3_shards: str, fmnist_shards: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    from s3fs.core import S3File

    ranges: list[tuple[int, int]] = []
    fetch = S3File._fetch_range

    def logged(self: S3File, start: int, end: int) -> bytes:
        ranges.append((start, end))
        return fetch(self, start, end)

    monkeypatch.setattr(S3File, "_fetch_range", logged)
    monkeypatch.setattr(storage, "READ_BLOCK_BYTES", 16 << 10)
    shard = load_manifest(s3_shards).shards[1]
    size = storage.filesystem(s3_shards)[0].size(storage.join(s3_shards, shard.name))
    wanted = set(range(shard.first_row + 5, shard.first_row + shard.count, 7))
    ours = list(iter_shard_fields(s3_shards, shard, 0, 300, wanted))
    assert ours == list(iter_shard_fields(fmnist_shards, shard, 0, 300, wanted))
    assert sum(fields is not None for _, _, fields in ours) == len(wanted)
    # readahead fetches a block plus the read that crossed into it: bounded by the block, not by the shard
    assert len(ranges) > 4 and max(end - start for start, end in ranges) <= 2 * (16 << 10) < size / 4
    assert sum(end - start for start, end in ranges) <= size + 2 * (16 << 10)  # one pass, front to back


def test_cache_targets_s3_to_s3_equals_local(s3_store: str, local_store: Path) -> None:
    _assert_same_store(s3_store, local_store)


def test_dask_workers_write_the_s3_store_with_storage_options(s3: S3, s3_shards: str, pico_base: Path,
                                                              local_store: Path, capfd: pytest.CaptureFixture[str],
                                                              no_credentials_in_env: None) -> None:
    """Credentials as --storage-option only (none in the environment the workers start with): they reach the
    dask workers with each task, and neither the store nor the output holds the secret."""
    url = s3.url("dask.zarr")
    options = ["--storage-option", f"key={s3.key}", "--storage-option", f"secret={s3.secret}",
               "--storage-option", f"endpoint_url={s3.endpoint}", "--storage-option", "client_kwargs="
               '{"region_name": "us-east-1"}']
    proc = tec_in_process(capfd, "cache-targets", "--shards", s3_shards, "--base-model", str(pico_base), "--out", url,
                          *STAGE1, "--workers", "2", *options)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _assert_same_store(url, local_store)
    assert s3.secret not in proc.stdout + proc.stderr
    assert s3.secret.encode() not in s3.objects("dask.zarr")


def test_verify_and_inspect_an_s3_store(s3_store: str, s3_shards: str, capfd: pytest.CaptureFixture[str]) -> None:
    proc = tec_in_process(capfd, "verify", s3_store, "--shards", s3_shards, "--recompute", "4")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    proc = tec_in_process(capfd, "inspect", s3_store, "--json")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["tasks_done"] == summary["tasks_total"] == 10 and summary["arrays"]["features"]["stored_bytes"] > 0


def _pretrain(capfd: pytest.CaptureFixture[str], shards: str | Path, targets: str | Path, out: Path,
              *extra: str) -> str:
    """`tec pretrain` in this process (one forked loader worker); returns its output."""
    proc = tec_in_process(capfd, "pretrain", "--targets", str(targets), "--shards", str(shards), "--out", str(out),
                          "--epochs", "2", "--limit", "192", "--batch-size", "32", "--blr", "1e-3",
                          "--warmup-epochs", "0.5", "--seed", "3", "--deterministic", "--log-every", "1",
                          "--workers", "1", *extra)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def _losses(run: Path) -> list[list[str]]:
    """metrics.csv without its timing columns (img_per_s, data_wait)."""
    rows = [line.split(",") for line in (run / "metrics.csv").read_text().splitlines()]
    return [row[:-2] for row in rows]


def test_pretrain_streaming_from_s3_equals_local(s3: S3, s3_store: str, s3_shards: str, local_store: Path,
                                                 fmnist_shards: Path, tmp_path: Path,
                                                 capfd: pytest.CaptureFixture[str], no_credentials_in_env: None
                                                 ) -> None:
    """Shards and targets streamed from s3 by a loader worker, credentials from the YAML key storage_options only."""
    local, remote = tmp_path / "local", tmp_path / "s3"
    _pretrain(capfd, fmnist_shards, local_store, local)
    config = tmp_path / "s3.yaml"
    config.write_text(json.dumps({"storage_options": {"key": s3.key, "secret": s3.secret,
                                                      "endpoint_url": s3.endpoint,
                                                      "client_kwargs": {"region_name": "us-east-1"}}}))
    output = _pretrain(capfd, s3_shards, s3_store, remote, "--config", str(config))
    assert s3.secret not in output
    assert _losses(remote) == _losses(local) and len(_losses(local)) == 13  # step for step: 2 epochs x 6 steps
    a, b = (torch.load(run / "checkpoint.pth", weights_only=True)["model"] for run in (local, remote))
    assert all(torch.equal(a[k], b[k]) for k in a)
    for path in remote.rglob("*"):
        assert not path.is_file() or s3.secret.encode() not in path.read_bytes(), path


def test_sigkill_then_rerun_on_s3_gives_identical_store(s3: S3, s3_shards: str, pico_base: Path,
                                                         local_store: Path) -> None:
    url = s3.url("killed.zarr")
    args = ["cache-targets", "--shards", s3_shards, "--base-model", str(pico_base), "--out", url, *STAGE1,
            "--loader-workers", "0"]
    proc = subprocess.Popen([sys.executable, "-c", SLOW_WRITER, "0.3", *args], stderr=subprocess.DEVNULL,
                            start_new_session=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    kill_half_way(proc, url, poll_s=0.5)  # 0.3 s per task: a look every 0.5 s still finds it half-way
    _stage1(s3_shards, pico_base, url)  # the rerun, in this process
    _assert_same_store(url, local_store)


@pytest.fixture()
def fresh_filesystems() -> Iterator[None]:
    """fsspec caches filesystem instances (credentials included): a changed environment needs new ones."""
    S3FileSystem.clear_instance_cache()
    yield
    S3FileSystem.clear_instance_cache()


BAD_INPUTS = {
    # case: (environment changes, extra flags, what the line names besides the URL)
    "missing bucket": ({}, [], "does not exist"),
    "wrong credentials": ({"AWS_SECRET_ACCESS_KEY": "WrongSecret-0123456789"}, [], "access denied"),
    "wrong secret option": ({}, ["--storage-option", "key={key}", "--storage-option", "secret=WrongSecret-0123456789"],
                            "access denied"),
    "unreachable endpoint": ({"AWS_ENDPOINT_URL": "http://127.0.0.1:{dead}", "AWS_MAX_ATTEMPTS": "1"}, [],
                             "cannot reach"),
}


@pytest.mark.parametrize(("case", "side"), [
    ("missing bucket", "shards"), ("missing bucket", "store"), ("missing bucket", "make-shards"),
    ("wrong credentials", "shards"), ("wrong secret option", "make-shards"),
    ("unreachable endpoint", "shards"), ("unreachable endpoint", "make-shards"),
])  # the environment and options are shared by every URL of a command: only a missing bucket can hit one alone
def test_bad_location_is_one_line_naming_the_url(case: str, side: str, s3: S3, s3_shards: str, pico_base: Path,
                                                 tmp_path: Path, capfd: pytest.CaptureFixture[str],
                                                 monkeypatch: pytest.MonkeyPatch, fresh_filesystems: None) -> None:
    env, flags, says = BAD_INPUTS[case]
    bucket = "no-such-bucket" if case == "missing bucket" else BUCKET
    bad, local_out = f"s3://{bucket}/bad-{side}", tmp_path / "out"
    args = {"shards": ["cache-targets", "--shards", bad, "--base-model", str(pico_base), "--out", str(local_out)],
            "store": ["cache-targets", "--shards", s3_shards, "--base-model", str(pico_base), "--out", bad],
            "make-shards": ["make-shards", "fashion-mnist", "--limit", "10", "--out", bad]}[side]
    dead = free_port()
    for name, value in env.items():
        monkeypatch.setenv(name, value.format(dead=dead))
    proc = tec_in_process(capfd, *args, *[flag.format(key=s3.key) for flag in flags])
    assert_one_line_error(proc)
    assert bad in proc.stderr and says in proc.stderr, proc.stderr
    assert "WrongSecret" not in proc.stderr + proc.stdout and s3.secret not in proc.stderr + proc.stdout
    assert not local_out.exists()
    monkeypatch.undo()
    storage.use({})
    S3FileSystem.clear_instance_cache()  # the cached instance holds the bad environment's credentials
    fs, _ = storage.filesystem(s3.url(""))
    assert not fs.exists(f"{BUCKET}/bad-{side}")  # nothing created
