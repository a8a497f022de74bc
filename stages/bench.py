"""`tec bench`: what caching buys, measured side by side (README "Performance", design §7)."""

from __future__ import annotations

import click

from tec_pipeline.bench.report import check_writable, codec_table, markdown_table, run_bench, write_json
from tec_pipeline.config import config_option


@click.command("bench")
@config_option
@click.option("--preset", default="tiny", show_default=True, help="tiny, small or base (see README Performance).")
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda.")
@click.option("--json", "json_path", default=None, type=click.Path(dir_okay=False), help="Write every figure here.")
@click.option("--quick", is_flag=True, help="Smallest sizes, one repetition (checks that everything runs).")
@click.option("--reps", default=None, type=int, help="Repetitions of every timed comparison (default: the preset's).")
@click.option("--threads", default=None, type=int,
              help="torch intra-op threads (default on CPU: the cores the loader workers leave).")
@click.option("--work-dir", default=None, type=click.Path(file_okay=False),
              help="Where the temporary data, stores and runs go (default: the system temp directory).")
def command(preset: str, device: str, json_path: str | None, quick: bool, reps: int | None, threads: int | None,
            work_dir: str | None) -> None:
    """Measure cached vs online stage 2, stage 1 vs a bare forward, codecs, attention targets, memory."""
    if json_path:
        check_writable(json_path)  # before minutes of measuring, not after
    result = run_bench(preset, device, quick, threads, work_dir, reps)
    if json_path:
        write_json(result, json_path)
    click.echo(markdown_table(result))
    click.echo("")
    click.echo(codec_table(result))
    click.echo(f"\n{result['preset']} on {result['device']} in {result['seconds']:.0f} s"
               + (f" -> {json_path}" if json_path else ""))
