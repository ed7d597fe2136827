"""The ``collapselab`` command: parses, validates, calls the library (DESIGN.md "Contracts").

Exit codes: 0 success, 2 invalid input (one line naming the field), 1 failure during a run.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import click
import numpy as np

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
@click.option("--workers", type=click.IntRange(min=1), default=None,
              help="chains run at once (local: 1 = in this process, N > 1 = a process pool, "
                   "default one per core; ray: CPUs of the local Ray started for the run; "
                   "batched: cores, the seeds dealt over that many processes, default one "
                   "per core)")
@click.option("--executor", type=click.Choice(["local", "ray", "batched"]), default="local",
              show_default=True, help="where chains run (batched: chains in lockstep, the MLP "
                                      "nets of a generation trained in one batched call)")
@click.option("--address", default=None, metavar="auto|ray://HOST:PORT",
              help="Ray cluster to use (with --executor ray; default: start a local Ray)")
@click.option("--cpus-per-chain", type=click.FloatRange(min=0, min_open=True), default=1.0,
              show_default=True, help="CPUs each Ray task asks for (its torch threads)")
@click.option("--gpus-per-chain", type=click.FloatRange(min=0), default=None,
              help="GPUs each Ray task asks for, fractional allowed (default: 1 when "
                   "device is cuda, else 0)")
@click.option("--quiet", is_flag=True, help="no progress display")
@click.option("--no-report", is_flag=True, help="skip figures and report.html")
def run(source, out, overrides, workers, executor, address, cpus_per_chain, gpus_per_chain,
        quiet, no_report):
    """Run (or resume) an experiment: a preset name or a YAML file."""
    import importlib.util

    from .config import load_config
    from .errors import ConfigError
    from .executors import (
        ChainFailed,
        Resources,
        chains,
        default_out,
        prepare_run_dir,
        run_experiment,
    )
    from .observability import experiment_of, run_observability_command

    if experiment_of(source, list(overrides)) is not None:  # e.g. `experiment: observability`
        if executor != "local" or address is not None or gpus_per_chain is not None:
            raise ConfigError("--executor", "the observability experiment runs locally only")
        run_observability_command(source, list(overrides), out, quiet=quiet,
                                  no_report=no_report, echo=click.echo, fail=_fail)
        return
    cfg = load_config(source, list(overrides))  # validation happens before anything is written
    if executor != "ray":
        for name, value in (("--address", address), ("--gpus-per-chain", gpus_per_chain)):
            if value is not None:
                raise ConfigError(name, "only used with --executor ray")
    elif importlib.util.find_spec("ray") is None:
        raise ConfigError("--executor", "ray is not installed (pip install 'collapselab[ray]')")
    if gpus_per_chain is None:
        gpus_per_chain = 1.0 if cfg.device.startswith("cuda") else 0.0
    resources = Resources(num_cpus=cpus_per_chain, num_gpus=gpus_per_chain)
    if cfg.target.kind == "dataset":
        # A missing or malformed data file is the user's to fix: say so before anything is
        # written (the chains would otherwise meet it inside a worker).
        from .loop import build_target

        build_target(cfg)
    if workers is None and executor == "local":
        # One chain per core, one torch thread each: in-process runs use every core's thread
        # for one chain, which oversubscribes badly as soon as anything else runs.
        workers = max(1, min(os.cpu_count() or 1, len(chains(cfg))))
    store = prepare_run_dir(cfg, Path(out) if out else default_out(cfg))
    _setup_logging(store.log_path)
    logging.getLogger("collapselab").info(
        "run %s: executor=%s workers=%s address=%s resources=%s", cfg.name, executor, workers,
        address, resources)
    todo = chains(cfg)
    G = cfg.loop.generations
    hint = speed_hint(cfg, executor)
    if hint and not quiet:
        click.echo(hint, err=True)
    progress = [min(store.completed(c.alpha, c.seed, c.param_dict), G) for c in todo]
    kwargs = dict(executor=executor, workers=workers, address=address, resources=resources)
    try:
        if quiet:
            df = run_experiment(cfg, store, **kwargs)
        else:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                          TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                          transient=False) as prog:
                gens = prog.add_task(f"{cfg.name}: generations", total=len(todo) * G,
                                     completed=sum(progress))
                done_chains = prog.add_task("chains", total=len(todo),
                                            completed=sum(p >= G for p in progress))

                def tick(chain, g, secs):
                    prog.update(gens, advance=1)
                    prog.update(done_chains, advance=int(g == G - 1),
                                description=f"chains (last: {chain.label()} gen {g})")

                df = run_experiment(cfg, store, on_generation=tick, **kwargs)
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
            extra = "".join(f"{k}={r[k]} " for k in table.columns if "." in k)
            click.echo(f"  {extra}alpha={r.alpha:g}: {r.metric}[{r.estimator}] at generation "
                       f"{int(r.generation)} = {r['mean']:.4g} ± {r.half:.2g} (95%, {r.n} seeds)")


@main.command()
@click.option("--eps2", type=float, required=True,
              help="per-generation score error ε² (measured ε⋆², e.g. from a pilot run)")
@click.option("--tol", type=float, required=True, help="largest acceptable drift D = χ²(p̂ ‖ p)")
@click.option("--horizon", type=int, default=None,
              help="number of generations to plan for (default: all generations)")
@click.option("--d0", type=float, default=0.0, show_default=True, help="starting drift D_0")
def plan(eps2, tol, horizon, d0):
    """Smallest fresh-data fraction α keeping the predicted drift below --tol (PAPER.md §4)."""
    from .errors import CollapselabError
    from .theory import plan_alpha

    try:
        res = plan_alpha(eps2, tol, horizon, d0)
    except ValueError as exc:
        msg = str(exc)
        for name, flag in (("eps_sq", "--eps2"), ("tolerance", "--tol"), ("D0", "--d0"),
                           ("horizon", "--horizon")):
            if msg.startswith(name + " "):
                msg = f"{flag}: {msg[len(name) + 1:]}"
        raise CollapselabError(msg) from None
    click.echo(f"alpha: {res.alpha:.6g}")
    click.echo(f"predicted worst D: {res.worst_D:.6g}")
    click.echo(f"feasible: {'yes' if res.feasible else 'no'}")
    click.echo(f"horizon: {'all generations' if res.horizon is None else res.horizon}")
    click.echo(f"reason: {res.reason}")


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
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--i0", type=click.IntRange(min=0), default=None,
              help="end of the transient: bounds are claimed from this generation on "
                   "(default: the run's pathwise.i0)")
@click.option("--C", "C", type=click.FloatRange(min=0), default=None,
              help="the paper's constant C of the χ² lower bound (default: pathwise.C)")
@click.option("--c", "c", type=click.FloatRange(min=0), default=None,
              help="the paper's constant c of the upper bound 4ε² + cε⁴ (default: pathwise.c)")
@click.option("--n-sigma", type=click.FloatRange(min=0), default=2.0, show_default=True,
              help="standard errors allowed before a bound counts as FAILED")
@click.option("--no-figures", is_flag=True, help="write the tables only")
def bounds(directory, i0, C, c, n_sigma, no_figures):
    """Re-evaluate the paper's bounds on a finished run: DIR/bounds.{parquet,csv} + figures."""
    from .errors import CollapselabError
    from .report import bounds_overview, bounds_sentence, write_bounds

    root = Path(directory)
    if not (root / "config.yaml").exists() or not (root / "results.parquet").exists():
        raise CollapselabError(f"{directory}: not a run directory (no config.yaml and "
                               "results.parquet; create one with `collapselab run`)")
    import yaml

    cfg = yaml.safe_load((root / "config.yaml").read_text()) or {}
    if isinstance(cfg, dict) and cfg.get("experiment"):
        raise CollapselabError(f"{directory}: a '{cfg['experiment']}' experiment has no "
                               "generations to check bounds on (use `collapselab report`)")
    bt, figs = write_bounds(root, i0=i0, C=C, c=c, n_sigma=n_sigma, figures=not no_figures)
    click.echo(bounds_sentence(bt))
    over = bounds_overview(bt)
    if len(over):
        click.echo(over.to_string(index=False))
    reg = bt[bt.kind == "regime"] if len(bt) else bt
    for _, r in reg.iterrows():
        click.echo(f"regime alpha={r.alpha:g}: {r.reason}")
    pr = bt[bt.kind == "prediction"] if len(bt) else bt
    if len(pr):
        last = pr[pr.generation == pr.generation.max()]
        for a, grp in last.groupby("alpha"):
            m, p = grp.measured.to_numpy(float), grp.bound.to_numpy(float)
            with np.errstate(invalid="ignore", divide="ignore"):
                ratio = m / p
            fin = ratio[np.isfinite(ratio)]
            ratio_txt = (f"ratio measured/predicted {np.median(fin):.3g} (median over "
                         f"{len(fin)} seeds)" if len(fin) else "no finite ratio "
                         f"({int(np.isposinf(m).sum())} seed(s) with D = inf, "
                         f"{int(np.isnan(m).sum())} NaN)")
            click.echo(f"D_{int(grp.generation.iloc[0])} alpha={a:g}: discounted-sum "
                       f"prediction {np.nanmedian(p):.4g}, {ratio_txt}")
    shown = 0
    for status in ("FAILED", "no claim"):
        rows = bt[bt.status == status] if len(bt) else bt
        for _, r in rows.iterrows():
            if shown >= 12:
                break
            where = f"alpha={r.alpha:g} seed={r.seed} generation={r.generation}"
            click.echo(f"{status}: {r.check} at {where}: {r.reason}")
            shown += 1
    left = int((bt.status.isin(["FAILED", "no claim"])).sum()) - shown if len(bt) else 0
    if left > 0:
        click.echo(f"… {left} more in {root / 'bounds.csv'}")
    click.echo(f"wrote {root / 'bounds.parquet'}, {root / 'bounds.csv'} and {len(figs)} figures")


@main.command()
def presets():
    """List the presets, one line each."""
    from .config import list_presets

    for name, desc in list_presets().items():
        click.echo(f"{name:20s} {desc}")


def speed_hint(cfg, executor: str) -> str | None:
    """One line where the opt-in accelerator would make this run markedly faster: CPU fits of
    MLPs by the default trainer, except those the batched executor's vmapped ensemble takes
    (benchmarks/results/), with collapselab.fast installed. Never switched on by itself: a
    default run keeps the default trainer's numbers."""
    from .scores.neural import ENSEMBLE_MAX_HIDDEN

    if cfg.score.kind != "mlp" or cfg.score.train_backend != "torch" \
            or not cfg.device.startswith("cpu") \
            or (executor == "batched" and cfg.score.hidden <= ENSEMBLE_MAX_HIDDEN):
        return None
    import importlib.util

    if importlib.util.find_spec("collapselab.fast") is None:
        return None
    return ("hint: --set score.train_backend=native (the optional collapselab.fast) trains these "
            "MLP scores faster on CPU; see docs/performance.md")


if __name__ == "__main__":
    main()
