"""`tec inspect` and `tec verify`: what a target store holds, and whether it can be trusted."""

from __future__ import annotations

import json
import sys

import click

from tec_pipeline.config import config_option
from tec_pipeline.logs import progress_enabled
from tec_pipeline.storage import storage_options_option
from tec_pipeline.store.integrity import describe
from tec_pipeline.store.target_store import TargetStore
from tec_pipeline.store.verify import verify_store


def _mb(n: float | None) -> str:
    return "-" if n is None else f"{n / 1e6:.3f} MB" if n >= 1e5 else f"{n:,.0f} B"


def _summary_lines(d: dict) -> list[str]:
    attrs = d["attrs"]
    base = attrs["base_model"]
    lines = [
        f"store      {d['url']}  (format {d['format_version']}, codec {d['codec']})",
        f"views      {d['views']} x {d['rows']} rows, {d['chunk_rows']} rows per chunk",
        f"tasks      {d['tasks_done']} of {d['tasks_total']} done; {d['rows_done']} image-views; "
        f"{d['invalid_rows']} invalid (undecodable)",
        f"base model {base['arch']['name']} ({base['format']}) sha256 {base['sha256'][:16]} from {base['source']}",
        f"targets    k={attrs['targets']['k']}, last_layers={attrs['targets']['last_layers']}, "
        f"features {attrs['targets']['feature_normalisation']}",
        f"data       {attrs['data']['rows']} rows, fingerprint {attrs['data']['fingerprint'][:16]} ({attrs['data']['source']})",
        f"size       {_mb(d['stored_bytes'])} stored; {_mb(d['stored_bytes_per_image_view'])} per image-view",
        "array              stored/view     raw/view",
    ]
    for name, a in d["arrays"].items():
        lines.append(f"  {name:16s} {_mb(a['stored_bytes_per_image_view']):>12s} {_mb(a['raw_bytes_per_image_view']):>12s}")
    return lines


@click.command("inspect")
@config_option
@storage_options_option
@click.argument("store")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def command(store: str, as_json: bool) -> None:
    """Summarise a target store: views, rows, completeness, bytes per view, codec, base model, data."""
    description = describe(TargetStore.open(store))
    click.echo(json.dumps(description, indent=1, default=str) if as_json else "\n".join(_summary_lines(description)))


@click.command("verify")
@config_option
@storage_options_option
@click.argument("store")
@click.option("--shards", required=True, type=click.Path(), help="The shards (directory or URL) the store should belong to.")
@click.option("--recompute", default=0, show_default=True, type=click.IntRange(min=0),
              help="Recompute N random rows with the base model and compare.")
@click.option("--seed", default=0, show_default=True, type=int, help="Which rows --recompute picks.")
@click.option("--base-arch", default=None, help="Base architecture, if the checkpoint records none.")
@click.option("--base-model", default=None,
              help="The base-model checkpoint for --recompute (default: the recorded path; checked by sha256).")
def verify_command(store: str, shards: str, recompute: int, seed: int, base_arch: str | None,
                   base_model: str | None) -> None:
    """Check a store: every task done, chunks intact, fingerprint matches --shards, targets recompute. Exit 1 if not."""
    result = verify_store(store, shards, recompute, seed, base_arch, base_model, progress=progress_enabled())
    if result["invalid_rows"]:
        click.echo(f"invalid (undecodable) rows: {', '.join(result['invalid_rows'])}")
    if result["ok"]:
        click.echo(f"OK: {store} is complete and matches {shards}" + (f"; {recompute} rows recomputed" if recompute else ""))
        return
    for reason in result["reasons"]:
        click.echo(f"FAIL: {reason}", err=True)
    if result["repairable"]:
        click.echo("FIX: rerun the store's `tec cache-targets` command with --repair; it recomputes only the "
                   "damaged tasks", err=True)
    sys.exit(1)
