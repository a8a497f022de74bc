"""`tec`: the command line. Wiring only: each command lives in its stage module under stages/.

Commands are imported lazily so that `tec --help` does not pay for importing torch.
"""

from __future__ import annotations

import importlib
import sys

import click

from tec_pipeline.errors import UserError, user_message
from tec_pipeline.logs import configure_logging
from tec_pipeline.outputs import WRITE_ERRNOS, write_failure

# Commands in pipeline order, grouped as `tec --help` shows them: data → base model → stage 1 → stage 2 →
# export and evaluation → measurement. Values: "module[:attribute]" (default attribute `command`).
COMMAND_GROUPS: dict[str, dict[str, str]] = {
    "1. Data": {
        "make-shards": "stages.make_shards",
        "index-shards": "stages.make_shards:index_command",
    },
    "2. Base model (when you have none)": {
        "mae-pretrain": "stages.mae_pretrain",
    },
    "3. Stage 1: cache the base model's targets": {
        "cache-targets": "stages.cache_targets",
        "inspect": "stages.inspect_store",
        "verify": "stages.inspect_store:verify_command",
    },
    "4. Stage 2: train a TEC student": {
        "pretrain": "stages.pretrain",
    },
    "5. Export and evaluate": {
        "convert": "stages.convert",
        "linprobe": "stages.evaluate:linprobe_command",
        "knn": "stages.evaluate:knn_command",
        "frozen-eval": "stages.evaluate:frozen_eval_command",
        "finetune": "stages.evaluate:finetune_command",
    },
    "6. Measure and report": {
        "bench": "stages.bench",
        "report": "stages.report",
    },
}
COMMANDS: dict[str, str] = {name: target for group in COMMAND_GROUPS.values() for name, target in group.items()}
# one-line help shown by `tec --help` without importing every stage (and torch)
COMMAND_HELP: dict[str, str] = {
    "make-shards": "Write images as shuffled WebDataset shards + manifest.",
    "index-shards": "Write the manifest for existing WebDataset shards.",
    "mae-pretrain": "Train a plain MAE base model from scratch.",
    "cache-targets": "Cache the base model's targets in a Zarr store.",
    "inspect": "Summarise a target store.",
    "verify": "Check a target store against its shards and base model.",
    "pretrain": "Train a TEC student from cached targets (or online).",
    "convert": "Export an encoder as timm VisionTransformer weights (safetensors).",
    "linprobe": "Linear probe of a frozen encoder.",
    "knn": "kNN classification with a frozen encoder.",
    "frozen-eval": "Linear probe and kNN from one feature extraction.",
    "finetune": "Fine-tune an encoder end to end.",
    "bench": "Measure what caching buys, side by side.",
    "report": "Write the reproduction report of a `make reproduce` run.",
}


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)  # pipeline order, not alphabetical

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS:
            return None
        module, _, attr = COMMANDS[name].partition(":")
        return getattr(importlib.import_module(module), attr or "command")

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        for title, group in COMMAND_GROUPS.items():
            with formatter.section(title):
                formatter.write_dl([(name, COMMAND_HELP[name]) for name in group])


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
def tec(verbose: bool) -> None:
    """TEC pretraining as a two-stage offline target-caching pipeline.

    Start with `make-shards`, then `cache-targets` with your base model (or `mae-pretrain` one first), then
    `pretrain --targets STORE`; `convert` exports the student for timm. `tec COMMAND --help` for each.
    """
    configure_logging(verbose)


def _one_line(message: str) -> str:
    return " ".join(message.split())


def _usage_error_line(e: click.UsageError) -> str:
    """click prints usage, a hint and the error on four lines; we print the error and the hint on one."""
    hint = f" (see '{e.ctx.command_path} --help')" if e.ctx is not None else ""
    return f"Error: {_one_line(e.format_message())}{hint}"


def main(argv: list[str] | None = None) -> None:
    """Entry point: bad input ends with one line on stderr and exit code 2."""
    try:
        tec.main(args=argv, prog_name="tec", standalone_mode=False)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except click.UsageError as e:
        click.echo(_usage_error_line(e), err=True)
        sys.exit(e.exit_code)
    except click.ClickException as e:
        click.echo(f"Error: {_one_line(e.format_message())}", err=True)
        sys.exit(e.exit_code)
    except UserError as e:
        click.echo(f"Error: {_one_line(user_message(e))}", err=True)
        sys.exit(2)
    except OSError as e:
        if e.errno not in WRITE_ERRNOS:  # a write the destination refused is the user's to fix; others are bugs
            raise
        click.echo(f"Error: {_one_line(str(write_failure(e, 'the output', 'output written before it is kept')))}",
                   err=True)
        sys.exit(2)
    except click.Abort:
        click.echo("Aborted.", err=True)
        sys.exit(130)
    except KeyboardInterrupt:
        click.echo("Interrupted.", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
