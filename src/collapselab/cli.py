"""The ``collapselab`` command: parses, validates, calls the library (documented in README.md).

Exit codes: 0 success, 2 invalid input (one line naming the field), 1 failure during a run.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from pathlib import Path

import click
import numpy as np

from .errors import CollapselabError


def _fail(message: str, code: int) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


# Test hooks from the environment, for tests that drive the CLI as a separate process (a
# killed driver, a failing chain): read here only, at the edge, and passed explicitly to
# run_experiment as a Hooks (collapselab.engine.hooks; documented in docs/distributed.md).
# FAULT_ENV = JSON {"alpha", "seed", "generation", "kind": exit|raise|nan} (or a list);
# FIT_LOG_ENV = a file to which every score fit appends "alpha seed generation params".
FAULT_ENV = "COLLAPSELAB_FAULT"
FIT_LOG_ENV = "COLLAPSELAB_FIT_LOG"


def hooks_from_environment():
    """The :class:`Hooks` that ``COLLAPSELAB_FAULT`` / ``COLLAPSELAB_FIT_LOG`` ask for, or
    None when neither is set."""
    import json
    import os

    from .engine.hooks import Hooks
    from .errors import ConfigError

    fault, fit_log = os.environ.get(FAULT_ENV), os.environ.get(FIT_LOG_ENV)
    if not (fault or fit_log):
        return None
    try:
        return Hooks(faults=json.loads(fault) if fault else (), fit_log=fit_log or None)
    except (ValueError, TypeError, AttributeError) as exc:
        raise ConfigError(FAULT_ENV, f"not a fault (or list of them): {exc}") from None


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
    from .api import setup_run_log  # the same run.log as the Python API

    setup_run_log(path)


@contextlib.contextmanager
def _config_warnings():
    """Show the config loaders' warnings (a key given twice in the YAML, a repeated --set) as
    one line each on stderr, once each, when the block ends (before its error, if any)."""
    import warnings

    from .config import ConfigWarning

    shown: list[str] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConfigWarning)
        try:
            yield
        finally:
            for w in caught:
                if issubclass(w.category, ConfigWarning) and str(w.message) not in shown:
                    shown.append(str(w.message))
                    click.echo(f"warning: {w.message}", err=True)


def _open_for_reading(directory, command: str, *, results: bool) -> None:
    """Before ``report`` / ``bounds`` read a run directory: its config.yaml (and results.parquet,
    where needed or present) must be readable — one line otherwise. Holds the directory's lock
    shared while the command runs, so that a run does not start meanwhile; when a run holds it,
    says so and goes on (every file is replaced atomically, so what is read is whole)."""
    import yaml

    from .engine.store import RunDirBusy, run_lock
    from .errors import CollapselabError

    root = Path(directory)
    try:
        cfg = yaml.safe_load((root / "config.yaml").read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        cfg = None
    if not isinstance(cfg, dict):
        raise CollapselabError(f"{root / 'config.yaml'} is damaged (not a YAML mapping of "
                               "keys); re-create the run with `collapselab run`")
    res = root / "results.parquet"
    if results or res.exists():
        import pandas as pd

        try:
            pd.read_parquet(res)
        except Exception:  # any reader error: the file is not a whole parquet table
            raise CollapselabError(f"{res} is damaged (not a parquet table); rebuild it from "
                                   "the cells by re-running `collapselab run` with the same "
                                   "--out") from None
    try:
        click.get_current_context().with_resource(run_lock(root, command, shared=True))
    except RunDirBusy:
        from .engine.store import lock_holder

        who = lock_holder(root) or "another process"
        click.echo(f"warning: {who} is writing {root}; this shows the generations completed "
                   "so far", err=True)
    except OSError:
        pass  # a read-only run directory: nothing can write it meanwhile


def _examples(*lines: str) -> str:
    """A command's help epilog: its examples, one per line (not re-wrapped)."""
    return "\b\nExamples:\n" + "\n".join(f"  {line}" for line in lines)


def _bare_overrides(extra) -> list[str]:
    """Hydra-style ``key=value`` arguments after the source (same as ``--set key=value``)."""
    from .errors import ConfigError

    for text in extra:
        if "=" not in text or text.startswith("-"):
            raise ConfigError("KEY=VALUE", f"expected an override key.path=value after the "
                                           f"config, got '{text}'")
    return list(extra)


@main.command(epilog=_examples(
    "collapselab run quickstart",
    "collapselab run quickstart sweep.alphas=[0.2,0.8] sweep.seeds=[0,1,2,3,4] --out runs/q5",
    "collapselab run my.yaml --set score.bandwidth=0.4 --workers 2"))
@click.argument("source")
@click.argument("extra", nargs=-1, metavar="[KEY.PATH=VALUE]...")
@click.option("--out", "out", type=click.Path(file_okay=False),
              help="run directory  [default: runs/<name>, the config's name]")
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
def run(source, extra, out, overrides, workers, executor, address, cpus_per_chain,
        gpus_per_chain, quiet, no_report):
    """Run (or resume) an experiment: a preset name or a YAML file, with overrides given as
    bare KEY.PATH=VALUE arguments or --set (YAML values; lists too). Re-running the same
    command on the same --out resumes."""
    import importlib.util

    from .config import load_config, repeated_overrides
    from .engine.executors import (
        ChainFailed,
        Resources,
        chains,
        check_cell_names,
        check_device,
        check_out,
        default_out,
        prepare_run_dir,
        run_experiment,
        verify_run_dir,
    )
    from .engine.store import run_lock
    from .errors import ConfigError
    from .experiments.observability import experiment_of, run_observability_command
    from .scores.registry import check_model

    overrides = list(overrides) + _bare_overrides(extra)
    for line in repeated_overrides(list(overrides)):
        click.echo(f"warning: {line}", err=True)
    with _config_warnings():
        observability = experiment_of(source, list(overrides)) is not None
        if not observability:
            cfg = load_config(source, list(overrides))  # validated before anything is written
    if observability:  # e.g. `experiment: observability`
        if executor != "local" or address is not None or gpus_per_chain is not None:
            raise ConfigError("--executor", "the observability experiment runs locally only")
        from .experiments.observability import load_observability_config

        obs_cfg = load_observability_config(source, list(overrides))  # validated first
        out = out if out is not None else str(Path("runs") / obs_cfg.name)
        check_out(Path(out))
        click.get_current_context().with_resource(run_lock(Path(out)))  # one run per directory
        from .report.observability import build_observability_report

        run_observability_command(source, list(overrides), out, quiet=quiet,
                                  report=None if no_report else build_observability_report,
                                  echo=click.echo, fail=_fail)
        return
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
        from .engine.loop import build_target

        build_target(cfg)
    check_device(cfg, executor, address)
    hooks = hooks_from_environment()  # tests' faults and fit log, checked before any write
    root = Path(out) if out else default_out(cfg)
    check_model(cfg)  # a plug-in that cannot be found: refused before the lock makes the dir
    check_cell_names(cfg)
    check_out(root)
    # The run directory's lock, held until the command ends (report included): a second run
    # on the same --out is refused, naming this one, instead of mixing two configurations.
    try:
        click.get_current_context().with_resource(run_lock(root))
    except OSError as exc:
        raise ConfigError("--out", f"{root}: {exc.strerror or exc}") from None
    if workers is None and executor == "local":
        from .api import default_workers  # one chain per core (the Python API's default too)

        workers = default_workers(cfg, executor)
    store = prepare_run_dir(cfg, root)
    _setup_logging(store.log_path)
    logging.getLogger("collapselab").info(
        "run %s: executor=%s workers=%s address=%s resources=%s", cfg.name, executor, workers,
        address, resources)
    verify_run_dir(cfg, store)  # before the progress counts: damaged cells are not done
    todo = chains(cfg)
    G = cfg.loop.generations
    hint = speed_hint(cfg, executor)
    if hint and not quiet:
        click.echo(hint, err=True)
    progress = [min(store.completed(c.alpha, c.seed, c.param_dict), G) for c in todo]
    if not quiet and sum(progress):
        full = sum(p >= G for p in progress)
        click.echo(f"resuming {store.root}: {sum(progress)} of {len(todo) * G} generations "
                   f"already done ({full} of {len(todo)} chains complete); computing the rest")
    kwargs = dict(executor=executor, workers=workers, address=address, resources=resources,
                  hooks=hooks)
    interactive = sys.stdout.isatty()
    try:
        if quiet:
            df = run_experiment(cfg, store, **kwargs)
        elif not interactive:
            # nohup, a batch scheduler, a pipe: one plain line per finished generation.
            done = [sum(progress)]

            def line(chain, g, secs):
                done[0] += 1
                click.echo(f"[{done[0]}/{len(todo) * G}] {chain.label()} generation {g} done "
                           f"({secs:.1f} s)")

            df = run_experiment(cfg, store, on_generation=line, **kwargs)
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
        _build_report_with_progress(store.root, quiet, interactive)
    if not quiet:
        from .report.run import final_table, value_with_interval

        table = final_table(df)
        click.echo(f"run directory: {store.root}")
        for _, r in table.iterrows():
            swept = "".join(f"{k}={r[k]} " for k in table.columns if "." in k)
            click.echo(f"  {swept}alpha={r.alpha:g}: {r.metric}[{r.estimator}] at generation "
                       f"{int(r.generation)} = {value_with_interval(r)}")
        _where_to_look(store.root, report=not no_report)


def _pilot_eps2(root: Path) -> tuple[float, float, int, object]:
    """ε⋆² of a pilot run: the mean of its score_energy_ideal rows, the stderr of that mean
    (spread across rows: generations and seeds, which also holds each row's own noise), the
    number of rows, and the run's configuration."""
    import pandas as pd

    from .config import load_config
    from .errors import CollapselabError

    if not (root / "config.yaml").exists() or not (root / "results.parquet").exists():
        raise CollapselabError(f"--from: {root} is not a run directory (no config.yaml and "
                               "results.parquet; create one with `collapselab run`)")
    df = pd.read_parquet(root / "results.parquet", columns=["metric", "value", "stderr"])
    v = df[df.metric == "score_energy_ideal"]
    v = v[np.isfinite(v.value.to_numpy(float))]
    if v.empty:
        raise CollapselabError(f"--from: {root} has no finite score_energy_ideal rows "
                               "(run it with pathwise.score_energy: true)")
    x = v.value.to_numpy(float)
    if len(x) > 1:
        se = float(x.std(ddof=1) / np.sqrt(len(x)))
    else:
        se = float(v.stderr.iloc[0])
    return float(x.mean()), se, len(x), load_config(root / "config.yaml")


def _smoothing_parts(cfg, t0_flag, dim, target_std, target_mean):
    """The target's Gaussian parts for the t0-smoothing drift: from a pilot run's target (its
    components, isotropic variance tr Σ/d each) or the flags' N(μ, s² I). Returns (parts,
    description) or (None, why not)."""
    from .theory import GaussianSmoothing

    if cfg is None:
        return ([GaussianSmoothing(t0_flag, dim, target_mean**2, target_std**2)],
                f"Gaussian target N(μ, s² I) with ‖μ‖ = {target_mean:g}, s = {target_std:g}, "
                f"d = {dim}, t0 = {t0_flag:g} (OU)")
    import torch

    from .engine.loop import build_process, build_target
    from .targets import GaussianMixture

    target = build_target(cfg)
    if not isinstance(target, GaussianMixture):
        return None, "not computed: the pilot run's target is not a Gaussian mixture"
    proc = build_process(cfg)
    t0 = float(proc.integral(cfg.sampler.t0))  # OU time with the same shrink e^{−∫β/2}
    d = target.dim
    parts = [GaussianSmoothing(t0, d, float((m * m).sum()), float(torch.trace(C)) / d, float(w))
             for m, C, w in zip(target.means, target.covs, target.weights, strict=True)]
    k = len(parts)
    how = ("" if k == 1 else f"; a bound over its {k} components by joint convexity of χ²")
    return parts, f"the pilot run's target ({cfg.target.kind}, d = {d}), t0 = " \
                  f"{cfg.sampler.t0:g}{how}"


def _build_report_with_progress(root: Path, quiet: bool, interactive: bool) -> None:
    """build_report with its steps shown: a spinner on a terminal, plain lines otherwise."""
    from .report.run import build_report

    if quiet:
        build_report(root)
    elif interactive:
        from rich.console import Console

        with Console().status("building the report…") as status:
            build_report(root, progress=lambda step: status.update(f"building the report: "
                                                                   f"{step}"))
    else:
        build_report(root, progress=lambda step: click.echo(f"report: {step}"))


def _where_to_look(root: Path, report: bool = True) -> None:
    """The end of a run: where the results are and the one command to look at them."""
    root = Path(root)
    click.echo(f"results: {root / 'results.parquet'} (mean and 95% interval over seeds: "
               f"{root / 'summary.csv'})")
    if report:
        click.echo(f"report:  {root / 'report.html'}")
        click.echo(f"look at it: python -m webbrowser {(root / 'report.html').resolve().as_uri()}")
    else:
        click.echo(f"build the report: collapselab report {root}")
    click.echo(f"in Python: collapselab.load({str(root)!r}).results")


@main.command(epilog=_examples("collapselab plan --eps2 0.01 --tol 0.05",
                              "collapselab plan --eps2 0.01 --tol 0.05 --horizon 20",
                              "collapselab plan --from runs/quickstart --tol 0.5 --horizon 6"))
@click.option("--eps2", type=float, default=None,
              help="per-generation score error ε² (measured ε⋆²); or use --from")
@click.option("--from", "from_dir", type=click.Path(file_okay=False), default=None,
              help="pilot run directory: ε⋆² (mean and stderr of its score_energy_ideal rows), "
                   "t0 and the target are read from it")
@click.option("--tol", type=float, required=True, help="largest acceptable drift D = χ²(p̂ ‖ p)")
@click.option("--horizon", type=int, default=None,
              help="number of generations to plan for (default: all generations)")
@click.option("--d0", type=float, default=0.0, show_default=True, help="starting drift D_0")
@click.option("--c", "c", type=float, default=1.0, show_default=True,
              help="assumed constant in D_(i+1) = (1−α)² D_i + c·ε² (the conservative 4 of the "
                   "single-step upper bound is shown beside)")
@click.option("--t0", type=float, default=0.02, show_default=True,
              help="stopping time of the reverse process, for the t0-smoothing drift")
@click.option("--dim", type=int, default=1, show_default=True,
              help="dimension d of the Gaussian target N(μ, s² I) of the smoothing drift")
@click.option("--target-std", type=float, default=1.0, show_default=True,
              help="per-coordinate std s of that target (1 = the OU stationary law: no drift)")
@click.option("--target-mean", type=float, default=0.0, show_default=True,
              help="distance ‖μ‖ of that target's mean from the origin")
def plan(eps2, from_dir, tol, horizon, d0, c, t0, dim, target_std, target_mean):
    """Smallest fresh-data fraction α keeping the predicted drift below --tol (docs/paper.md §4).

    A prediction under a stated constant c, not a bound."""
    from .errors import CollapselabError
    from .theory import plan_alpha, smoothing_drift_mixture, smoothing_kl_step

    if (eps2 is None) == (from_dir is None):
        raise CollapselabError("--eps2 / --from: give exactly one (a number ≥ 0, or a pilot "
                               "run directory)")
    for flag, val, ok, allowed in (
        ("--c", c, c > 0 and np.isfinite(c), "a finite number > 0"),
        ("--t0", t0, t0 > 0 and np.isfinite(t0), "a finite number > 0"),
        ("--dim", dim, dim >= 1, "an integer ≥ 1"),
        ("--target-std", target_std, target_std > 0 and np.isfinite(target_std),
         "a finite number > 0"),
        ("--target-mean", target_mean, target_mean >= 0 and np.isfinite(target_mean),
         "a finite number ≥ 0"),
    ):
        if not ok:
            raise CollapselabError(f"{flag}: must be {allowed}; got {val!r}")
    cfg, se, source = None, None, "given with --eps2"
    if from_dir is not None:
        eps2, se, n, cfg = _pilot_eps2(Path(from_dir))
        source = f"mean of {n} score_energy_ideal rows of {from_dir}"
    parts, target_txt = _smoothing_parts(cfg, t0, dim, target_std, target_mean)

    def run(const, e2):
        try:
            return plan_alpha(e2, tol, horizon, d0, c=const, smoothing=parts)
        except ValueError as exc:
            msg = str(exc)
            for name, flag in (("eps_sq", "--eps2"), ("tolerance", "--tol"), ("D0", "--d0"),
                               ("horizon", "--horizon"), ("c", "--c")):
                if msg.startswith(name + " "):
                    msg = f"{flag}: {msg[len(name) + 1:]}"
            raise CollapselabError(msg) from None

    res = run(c, eps2)
    cons = run(4.0, eps2)
    click.echo(f"alpha: {res.alpha:.6g}")
    click.echo(f"predicted worst D: {res.worst_D:.6g}")
    click.echo(f"feasible: {'yes' if res.feasible else 'no'}")
    click.echo(f"horizon: {'all generations' if res.horizon is None else res.horizon}")
    click.echo(f"what this is: a prediction under the stated constant c = {c:g} in "
               "D_(i+1) = (1−α)² D_i + c·ε², not a bound (the paper's single-step bounds allow "
               "any constant between ¼η and 4)")
    click.echo(f"eps2: {eps2:.6g}" + (f" ± {se:.2g}" if se is not None else "")
               + f" ({source})")
    if se is not None and se > 0:
        hi = run(c, eps2 + 2 * se)
        click.echo(f"alpha at eps2 + 2 stderr: {hi.alpha:.6g}"
                   + ("" if hi.feasible else " (infeasible)"))
    click.echo(f"alpha with c = 4 (conservative, the single-step bound I ≤ 4 ε⋆²): "
               f"{cons.alpha:.6g} (predicted worst D {cons.worst_D:.6g}"
               + ("" if cons.feasible else "; infeasible") + ")")
    if parts is None:
        click.echo(f"t0 smoothing: {target_txt}")
    else:
        step = smoothing_drift_mixture(1.0, parts, 1)[0]
        kl = (smoothing_kl_step(parts[0]) if len(parts) == 1 else
              sum(p.weight * smoothing_kl_step(p) for p in parts) / sum(p.weight for p in parts))
        le = "≤ " if len(parts) > 1 else ""
        # χ² of the smoothing chain is infinite once a smoothed component is more than twice
        # as wide as the target's: say from which generation, whatever α < 1.
        cap = max(10, int(np.ceil(12.0 / parts[0].t0)))  # as far as the planner looks
        probe = smoothing_drift_mixture(0.5, parts, cap if horizon is None else min(horizon, cap))
        if np.isinf(probe).any():
            n_inf = int(np.argmax(np.isinf(probe))) + 1
            click.echo(f"t0 smoothing diverges: for every alpha < 1 the predicted χ² is infinite "
                       f"from generation {n_inf} on (the target pushed {n_inf} times to t0 is "
                       "more than twice as wide as the target, and keeps a positive weight)")
        click.echo(f"t0 smoothing: {target_txt}; with exact scores (ε⋆² = 0) each stop at t0 "
                   f"adds χ²(S p ‖ p) {le}{step:.4g} (KL {le}{kl:.4g}) per generation; included in "
                   f"the prediction: {res.smoothing_D:.4g} of the worst D at the planned alpha")
    click.echo(f"reason: {res.reason}")


@main.command(epilog=_examples("collapselab report runs/quickstart",
                              "collapselab report runs/quickstart && python -m webbrowser "
                              "runs/quickstart/report.html"))
@click.argument("directory", type=click.Path(file_okay=False))
def report(directory):
    """(Re)build figures and report.html of a run directory."""
    from .errors import MissingFileError
    from .report.run import build_report

    if not (Path(directory) / "config.yaml").exists():
        raise MissingFileError(Path(directory) / "config.yaml",
                               "not a run directory (create one with `collapselab run`)")
    _open_for_reading(directory, "collapselab report", results=False)
    if sys.stdout.isatty():
        from rich.console import Console

        with Console().status("building the report…") as status:
            figs = build_report(directory, progress=lambda step: status.update(
                f"building the report: {step}"))
    else:
        figs = build_report(directory)
    click.echo(f"wrote {Path(directory) / 'report.html'} and {len(figs)} figures")
    click.echo("look at it: python -m webbrowser "
               f"{(Path(directory) / 'report.html').resolve().as_uri()}")


@main.command(epilog=_examples("collapselab bounds runs/quickstart",
                              "collapselab bounds runs/quickstart --n-sigma 3 --no-figures",
                              "collapselab bounds runs/paper-gmm --i0 2 --C 1.0 --c 1.0"))
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
    from .report.bounds import bounds_overview, bounds_sentence, status_codes
    from .report.run import write_bounds
    from .theory import Status
    from .verdicts import status_text

    root = Path(directory)
    if not (root / "config.yaml").exists() or not (root / "results.parquet").exists():
        raise CollapselabError(f"{directory}: not a run directory (no config.yaml and "
                               "results.parquet; create one with `collapselab run`)")
    import yaml

    _open_for_reading(root, "collapselab bounds", results=True)
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
    codes = status_codes(bt)
    listed = (Status.FAILED, Status.INCONSISTENT, Status.NO_CLAIM)
    for code in listed:
        rows = bt[codes == code] if len(bt) else bt
        for _, r in rows.iterrows():
            if shown >= 12:
                break
            where = f"alpha={r.alpha:g} seed={r.seed} generation={r.generation}"
            click.echo(f"{status_text(code)}: {r.check} at {where}: {r.reason}")
            shown += 1
    left = int(codes.isin(listed).sum()) - shown if len(bt) else 0
    if left > 0:
        click.echo(f"… {left} more in {root / 'bounds.csv'}")
    click.echo(f"wrote {root / 'bounds.parquet'}, {root / 'bounds.csv'} and {len(figs)} figures")


@main.command(epilog=_examples("collapselab presets", "collapselab presets -v",
                              "collapselab show quickstart > my.yaml"))
@click.option("-v", "--verbose", is_flag=True, help="each preset's notes as well")
def presets(verbose):
    """List the presets, one line each (with -v, their notes too)."""
    import textwrap

    from .config import list_presets, preset_notes

    for name, desc in list_presets().items():
        click.echo(f"{name:20s} {desc}")
        if verbose:
            notes = preset_notes(name)
            if notes:
                click.echo(textwrap.fill(notes, 96, initial_indent=" " * 4,
                                         subsequent_indent=" " * 4))
            click.echo("")


@main.command(epilog=_examples("collapselab show quickstart",
                               "collapselab show quickstart > my.yaml && collapselab run my.yaml",
                               "collapselab show paper-gmm-cpu | less"))
@click.argument("preset")
def show(preset):
    """Print a preset's YAML (its notes as comments), to save, edit and run."""
    from .config import show_preset

    click.echo(show_preset(preset), nl=False)


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
