"""Every command option's default is its config dataclass field's default: one source, no drift (issue 17)."""

from __future__ import annotations

import dataclasses

import click
import pytest

import cli
from tec_pipeline.config import field_default, option_factory
from tec_pipeline.eval.finetune import FinetuneConfig
from tec_pipeline.eval.frozen import FrozenEvalConfig
from tec_pipeline.stage1 import CacheConfig
from tec_pipeline.train.mae_pretrain import MAEPretrainConfig
from tec_pipeline.train.pretrain import PretrainConfig

CONFIGS: dict[str, type] = {
    "cache-targets": CacheConfig,
    "mae-pretrain": MAEPretrainConfig,
    "pretrain": PretrainConfig,
    "linprobe": FrozenEvalConfig,
    "knn": FrozenEvalConfig,
    "frozen-eval": FrozenEvalConfig,
    "finetune": FinetuneConfig,
}
# Commands whose options are handed to a library function one by one: their click defaults are the only ones.
WITHOUT_CONFIG = {"make-shards", "index-shards", "inspect", "verify", "convert", "bench", "report"}
# Options that steer the command rather than fill its config (besides those that never reach the command
# function, expose_value=False, such as --config).
NOT_FIELDS = {"repair", "json_prefix", "export"}


def _command(name: str) -> click.Command:
    command = cli.tec.get_command(click.Context(cli.tec), name)
    assert command is not None
    return command


def test_every_command_is_classified() -> None:
    assert set(CONFIGS) | WITHOUT_CONFIG == set(cli.COMMANDS) and not set(CONFIGS) & WITHOUT_CONFIG


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_option_defaults_are_the_config_defaults(name: str) -> None:
    config = CONFIGS[name]
    fields = {f.name for f in dataclasses.fields(config)}
    for param in _command(name).params:
        if param.name in NOT_FIELDS or not param.expose_value:
            continue
        assert param.name in fields, f"tec {name} {param.opts[0]} fills no {config.__name__} field: it is ignored"
        default = field_default(config, param.name)
        if default is dataclasses.MISSING:
            assert param.required, f"tec {name} {param.opts[0]} is optional but {config.__name__} needs it"
        else:
            assert not param.required and param.default == default, (name, param.name, param.default, default)


def test_option_factory_refuses_a_second_source() -> None:
    option = option_factory(PretrainConfig)
    with pytest.raises(TypeError, match="set it there"):
        option("--epochs", default=3)
    with pytest.raises(TypeError, match="has no field"):
        option("--no-such-setting")
    with pytest.raises(TypeError, match="no default"):
        option("--shards")  # required in PretrainConfig, so the option must say required=True
