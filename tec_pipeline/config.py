"""Configuration: frozen dataclasses built once from YAML + command-line flags, saved beside every output.

A command's options are its config's fields, and their defaults are the fields' defaults (`option_factory`):
one source, so the command line and the library cannot drift apart. `--config FILE.yaml` supplies defaults for
those options (click's `default_map`), flags given on the command line override them, and the resolved
dataclass is written next to the output (`config.yaml` in a run, the `tec` attributes of a store).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click
import yaml

from tec_pipeline.errors import UserError

T = TypeVar("T")


def _load_yaml_defaults(ctx: click.Context, _param: click.Parameter, value: str | None) -> str | None:
    if value is None:
        return None
    path = Path(value)
    if not path.is_file():
        raise click.BadParameter(f"no such file: {value}", param_hint="--config")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise click.BadParameter(f"{value} is not valid YAML ({e.__class__.__name__})", param_hint="--config") from None
    if not isinstance(data, dict):
        raise click.BadParameter(f"{value} must hold a mapping of option names to values", param_hint="--config")
    known = {p.name for p in ctx.command.params}
    normalised = {str(k).replace("-", "_").replace(".", "_"): v for k, v in data.items()}
    unknown = sorted(set(normalised) - known)
    if unknown:
        raise click.BadParameter(f"unknown keys in {value}: {', '.join(unknown)}", param_hint="--config")
    # a mapping for a repeatable option (`storage_options: {endpoint_url: ...}`) becomes its [key, value] pairs
    repeatable = {p.name for p in ctx.command.params if getattr(p, "multiple", False)}
    normalised = {k: [list(kv) for kv in v.items()] if k in repeatable and isinstance(v, dict) else v
                  for k, v in normalised.items()}
    ctx.default_map = {**(ctx.default_map or {}), **normalised}
    return value


def config_option(f: Callable[..., Any]) -> Callable[..., Any]:
    """Adds `--config FILE.yaml`: YAML values become defaults, explicit flags still win."""
    return click.option(
        "--config", "config_file", type=click.Path(dir_okay=False), is_eager=True, expose_value=False,
        callback=_load_yaml_defaults, help="YAML file of option defaults (keys are option names).",
    )(f)


def field_default(cls: type, name: str) -> Any:
    """The default of field `name` of dataclass `cls` (dataclasses.MISSING when it has none)."""
    for f in dataclasses.fields(cls):
        if f.name == name:
            return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    raise TypeError(f"{cls.__name__} has no field {name!r} for its command-line option")


def option_factory(cls: type) -> Callable[..., Callable[[Callable[..., Any]], Callable[..., Any]]]:
    """`option = option_factory(PretrainConfig)`, then `@option("--epochs", type=int)`: a `click.option` whose
    default is the config field of the same name's, shown in --help unless it is None or False.

    Passing `default=` is refused, and so is an optional option whose field has no default: the dataclass is
    the only place a default lives.
    """

    def option(*decls: str, **kwargs: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        if "default" in kwargs:
            raise TypeError(f"{decls[0]}: the default comes from {cls.__name__}; set it there")
        name = click.Option(list(decls)).name or ""
        default = field_default(cls, name)
        if default is dataclasses.MISSING:
            if not kwargs.get("required"):
                raise TypeError(f"{decls[0]} is optional but {cls.__name__}.{name} has no default")
            return click.option(*decls, **kwargs)
        kwargs.setdefault("show_default", default is not None and default is not False)
        return click.option(*decls, default=default, **kwargs)

    return option


def from_options(cls: type[T], options: dict[str, Any], **extra: Any) -> T:
    """Build the frozen config `cls` from click's keyword arguments (fields not in `options` keep defaults)."""
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    values = {k: v for k, v in {**options, **extra}.items() if k in names}
    return cls(**values)


def to_plain(obj: Any) -> Any:
    """Dataclasses, paths and tuples as plain YAML/JSON-safe values."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {str(k): to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    return obj


def save_config(config: Any, path: str | os.PathLike[str]) -> None:
    """Write the resolved config as YAML, atomically."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(yaml.safe_dump(to_plain(config), sort_keys=False))
    os.replace(tmp, path)


def require(condition: bool, message: str) -> None:
    """Raise UserError(message) unless `condition`: for checks on user input in library code."""
    if not condition:
        raise UserError(message)
