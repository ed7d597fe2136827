"""The ``collapselab`` command: parses, validates, calls the library (DESIGN.md "Contracts").

Exit codes: 0 success, 2 invalid input (one line naming the field), 1 failure during a run.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import click

from .errors import CollapselabError


def _fail(message: str, code: int) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


class _Group(click.Group):
    """Turn user errors into one line and exit code 2, everywhere."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except CollapselabError as exc:
            _fail(str(exc), 2)
        except click.UsageError as exc:
            _fail(exc.format_message(), 2)


@click.group(cls=_Group)
@click.version_option(package_name="collapselab")
def main():
    """Recursive retraining of diffusion models on fresh + synthetic data (arXiv 2602.16601)."""


def _setup_logging(path: Path) -> None:
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    logger = logging.getLogger("collapselab")
    logger.handlers[:] = [handler]
    logger.setLevel(logging.INFO)


@main.command()
@click.argument("source")
@click.option("--out", "out", type=click.Path(file_okay=False), help="run directory")
@click.option("--set", "overrides", multiple=True, metavar="KEY.PATH=VALUE",
              help="override any config key (YAML value; lists too)")
@click.option("--quiet", is_flag=True, help="no progress display")
@click.option("--no-report", is_flag=True, help="skip figures and report.html")
def run(source, out, overrides, quiet, no_report):
    """Run (or resume) an experiment: a preset name or a YAML file."""
    from .config import load_config
    from .executors import ChainFailed, chains, default_out, prepare_run_dir, run_experiment

    cfg = load_config(source, list(overrides))  # validation happens before anything is written
    store = prepare_run_dir(cfg, Path(out) if out else default_out(cfg))
    _setup_logging(store.log_path)
    todo = chains(cfg)
    total = len(todo) * cfg.loop.generations
    done = sum(min(store.completed(c.alpha, c.seed, c.param_dict), cfg.loop.generations)
               for c in todo)
    try:
        if quiet:
            df = run_experiment(cfg, store)
        else:
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                                       TimeElapsedColumn, TimeRemainingColumn)

            with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                          TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                          transient=False) as prog:
                task = prog.add_task(f"{cfg.name}: generations", total=total, completed=done)

                def tick(chain, g, secs):
                    prog.update(task, advance=1, description=f"{cfg.name}: {chain.label()} gen {g}")

                df = run_experiment(cfg, store, on_generation=tick)
    except ChainFailed as exc:
        _fail(str(exc), 1)
    if not no_report:
        from .report import build_report

        build_report(store.root)
    if not quiet:
        from .report import final_table

        table = final_table(df)
        click.echo(f"run directory: {store.root}")
        for _, r in table.iterrows():
            click.echo(f"  alpha={r.alpha:g}: {r.metric}[{r.estimator}] at generation "
                       f"{int(r.generation)} = {r['mean']:.4g} ± {r.half:.2g} (95%, {r.n} seeds)")


@main.command()
@click.argument("directory", type=click.Path(file_okay=False))
def report(directory):
    """(Re)build figures and report.html of a run directory."""
    from .errors import MissingFileError
    from .report import build_report

    if not (Path(directory) / "config.yaml").exists():
        raise MissingFileError(Path(directory) / "config.yaml",
                               "not a run directory (create one with `collapselab run`)")
    figs = build_report(directory)
    click.echo(f"wrote {Path(directory) / 'report.html'} and {len(figs)} figures")


@main.command()
def presets():
    """List the presets, one line each."""
    from .config import list_presets

    for name, desc in list_presets().items():
        click.echo(f"{name:20s} {desc}")


if __name__ == "__main__":
    main()
