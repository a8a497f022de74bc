"""The ImageNet recipes (Makefile) carry the published hyperparameters (spec §4, §8): checked on dry runs."""

from __future__ import annotations

import shlex
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
COMMON_PRETRAIN = ["--batch-size 256", "--accum 2", "--blr 1.5e-4", "--warmup-epochs 40", "--weight-decay 0.05",
                   "--mask-ratio 0.75", "--last-layers 2"]
COMMON_FINETUNE = ["--weight-decay 0.05", "--drop-path 0.1", "--mixup 0.8", "--cutmix 1.0", "--smoothing 0.1",
                   "--reprob 0.25", "--aa rand-m9-mstd0.5-inc1"]
# recipe -> (base arch, k, tau, pretrain epochs, ft batch, ft accum, ft blr, layer decay, ft epochs, warm-up, min lr)
PUBLISHED = {
    "tec-b100-mae300": ("vit_base_patch16_224", 15, 1.8, 100, 128, 1, "5e-4", 0.65, 100, 5, "1e-6"),
    "tec-b300-mae": ("vit_base_patch16_224", 15, 1.8, 300, 128, 1, "5e-4", 0.65, 100, 20, "1e-6"),
    "tec-b800-mae": ("vit_base_patch16_224", 15, 1.8, 800, 128, 1, "5e-4", 0.55, 100, 20, "1e-6"),
    "tec-b300-ibot": ("vit_base_patch16_224", 9, 1.0, 300, 128, 1, "5e-4", 0.50, 100, 5, "1e-6"),
    "tec-b800-ibot": ("vit_base_patch16_224", 9, 1.0, 800, 128, 1, "5e-4", 0.55, 100, 20, "1e-6"),
    "tec-l300-mae": ("vit_large_patch16_224", 15, 1.4, 300, 64, 2, "1e-3", 0.65, 50, 5, "1e-5"),
}


@pytest.mark.parametrize("recipe", sorted(PUBLISHED))
def test_recipe_dry_run_prints_published_flags(recipe: str) -> None:
    arch, k, tau, epochs, ft_batch, ft_accum, ft_blr, decay, ft_epochs, warmup, min_lr = PUBLISHED[recipe]
    proc = subprocess.run(["make", "-n", f"imagenet-{recipe}", "DATA=/data/in1k", "BASE=/ckpt/base.pth", "GPUS=8"],
                          cwd=ROOT, capture_output=True, text=True, check=True)
    lines = proc.stdout.splitlines()
    cache = next(ln for ln in lines if " cache-targets " in ln)
    pretrain = next(ln for ln in lines if " pretrain " in ln)
    finetune = next(ln for ln in lines if " finetune " in ln)
    assert f"--base-arch {arch}" in cache and f"--topk {k}" in cache and "--base-model /ckpt/base.pth" in cache
    assert "--nproc_per_node 8" in pretrain
    for flag in [*COMMON_PRETRAIN[:-1], f"--epochs {epochs}", f"--att-tau {tau}", f"--topk {k}"]:
        assert flag in pretrain, (flag, pretrain)
    assert COMMON_PRETRAIN[-1] in cache
    for flag in [*COMMON_FINETUNE, f"--batch-size {ft_batch}", f"--accum {ft_accum}", f"--blr {ft_blr}",
                 f"--layer-decay {decay:.2f}", f"--epochs {ft_epochs}", f"--warmup-epochs {warmup}",
                 f"--min-lr {min_lr}"]:
        assert flag in finetune, (flag, finetune)
    assert any(" convert " in ln for ln in lines)


def _tec_invocations(lines: list[str]) -> list[list[str]]:
    """argv after `tec` / `cli.py` for every tec command a dry run prints."""
    calls = []
    for line in lines:
        argv = shlex.split(line)
        for i, token in enumerate(argv):
            if token.endswith(("/tec", "cli.py")) and i + 1 < len(argv):
                calls.append(argv[i + 1:])
                break
    return calls


def _check_against_cli(argv: list[str]) -> None:
    """Every flag a recipe passes is an option of that command, and its value converts to the option's type."""
    import click

    import cli

    name, rest = argv[0], argv[1:]
    command = cli.tec.get_command(click.Context(cli.tec), name)
    assert command is not None, f"recipe runs an unknown command {name!r}"
    options = {opt: p for p in command.params if isinstance(p, click.Option) for opt in (*p.opts, *p.secondary_opts)}
    i = 0
    while i < len(rest):
        token = rest[i]
        if not token.startswith("--"):
            i += 1
            continue
        flag, _, inline = token.partition("=")
        assert flag in options, f"tec {name} rejects {flag} (known: {', '.join(sorted(options))})"
        param = options[flag]
        if param.is_flag:
            i += 1
            continue
        value = inline or rest[i + 1]
        if not isinstance(param.type, click.Path):  # paths name the user's machine, not this one
            param.type.convert(value, param, None)  # raises click.BadParameter for a value the CLI refuses
        i += 1 if inline else 2


@pytest.mark.parametrize("recipe", sorted(PUBLISHED))
def test_recipe_commands_are_accepted_by_the_cli(recipe: str) -> None:
    proc = subprocess.run(["make", "-n", f"imagenet-{recipe}", "DATA=/data/in1k", "BASE=/ckpt/base.pth", "GPUS=8"],
                          cwd=ROOT, capture_output=True, text=True, check=True)
    calls = _tec_invocations(proc.stdout.replace("\\\n", " ").splitlines())  # join continued lines
    assert {c[0] for c in calls} >= {"cache-targets", "pretrain", "convert", "finetune"}, calls
    for argv in calls:
        _check_against_cli(argv)


def test_the_cli_check_rejects_an_unknown_flag() -> None:
    with pytest.raises(AssertionError, match="rejects --no-such-flag"):
        _check_against_cli(["pretrain", "--epochs", "3", "--no-such-flag", "1"])
    import click

    with pytest.raises(click.BadParameter):
        _check_against_cli(["pretrain", "--epochs", "three"])
