"""Every `tec` command refuses bad input with one line on stderr and exit code 2, never a traceback (§5).

One parametrised test over all commands of `cli.COMMANDS` × three kinds of bad input: a missing required
argument, a path that does not exist, an invalid value. Run in-process (`cli.main`), so a crash surfaces as
the exception itself. A refusal also leaves no output behind.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import cli

KINDS = ("missing argument", "nonexistent path", "invalid value")
OUT = "out"  # every case writes (if it wrongly writes at all) under tmp_path / OUT


def _cases(shards: str, ckpt: str, missing: str, out: str) -> dict[str, dict[str, list[str]]]:
    """command -> kind -> argv. A kind a command cannot have (no required argument) is left out."""
    frozen = ["--checkpoint", ckpt, "--train-shards", shards, "--test-shards", shards]
    return {
        "make-shards": {
            "missing argument": ["make-shards", "--out", out],
            "nonexistent path": ["make-shards", f"imagefolder:{missing}", "--out", out],
            "invalid value": ["make-shards", "fashion-mnist", "--out", out, "--shard-size", "0"],
        },
        "index-shards": {
            "missing argument": ["index-shards"],
            "nonexistent path": ["index-shards", missing],
            "invalid value": ["index-shards", ckpt],  # a file, not a directory
        },
        "mae-pretrain": {
            "missing argument": ["mae-pretrain", "--shards", shards],
            "nonexistent path": ["mae-pretrain", "--shards", missing, "--out", out],
            "invalid value": ["mae-pretrain", "--shards", shards, "--out", out, "--mask-ratio", "1.5"],
        },
        "cache-targets": {
            "missing argument": ["cache-targets", "--shards", shards, "--out", out],
            "nonexistent path": ["cache-targets", "--shards", shards, "--base-model", missing, "--out", out],
            "invalid value": ["cache-targets", "--shards", shards, "--base-model", ckpt, "--out", out,
                              "--codec", "bf12"],
        },
        "inspect": {
            "missing argument": ["inspect"],
            "nonexistent path": ["inspect", missing],
            "invalid value": ["inspect", ckpt],  # a checkpoint file, not a store
        },
        "verify": {
            "missing argument": ["verify", missing],
            "nonexistent path": ["verify", missing, "--shards", shards],
            "invalid value": ["verify", missing, "--shards", shards, "--recompute", "-1"],
        },
        "pretrain": {
            "missing argument": ["pretrain", "--shards", shards, "--base-model", ckpt],
            "nonexistent path": ["pretrain", "--shards", shards, "--targets", missing, "--out", out],
            "invalid value": ["pretrain", "--shards", shards, "--base-model", ckpt, "--out", out,
                              "--model", "vit_gigantic"],
        },
        "convert": {
            "missing argument": ["convert", ckpt],
            "nonexistent path": ["convert", missing, "--out", f"{out}.safetensors"],
            "invalid value": ["convert", ckpt, "--out", f"{out}.pth"],  # exports are safetensors
        },
        "linprobe": {
            "missing argument": ["linprobe", "--checkpoint", ckpt, "--train-shards", shards],
            "nonexistent path": ["linprobe", "--checkpoint", missing, *frozen[2:]],
            "invalid value": ["linprobe", *frozen, "--batch-size", "0"],
        },
        "knn": {
            "missing argument": ["knn", "--checkpoint", ckpt, "--train-shards", shards],
            "nonexistent path": ["knn", *frozen[:2], "--train-shards", missing, "--test-shards", shards],
            "invalid value": ["knn", *frozen, "--k", "0"],
        },
        "frozen-eval": {
            "missing argument": ["frozen-eval", "--checkpoint", ckpt, "--test-shards", shards],
            "nonexistent path": ["frozen-eval", *frozen[:2], "--train-shards", shards, "--test-shards", missing],
            "invalid value": ["frozen-eval", *frozen, "--temperature", "0"],
        },
        "finetune": {
            "missing argument": ["finetune", *frozen],
            "nonexistent path": ["finetune", "--checkpoint", missing, *frozen[2:], "--out", out],
            "invalid value": ["finetune", *frozen, "--out", out, "--epochs", "0"],
        },
        "bench": {  # no required argument or input path
            "invalid value": ["bench", "--preset", "enormous"],
        },
        "report": {
            "missing argument": ["report"],
            "nonexistent path": ["report", missing],
            "invalid value": ["report", shards, "--views", "0"],
        },
    }


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Valid shards of a few generated images: bad input must be what is refused, not the data."""
    from tec_pipeline.data.writing import write_shards

    root = tmp_path_factory.mktemp("cli_errors")
    rng = np.random.default_rng(0)
    for i in range(4):
        classdir = root / "images" / f"c{i % 2}"
        classdir.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(classdir / f"{i}.png")
    write_shards(f"imagefolder:{root / 'images'}", root / "shards", progress=False)
    return root / "shards"


PARAMS = [(command, kind) for command, kinds in _cases("S", "C", "M", "O").items() for kind in kinds]


def test_every_command_has_bad_input_cases() -> None:
    assert set(_cases("S", "C", "M", "O")) == set(cli.COMMANDS)


@pytest.mark.parametrize(("command", "kind"), PARAMS, ids=[f"{c}-{k.split()[0]}" for c, k in PARAMS])
def test_bad_input_gives_one_line_and_exit_2(command: str, kind: str, shards: Path, pico_base: Path,
                                             tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    module = cli.COMMANDS[command].partition(":")[0]
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{module} is not written yet")
    missing = tmp_path / "does not exist"
    paths = (str(shards), str(pico_base), str(missing), str(tmp_path / OUT))
    argv = _cases(*paths)[command][kind]
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    captured = capsys.readouterr()
    assert info.value.code == 2, captured.err
    assert captured.err.startswith("Error: ") and captured.err.count("\n") == 1, captured.err
    assert "Traceback" not in captured.err and captured.out == "", captured
    assert not list(tmp_path.glob(f"{OUT}*")) and not missing.exists(), "a refused command left output behind"


@pytest.mark.parametrize("command", sorted(cli.COMMANDS))
def test_every_command_accepts_a_config_file(command: str) -> None:
    import click

    cmd = cli.tec.get_command(click.Context(cli.tec), command)
    assert "--config" in {opt for p in cmd.params for opt in p.opts}, f"tec {command} has no --config"


def test_config_file_supplies_an_argument_and_an_option(shards: Path, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    """`tec verify --config f.yaml` takes STORE's --shards from the file: the refusal names the file's store."""
    config = tmp_path / "verify.yaml"
    missing = tmp_path / "no-such-store.zarr"
    config.write_text(f"shards: {shards}\n")
    with pytest.raises(SystemExit) as e:
        cli.main(["verify", "--config", str(config), str(missing)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and str(missing) in err and "--shards" not in err, err  # --shards came from YAML
