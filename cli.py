"""`tec`: the command line. Wiring only: each command lives in its stage module under stages/.

Commands are imported lazily so that `tec --help` does not pay for importing torch.
"""

from __future__ import annotations

import importlib
import logging
import sys

import click

from tec_pipeline.errors import UserError

COMMANDS: dict[str, str] = {
    "make-shards": "stages.make_shards",
    "index-shards": "stages.make_shards:index_command",
    "mae-pretrain": "stages.mae_pretrain",
    "cache-targets": "stages.cache_targets",
    "inspect": "stages.inspect_store",
    "verify": "stages.inspect_store:verify_command",
    "pretrain": "stages.pretrain",
    "convert": "stages.convert",
    "linprobe": "stages.evaluate:linprobe_command",
    "knn": "stages.evaluate:knn_command",
    "finetune": "stages.evaluate:finetune_command",
    "bench": "stages.bench",
}


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS:
            return None
        module, _, attr = COMMANDS[name].partition(":")
        return getattr(importlib.import_module(module), attr or "command")


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
def tec(verbose: bool) -> None:
    """TEC pretraining as a two-stage offline target-caching pipeline."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(message)s")


def main(argv: list[str] | None = None) -> None:
    """Entry point: bad input ends with one line on stderr and exit code 2."""
    try:
        tec.main(args=argv, prog_name="tec", standalone_mode=False)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except UserError as e:
        click.echo(f"Error: {e}", err=True)
        sys.exit(2)
    except click.Abort:
        click.echo("Aborted.", err=True)
        sys.exit(130)
    except KeyboardInterrupt:
        click.echo("Interrupted.", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
