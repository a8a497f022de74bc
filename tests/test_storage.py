"""Locations and storage options (tec_pipeline/storage.py), without a server: the S3 end to end is test_s3.py."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from tec_pipeline import storage
from tec_pipeline.config import config_option
from tec_pipeline.data.shards import index_shards, iter_samples, load_manifest
from tec_pipeline.data.writing import write_shards
from tests.conftest import needs_fashion_mnist


@pytest.fixture(autouse=True)
def _reset_options() -> Iterator[None]:
    yield
    storage.use({})


@pytest.mark.parametrize(("item", "expected"), [
    ("endpoint_url=http://127.0.0.1:9000", ("endpoint_url", "http://127.0.0.1:9000")),
    ("anon=true", ("anon", True)),
    ('client_kwargs={"region_name": "eu-west-1"}', ("client_kwargs", {"region_name": "eu-west-1"})),
    ("default_block_size=1048576", ("default_block_size", 1048576)),
    ("secret=12345", ("secret", "12345")),  # a credential is never turned into a number
    ("key=true", ("key", "true")),
    ("profile=a=b", ("profile", "a=b")),
])
def test_storage_option_values(item: str, expected: tuple[str, object]) -> None:
    assert storage.parse_option(item) == expected


def test_a_storage_option_without_a_value_is_a_usage_error() -> None:
    with pytest.raises(click.BadParameter, match="KEY=VALUE"):
        storage.parse_option("endpoint_url")


@click.command()
@config_option
@storage.storage_options_option
def _show() -> None:
    click.echo(repr(sorted(storage.current().items())))


def test_yaml_storage_options_and_flags(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("storage_options:\n  endpoint_url: http://minio:9000\n  anon: true\n"
                      "  client_kwargs: {region_name: us-east-1}\n")
    out = CliRunner().invoke(_show, ["--config", str(config)])
    assert out.exit_code == 0, out.output
    assert out.output.strip() == repr([("anon", True), ("client_kwargs", {"region_name": "us-east-1"}),
                                       ("endpoint_url", "http://minio:9000")])
    out = CliRunner().invoke(_show, ["--config", str(config), "--storage-option", "anon=false"])
    assert out.output.strip() == repr([("anon", False)])  # flags replace the YAML's mapping


def test_credentials_are_masked_in_messages_and_reprs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "env-secret-value")
    storage.use({"secret": "option-secret-value", "endpoint_url": "http://host:1"})
    text = storage.redact("failed with option-secret-value and env-secret-value at http://host:1")
    assert text == "failed with *** and *** at http://host:1"
    assert "option-secret-value" not in repr(storage.current()) and "secret" in repr(storage.current())


def test_join_keeps_a_url_a_url() -> None:
    assert storage.join("s3://bucket/prefix/", "train-000000.tar") == "s3://bucket/prefix/train-000000.tar"
    assert storage.join("file:///data/shards", "m.json") == "/data/shards/m.json"
    assert storage.join("data/shards", "m.json") == "data/shards/m.json"


@needs_fashion_mnist
def test_shards_on_an_fsspec_url_read_as_locally(fmnist_shards: Path) -> None:
    url = "memory://tec-test-storage/shards"
    manifest = write_shards("fashion-mnist", url, "train", shard_size=128, limit=300, seed=0, progress=False)
    assert manifest.fingerprint == load_manifest(fmnist_shards).fingerprint  # the same tar bytes
    ours, local = list(iter_samples(url, 100, 140)), list(iter_samples(fmnist_shards, 100, 140))
    assert [(s.row, s.key, s.label, s.image.tobytes()) for s in ours] == \
        [(s.row, s.key, s.label, s.image.tobytes()) for s in local]
    assert index_shards(url).fingerprint == manifest.fingerprint
