"""Where shards and stores live: a local path, a `file://` URL or any fsspec URL (`s3://bucket/prefix`, …).

Credentials and endpoints come the standard way: the usual environment variables (AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, AWS_ENDPOINT_URL, AWS_PROFILE, …, read by the fsspec backend itself) and
fsspec `storage_options` (`--storage-option KEY=VALUE`, or the YAML key `storage_options` of `--config`). The
options are process state, never part of a command's config: so they are never saved with a store's attributes,
a run's config.yaml or a log line. Child processes get them as follows: DataLoader workers fork with them,
torchrun ranks parse the same command line, and dask tasks carry them as an argument (`current()` / `use()`).
"""

from __future__ import annotations

import json
import os
from typing import IO, Any

import click
import fsspec

from tec_pipeline.errors import UserError

# option names whose values are credentials: always kept as strings, and masked in any message we print
SECRET_KEYS = frozenset({"key", "secret", "token", "password", "session_token", "aws_access_key_id",
                         "aws_secret_access_key", "aws_session_token", "account_key", "sas_token"})
SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID")
# sequential reads of a shard: one ranged GET per block, so a shard is streamed, never downloaded whole
READ_BLOCK_BYTES = 8 << 20
BUCKET_PROTOCOLS = frozenset({"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "oss"})
_OPTIONS: dict[str, Any] = {}


def is_url(location: str | os.PathLike[str]) -> bool:
    """An fsspec URL other than file:// (those are read through fsspec; local paths through the OS)."""
    text = os.fspath(location)
    return "://" in text and not text.startswith("file://")


def local_path(location: str | os.PathLike[str]) -> str:
    return os.fspath(location).removeprefix("file://")


def join(base: str | os.PathLike[str], name: str) -> str:
    """`base`/`name` for a path or a URL (pathlib would fold a URL's '//')."""
    text = os.fspath(base)
    return f"{text.rstrip('/')}/{name}" if is_url(text) else os.path.join(local_path(text), name)


def basename(location: str | os.PathLike[str]) -> str:
    return os.fspath(location).rstrip("/").rsplit("/", 1)[-1]


class StorageOptions(dict):
    """Storage options whose repr names the keys only: dask prints a failed task's arguments in its logs."""

    def __repr__(self) -> str:
        return f"StorageOptions({sorted(self)})"


def use(options: dict[str, Any]) -> None:
    """Set this process's storage options (replacing earlier ones)."""
    _OPTIONS.clear()
    _OPTIONS.update(options)


def current() -> StorageOptions:
    """This process's storage options (a copy, e.g. to hand to a dask task)."""
    return StorageOptions(_OPTIONS)


def filesystem(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path inside it) of an fsspec URL, with this process's storage options."""
    return fsspec.core.url_to_fs(url, **_OPTIONS)


def parse_option(item: str | tuple[str, Any]) -> tuple[str, Any]:
    """KEY=VALUE (or a (key, value) pair from YAML) as a storage option. VALUE is JSON when it parses as a
    number, boolean, list or object (`anon=true`, `config_kwargs={"retries": {"max_attempts": 1}}`), else a
    string; credentials always stay strings."""
    if isinstance(item, tuple):
        return str(item[0]), item[1]
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise click.BadParameter(f"expected KEY=VALUE, got {redact(item)!r}", param_hint="--storage-option")
    if key in SECRET_KEYS:
        return key, value
    try:
        parsed = json.loads(value)
    except ValueError:
        return key, value
    return key, value if isinstance(parsed, str) else parsed


def _apply(ctx: click.Context, _param: click.Parameter, value: Any) -> None:
    items = value.items() if isinstance(value, dict) else (value or ())  # a dict: the YAML key storage_options
    use(dict(parse_option(tuple(item) if isinstance(item, list) else item) for item in items))


def storage_options_option(f: Any) -> Any:
    """Adds `--storage-option KEY=VALUE` (repeatable; YAML: `storage_options: {KEY: VALUE}`)."""
    return click.option(
        "--storage-option", "storage_options", multiple=True, type=click.UNPROCESSED, expose_value=False,
        callback=_apply, metavar="KEY=VALUE",
        help="fsspec storage option for s3:// (or other URL) shards and stores, e.g. endpoint_url=http://host:9000; "
             "repeatable. Credentials: the usual AWS_* environment variables, or key=/secret=.",
    )(f)


def redact(text: str) -> str:
    """`text` with every credential we know of (storage options, AWS env vars) replaced by ***."""
    secrets = [str(v) for k, v in _OPTIONS.items() if k in SECRET_KEYS and v]
    secrets += [os.environ[name] for name in SECRET_ENV if os.environ.get(name)]
    # a very short value (a placeholder like "x") would mask unrelated letters of the URL: real keys are 16+
    for secret in sorted((v for v in secrets if len(v) >= 6), key=len, reverse=True):
        text = text.replace(secret, "***")
    return text


def _reason(e: Exception) -> str:
    detail = redact(str(e).splitlines()[0][:160]) if str(e) else ""
    return f"{e.__class__.__name__}{': ' + detail if detail else ''}"


def _as_tuple(protocol: str | tuple[str, ...]) -> tuple[str, ...]:
    return (protocol,) if isinstance(protocol, str) else tuple(protocol)


def check_location(url: str, flag: str) -> None:
    """UserError (one line naming the URL, never a credential) when an object-store URL cannot be used: the
    endpoint does not answer, the credentials are refused, or the bucket does not exist. Checked before any
    work or write, so a bad location leaves nothing behind. Local paths and memory:// pass."""
    if not is_url(url) or url.startswith("memory://"):
        return
    bucket = ""
    try:
        fs, path = filesystem(url)
        if set(_as_tuple(fs.protocol)) & BUCKET_PROTOCOLS:
            bucket = path.strip("/").split("/", 1)[0]
            fs.info(bucket)  # one HEAD: the bucket, the credentials and the endpoint at once
        else:
            fs.exists(path)
    except FileNotFoundError:
        raise UserError(f"{flag} {url}: bucket {bucket!r} does not exist; create it or fix the URL") from None
    except PermissionError as e:
        raise UserError(f"{flag} {url}: access denied ({_reason(e)}); check the credentials (AWS_ACCESS_KEY_ID / "
                        "AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or --storage-option key=... secret=...)") from None
    except Exception as e:  # noqa: BLE001 — any failed probe makes the URL unusable (endpoint down, DNS, TLS,
        # bad options, botocore's NoCredentialsError): say which, in one line
        if "Credential" not in e.__class__.__name__:
            raise _unreachable(flag, url, e) from None
        raise UserError(f"{flag} {url}: no usable credentials ({_reason(e)}); set AWS_ACCESS_KEY_ID and "
                        "AWS_SECRET_ACCESS_KEY (or AWS_PROFILE), or --storage-option key=... secret=...") from None


def _unreachable(flag: str, url: str, e: Exception) -> UserError:
    if isinstance(e, ImportError):
        return UserError(f"{flag} {url}: no fsspec backend for this URL ({e}); install it")
    return UserError(f"{flag} {url}: cannot reach the storage ({_reason(e)}); check endpoint_url / "
                     "AWS_ENDPOINT_URL and that the service answers")


def open_input(location: str | os.PathLike[str]) -> IO[bytes]:
    """A file opened for sequential reading: local files by the OS, URLs as ranged reads of READ_BLOCK_BYTES
    (seeking forward, as tarfile does over unwanted members, skips blocks without fetching them)."""
    if not is_url(location):
        return open(local_path(location), "rb")
    fs, path = filesystem(os.fspath(location))
    return fs.open(path, "rb", block_size=READ_BLOCK_BYTES, cache_type="readahead")


def read_bytes(location: str | os.PathLike[str]) -> bytes:
    if not is_url(location):
        with open(local_path(location), "rb") as f:
            return f.read()
    fs, path = filesystem(os.fspath(location))
    return fs.cat_file(path)


def write_bytes(location: str | os.PathLike[str], data: bytes) -> None:
    """Write a small file whole, atomically (a local temporary file renamed; an object PUT is atomic)."""
    if is_url(location):
        fs, path = filesystem(os.fspath(location))
        fs.pipe_file(path, data)
        return
    path = local_path(location)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def open_output(location: str | os.PathLike[str]) -> IO[bytes]:
    """A file opened for writing (an object is uploaded in parts as it is written, and appears on close)."""
    if not is_url(location):
        return open(local_path(location), "wb")
    fs, path = filesystem(os.fspath(location))
    return fs.open(path, "wb")


def list_files(location: str | os.PathLike[str], suffix: str) -> list[str]:
    """Names (not paths) of the files directly in `location` ending in `suffix`, sorted."""
    if not is_url(location):
        root = local_path(location)
        return sorted(n for n in os.listdir(root) if n.endswith(suffix) and os.path.isfile(os.path.join(root, n)))
    fs, path = filesystem(os.fspath(location))
    try:
        entries = fs.ls(path, detail=True)
    except FileNotFoundError:
        return []
    return sorted(basename(e["name"]) for e in entries if e["type"] == "file" and e["name"].endswith(suffix))


def remove(location: str | os.PathLike[str]) -> None:
    if is_url(location):
        fs, path = filesystem(os.fspath(location))
        fs.rm_file(path)
    else:
        os.unlink(local_path(location))
