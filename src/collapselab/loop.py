"""One recursive chain (α, seed): generations 0..G−1, resumable (PAPER.md §1).

Generation i builds q_i's training set (policies), fits a score model on it (scores), samples
the reverse SDE (samplers) to get p̂_{i+1}, and measures D_{i+1} = χ²(p̂_{i+1} ‖ p) and
I_i = χ²(p̂_{i+1} ‖ q_i) with their KL twins (estimators). Everything a later generation needs
is read back from the run directory, so a chain killed at any point resumes after its last
completed generation with the same numbers: each generation draws its randomness from its own
streams seeded by (seed, generation, purpose) — independent of α, so generation 0 is the same
for every α of a seed and different α share common random numbers.
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import estimators as est
from .config import Config
from .estimate import Estimate
from .policies import TrainingSet, build_training_set, training_law_weights
from .processes import OU, VPProcess, time_grid
from .samplers import SAMPLERS
from .scores.analytic import AnalyticScore
from .scores.kde import KDEScore
from .store import (
    RunStore,
    atomic_save_npy,
    atomic_write_bytes,
    load_npy,
    read_json,
    write_cell_metrics,
)
from .targets import EmpiricalTarget, GaussianMixture, mix_laws, paper_gmm_means, ring

_STREAMS = {"real": 1, "policy": 2, "train": 3, "sample": 4, "eval": 5, "eval_real": 6, "path": 7,
            "gap": 8}


class NonFiniteSamples(FloatingPointError):
    """A generation's samples contain NaN/Inf (a diverged model); the chain stops there."""


@functools.lru_cache(maxsize=2)
def _empirical_target(dataset: str, root: str | None, classes: tuple[int, ...] | None,
                      downsample: int | None, limit: int | None, where: str) -> EmpiricalTarget:
    """Loaded once per process and data location (``where``): the CLI's check and every chain
    of an in-process run share it (~1 s per load for the image presets). Read-only."""
    from .datasets import load_dataset

    kw = dict(root=root, classes=classes, downsample=downsample)
    test_split = "train" if dataset in ("npy", "npz") else "test"
    return EmpiricalTarget(
        load_dataset(dataset, split="train", limit=limit, **kw),
        load_dataset(dataset, split=test_split, **kw),
    )


def build_target(cfg: Config) -> GaussianMixture | EmpiricalTarget:
    t = cfg.target
    if t.kind == "dataset":
        from .datasets import default_root

        path = Path(t.root) if t.root is not None else default_root(t.dataset)
        # The modification time keys the cache too: a file replaced in place is read again.
        where = f"{path}@{path.stat().st_mtime_ns if path.exists() else 0}"
        return _empirical_target(t.dataset, None if t.root is None else str(t.root),
                                 None if t.classes is None else tuple(t.classes), t.downsample,
                                 t.limit, where)
    if t.kind == "ring":
        return ring(t.n_components, t.radius, t.std if isinstance(t.std, float) else 0.5)
    means = paper_gmm_means(t.dim) if t.kind == "paper_gmm" else torch.tensor(t.means)
    std = torch.as_tensor(t.std, dtype=torch.float64)
    weights = None if t.weights is None else torch.tensor(t.weights, dtype=torch.float64)
    return GaussianMixture.isotropic(means, std, weights)


def build_process(cfg: Config) -> VPProcess:
    p = cfg.process
    if p.kind == "ou":
        return OU(T=p.T)
    return VPProcess(beta_min=p.beta_min, beta_max=p.beta_max, T=p.T)


def streams(
    seed: int, generation: int, purpose: str
) -> tuple[torch.Generator, np.random.Generator]:
    """Independent torch and numpy generators for one (seed, generation, purpose)."""
    ss = np.random.SeedSequence([seed, generation, _STREAMS[purpose]])
    torch_seed = int(ss.generate_state(2, dtype=np.uint64)[0] % (2**63 - 1))
    return torch.Generator().manual_seed(torch_seed), np.random.default_rng(ss)


def deterministic_cuda() -> None:
    """Make CUDA work in this process bit-reproducible, as a resumed chain must compute what
    an uninterrupted one does: cuDNN's deterministic algorithms without autotuning, PyTorch's
    deterministic kernels where they exist (a warning where one does not), and cuBLAS's fixed
    workspace (read when cuBLAS starts, so set before the first product). Process-wide. On an
    H200, two identical U-Net chains differed by 1% in their metrics without it; MLP chains
    were already identical."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    torch.use_deterministic_algorithms(True, warn_only=True)


@dataclass
class ChainContext:
    """What one chain needs that does not change across generations."""

    cfg: Config
    alpha: float
    seed: int
    store: RunStore
    params: dict = field(default_factory=dict)
    target: GaussianMixture | EmpiricalTarget = field(init=False)
    process: VPProcess = field(init=False)
    _features: object = field(default=None, init=False)

    def __post_init__(self):
        if self.device.type == "cuda":
            deterministic_cuda()
        self.target = build_target(self.cfg)
        self.process = build_process(self.cfg)

    @property
    def is_image(self) -> bool:
        return isinstance(self.target, EmpiricalTarget)

    @property
    def event_shape(self) -> tuple[int, ...]:
        return self.target.event_shape if self.is_image else (self.target.dim,)

    def features(self):
        """The feature classifier of image runs: trained once on p's training split, cached
        by content hash (same seed, data and settings give the same network everywhere)."""
        if self._features is None:
            from .features import FeatureExtractor

            e = self.cfg.estimators
            self._features = FeatureExtractor.fit_or_load(
                self.target.train,
                self.target.test,
                seed=0,
                feature_dim=e.feature_dim,
                epochs=e.feature_epochs,
                device=str(self.device),
            )
        return self._features

    @property
    def device(self) -> torch.device:
        return torch.device(self.cfg.device)


# ---- score models --------------------------------------------------------------------------
def _neural_inputs(ctx: ChainContext, generation: int) -> tuple[int, dict | None, float]:
    """(seed, warm-start state or None, t_min) of generation i's network fit: the training seed
    comes from the chain's own ``train`` stream, the warm start from generation i−1's raw
    weights. Shared by :func:`fit_score` and :func:`fit_scores_batched`, which must agree."""
    from .scores.neural import raw_state

    s = ctx.cfg.score
    prev = ctx.store.cell(ctx.alpha, ctx.seed, generation - 1, ctx.params) / "model.safetensors"
    init = raw_state(prev) if s.warm_start and generation > 0 and prev.exists() else None
    _, rng = streams(ctx.seed, generation, "train")
    return int(rng.integers(2**31)), init, max(ctx.cfg.sampler.t0, 1e-3)


def fit_score(ctx: ChainContext, generation: int, train: TrainingSet, q_law):
    """Fit generation i's score model. Returns (score, state_dict or None)."""
    s = ctx.cfg.score
    if s.kind == "analytic":
        return AnalyticScore(q_law, ctx.process), None
    if s.kind == "population_kde":
        return AnalyticScore(q_law, ctx.process, bandwidth=s.bandwidth), None
    if s.kind == "kde":
        centres = torch.from_numpy(train.x).to(ctx.device)
        return KDEScore(centres, s.bandwidth, ctx.process), None
    if s.kind in ("mlp", "unet"):
        from .scores.neural import fit_neural

        seed, init, t_min = _neural_inputs(ctx, generation)
        return fit_neural(
            s,
            ctx.process,
            torch.from_numpy(train.x),
            generation=generation,
            seed=seed,
            t_min=t_min,
            device=ctx.device,
            init_state=init,
        )
    raise ValueError(f"unknown score kind {s.kind}")


def fit_scores_batched(
    ctxs: list[ChainContext],
    generation: int,
    trains: list[TrainingSet],
    *,
    threads: int | None = None,
) -> list[tuple]:
    """:func:`fit_score` for several MLP chains of one group at one generation, in one
    :func:`~collapselab.batched.train_dsm_batched` call. Chain k gets exactly what fit_score
    would give it (same init, seed, warm start, schedule and trainer). The chains must share
    the score/sampler/process configuration (one group: they differ in α and seed only) and
    training sets of one shape. A diverged chain raises TrainingDivergedError with ``.chain``,
    its index in ``ctxs``."""
    from .scores.neural import fit_neural_batched

    first = ctxs[0]
    inputs = [_neural_inputs(c, generation) for c in ctxs]
    return fit_neural_batched(
        first.cfg.score,
        first.process,
        [torch.from_numpy(t.x) for t in trains],
        generation=generation,
        seeds=[seed for seed, _, _ in inputs],
        t_min=inputs[0][2],
        device=first.device,
        init_states=[init for _, init, _ in inputs],
        threads=threads,
    )


def draw_samples(ctx: ChainContext, score, n: int, generation: int) -> np.ndarray:
    """n draws of p̂_{i+1}: the reverse SDE from N(0, I) at T down to t0."""
    gen, _ = streams(ctx.seed, generation, "sample")
    sc = ctx.cfg.sampler
    x = torch.randn((n, *ctx.event_shape), generator=gen, dtype=torch.float32)
    times = time_grid(ctx.process.T, sc.t0, sc.steps, schedule=sc.schedule, rho=sc.rho)
    # Chunks bound the memory of network forwards; each chunk's noise follows from the stream.
    chunk = n if not ctx.is_image else 512
    clip = {"clip": (-1.0, 1.0)} if sc.clip else {}  # image pixels live in [-1, 1]
    out = [
        SAMPLERS[sc.kind](
            score, x[i : i + chunk].to(ctx.device), times, ctx.process, generator=gen, **clip
        )
        for i in range(0, n, chunk)
    ]
    return torch.cat(out).float().cpu().numpy()


# ---- laws (exact densities where the model's output law is known) ---------------------------
def output_law(ctx: ChainContext, score):
    law_fn = getattr(score, "output_law", None)
    return None if law_fn is None else law_fn(ctx.cfg.sampler.t0)


def training_law(ctx: ChainContext, generation: int, laws: dict[int, object]):
    """q_i as an exact law over {p, p̂_g}, or None when some part's law is unknown."""
    weights = training_law_weights(
        ctx.cfg.loop.policy, generation, ctx.alpha, ctx.cfg.loop.augmentation_lambda
    )
    parts = []
    if ctx.is_image:
        return None
    for g, w in weights.items():
        law = ctx.target if g == 0 else laws.get(g)
        if law is None:
            return None
        parts.append((w, law))
    return mix_laws(parts)


# ---- measurements --------------------------------------------------------------------------
def _row(ctx: ChainContext, generation: int, metric: str, e: Estimate) -> dict:
    return {
        "alpha": float(ctx.alpha),
        "seed": int(ctx.seed),
        "generation": int(generation),
        "metric": metric,
        **e.as_row(),
        **ctx.params,
    }


def measure_images(ctx, generation, samples, train: TrainingSet) -> list[dict]:
    """Image runs: D_{i+1} and I_i in the feature space of a classifier (PAPER.md §5: the
    Gaussian χ² proxy; KL, Fréchet distance, KID, precision/recall, density/coverage too).
    D compares with p's held-out split, I with the training set of q_i."""
    from . import feature_metrics as fm

    ecfg = ctx.cfg.estimators
    _, rng = streams(ctx.seed, generation, "eval")
    fx = ctx.features()
    n_eval = min(ecfg.n_eval, len(samples))
    test = ctx.target.test.images
    f_x = fx.features(samples[rng.choice(len(samples), n_eval, replace=False)])
    f_p = fx.features(test[rng.choice(len(test), min(n_eval, len(test)), replace=False)])
    f_q = fx.features(train.x[rng.choice(len(train), min(n_eval, len(train)), replace=False)])
    seed = int(rng.integers(2**31))
    nxt, rows = generation + 1, []
    for ref, g, name in ((f_p, nxt, "accumulated"), (f_q, generation, "intra")):
        rows.append(_row(ctx, g, f"{name}_chi2", fm.feature_gaussian_chi2(f_x, ref, seed=seed)))
        rows.append(_row(ctx, g, f"{name}_kl", fm.feature_gaussian_kl(f_x, ref, seed=seed)))
    for kind in ecfg.extra:
        if kind == "fid_local":
            rows.append(_row(ctx, nxt, "fid_local", fm.frechet_distance(f_x, f_p, seed=seed)))
        elif kind == "kid":
            rows.append(_row(ctx, nxt, "kid", fm.kid(f_x, f_p, seed=seed)))
        elif kind == "precision_recall":
            pr = fm.precision_recall(f_p, f_x)
            rows += [_row(ctx, nxt, "precision", pr.precision), _row(ctx, nxt, "recall", pr.recall)]
        elif kind == "density_coverage":
            dc = fm.density_coverage(f_p, f_x)
            rows += [_row(ctx, nxt, "density", dc.density), _row(ctx, nxt, "coverage", dc.coverage)]
        elif kind == "second_moment":
            rows.append(
                _row(
                    ctx, nxt, "second_moment", est.second_moment(samples.reshape(len(samples), -1))
                )
            )
    rows.append(_row(ctx, generation, "fraction_real", Estimate(train.fraction_real, 0.0, "exact")))
    if generation == 0:
        acc = Estimate(
            fx.test_accuracy,
            float("nan"),
            "feature_classifier",
            f"test accuracy of the feature classifier ({fx.content_hash[:12]})",
        )
        rows.append(_row(ctx, 0, "feature_test_accuracy", acc))
    return rows


def measure(ctx, generation, samples, train: TrainingSet, law_next, q_law) -> list[dict]:
    """Rows for D_{i+1} (on row i+1), I_i (on row i) and the extra per-generation metrics."""
    if ctx.is_image:
        return measure_images(ctx, generation, samples, train)
    ecfg = ctx.cfg.estimators
    gen, rng = streams(ctx.seed, generation, "eval")
    rows = []
    nxt = generation + 1
    if ecfg.exact and law_next is not None:
        for key, e in est.mc_divergences(law_next, ctx.target, ecfg.n_mc, gen).items():
            rows.append(_row(ctx, nxt, f"accumulated_{key}", _ideal(e)))
        if q_law is not None:
            for key, e in est.mc_divergences(law_next, q_law, ecfg.n_mc, gen).items():
                rows.append(_row(ctx, generation, f"intra_{key}", _ideal(e)))
            # Against q_i pushed to t0 — the ideal reverse process's output, which is what the
            # Girsanov bounds of PAPER.md §4 control (they ignore the t0 shrink).
            q_t0 = q_law.marginal(ctx.process, ctx.cfg.sampler.t0)
            for key, e in est.mc_divergences(law_next, q_t0, ecfg.n_mc, gen).items():
                rows.append(_row(ctx, generation, f"intra_{key}_t0", _ideal(e)))
    n_eval = min(ecfg.n_eval, len(samples))
    x = samples[rng.choice(len(samples), n_eval, replace=False)].astype(np.float64)
    real = ctx.target.sample(n_eval, gen).numpy()
    tr = train.x[rng.choice(len(train), min(n_eval, len(train)), replace=False)].astype(np.float64)
    if ecfg.exact and law_next is not None:
        rows.append(_row(ctx, nxt, "sampler_gap_kl", sampler_gap(ctx, generation, x, law_next)))
    for kind in ecfg.sample_based:
        if kind == "knn":
            # p's density is known: the kNN entropy form is far less biased than two-sample kNN.
            rows.append(
                _row(ctx, nxt, "accumulated_kl", est.knn_kl_known_b(x, ctx.target.log_prob))
            )
            if q_law is not None:
                rows.append(
                    _row(ctx, generation, "intra_kl", est.knn_kl_known_b(x, q_law.log_prob))
                )
            else:
                rows.append(_row(ctx, generation, "intra_kl", est.knn_kl(x, tr)))
        elif kind == "classifier":
            d = est.classifier_divergences(x, real, seed=int(rng.integers(2**31)))
            i = est.classifier_divergences(x, tr, seed=int(rng.integers(2**31)))
            rows.append(_row(ctx, nxt, "accumulated_chi2", d["chi2"]))
            rows.append(_row(ctx, nxt, "accumulated_kl", d["kl"]))
            rows.append(_row(ctx, generation, "intra_chi2", i["chi2"]))
            rows.append(_row(ctx, generation, "intra_kl", i["kl"]))
    for kind in ecfg.extra:
        if kind == "second_moment":
            rows.append(_row(ctx, nxt, "second_moment", est.second_moment(x)))
        elif kind == "sliced_w2":
            rows.append(_row(ctx, nxt, "sliced_w2", est.sliced_w2(x, real, generator=gen)))
        elif kind == "mmd":
            rows.append(_row(ctx, nxt, "mmd", est.mmd(x, real)))
    rows.append(_row(ctx, generation, "fraction_real", Estimate(train.fraction_real, 0.0, "exact")))
    return rows


def sampler_gap(ctx: ChainContext, generation: int, x: np.ndarray, law_next) -> Estimate:
    """KL(law of the sampler's actual output ‖ law of the ideal reverse process at t0): the
    start-up (N(0, I) instead of q_T) and discretisation errors that the exact-density D_{i+1}
    and I_i leave out (PAPER.md §2). Estimated on the generation's samples ``x`` with the ideal
    law's exact density (:func:`~collapselab.estimators.knn_kl_known_b_paired`)."""
    gen, _ = streams(ctx.seed, generation, "gap")
    sc = ctx.cfg.sampler
    try:
        e = est.knn_kl_known_b_paired(x, law_next, generator=gen)
    except ValueError as exc:  # too few samples for kNN batches, or duplicate samples
        return Estimate(float("nan"), float("nan"), "knn_paired", f"not estimated: {exc}")
    note = (f"law of the {sc.kind} samples ({sc.steps} steps, {sc.schedule} grid) against the "
            f"ideal reverse process's law; {e.note}")
    return Estimate(e.value, e.stderr, e.estimator, note)


def _ideal(e: Estimate) -> Estimate:
    """Label an exact-density estimate as being of the ideal reverse process's law."""
    note = "law of the ideal reverse process (start-up and discretisation errors ignored)"
    return Estimate(e.value, e.stderr, e.estimator, f"{e.note}; {note}" if e.note else note)


def measure_pathwise(ctx, generation, score, q_law, rows) -> list[dict]:
    """ε⋆,i², ε̂_i², η_i of generation i's model against q_i, and the bound_* checks of
    PAPER.md §4 against the measured I_i (rows already computed). Needs q_i's exact law.

    ε̂² follows the model's own reverse paths from its own T-marginal when its law is known
    (the start of the law the KL compares); then Prop 3.1 is an identity (de Bruijn) and
    ``calibration_eps_hat`` compares KL(p̂_t0 ‖ q_t0) with KL(p̂_T ‖ q_T) + ½ ε̂²."""
    from . import pathwise as pw
    from . import theory
    from .verdicts import render_check

    pc = ctx.cfg.pathwise
    if q_law is None or not (pc.score_energy or pc.learned or pc.observability):
        return []
    gen, _ = streams(ctx.seed, generation, "path")
    T, t0, i = ctx.process.T, ctx.cfg.sampler.t0, generation
    own_law = getattr(score, "output_law", None)
    exact_own = own_law is not None and own_law(T) is not None
    out, vals = [], {}
    sc = ctx.cfg.sampler  # ε̂² and η on the sampler's grid (its schedule, pathwise.steps steps)
    grid = time_grid(T, t0, pc.steps, schedule=sc.schedule, rho=sc.rho)
    if pc.score_energy:
        e = pw.score_energy_ideal(score, q_law, ctx.process, t0, T, pc.n_times, pc.n_mc, gen)
        out.append(_row(ctx, i, "score_energy_ideal", e))
        vals.update(eps_star_sq=e.value, eps_star_sq_stderr=e.stderr)
    if pc.learned:
        # The sampler's schedule: the error integrand is sharpest near t0, where a uniform
        # Euler grid under-resolves it (calibration_eps_hat shows it when the law is known).
        e = pw.score_energy_learned(
            score, q_law, ctx.process, t0, T, pc.steps, max(pc.n_paths, pc.min_paths), gen,
            start="model" if exact_own else "normal", times=grid, rel_tol=pc.rel_stderr,
            max_paths=max(pc.max_paths, pc.n_paths, pc.min_paths),
        )
        out.append(_row(ctx, i, "score_energy_learned", e))
        vals.update(eps_hat_sq=e.value, eps_hat_sq_stderr=e.stderr)
    if pc.observability:
        obs = pw.measure_observability(score, q_law, ctx.process, t0, T, pc.steps, pc.n_paths, gen,
                                       times=grid)
        out.append(_row(ctx, i, "observability", obs["eta"]))
        vals.update(eta=obs["eta"].value, eta_stderr=obs["eta"].stderr)
    if "eps_star_sq" not in vals:
        return out
    # The bounds control the divergence of p̂_{i+1} from q_i pushed to t0 (the ideal path's
    # output): its exact-density measurement is what each bound is checked against.
    for r in rows:
        if r["generation"] == i and r["metric"] in ("intra_kl_t0", "intra_chi2_t0"):
            key = r["metric"][: -len("_t0")]
            vals[key], vals[key + "_stderr"] = r["value"], r["stderr"]
    if exact_own and "eps_hat_sq" in vals and "intra_kl" in vals:
        # The identity's start term KL(p̂_T ‖ q_T), from the same exact-density estimator.
        # It is small (the forward process contracts KL towards 0), so fewer draws suffice.
        kl_T = est.mc_divergences(own_law(T), q_law.marginal(ctx.process, T),
                                  min(ctx.cfg.estimators.n_mc, 2000), gen)["kl"]
        out.append(_row(ctx, i, "intra_kl_T", kl_T))
        vals.update(kl_T=kl_T.value, kl_T_stderr=kl_T.stderr)
    checks = theory.check_single_generation(generation=i, i0=pc.i0, C=pc.C, c=pc.c,
                                            exact_own_law=exact_own, **vals)
    for chk in checks:
        row = _row(ctx, i, chk.name,
                   Estimate(chk.bound, chk.bound_stderr, "theory", render_check(chk)))
        row["held"], row["measured"] = chk.held, chk.measured
        row["status"], row["cause"] = chk.status.value, chk.cause.value
        out.append(row)
    return out


def generation_zero_rows(ctx: ChainContext) -> list[dict]:
    """Row 0: p̂_0 = p by convention, so D_0 = 0 exactly (PAPER.md §1)."""
    zero = Estimate(0.0, 0.0, "exact", "p̂_0 = p by convention")
    return [_row(ctx, 0, "accumulated_chi2", zero), _row(ctx, 0, "accumulated_kl", zero)]


# ---- the chain -----------------------------------------------------------------------------
def _law_history(ctx: ChainContext, upto: int) -> dict[int, object]:
    """Exact laws of p̂_1..p̂_upto, rebuilt from completed cells (deterministic, cheap)."""
    laws: dict[int, object] = {}
    if ctx.cfg.score.kind in ("analytic", "population_kde"):
        for g in range(upto):
            q = training_law(ctx, g, laws)
            laws[g + 1] = output_law(ctx, fit_score(ctx, g, None, q)[0])
    elif ctx.cfg.score.kind == "kde":
        for g in range(max(0, upto - 1), upto):  # only p̂_upto is needed (and kept) from here
            # On ctx.device, as fit_score puts them: a resumed chain evaluates p̂_upto's law
            # where an uninterrupted one does (same numbers, GPU speed).
            centres = torch.from_numpy(
                load_npy(ctx.store.cell(ctx.alpha, ctx.seed, g, ctx.params) / "train.npy")
            ).to(ctx.device)
            laws[g + 1] = output_law(ctx, KDEScore(centres, ctx.cfg.score.bandwidth, ctx.process))
    return laws


def adopt_generation_zero(
    store: RunStore, src_alpha: float, alpha: float, seed: int, params: dict | None = None
) -> bool:
    """Reuse generation 0 of the chain (src_alpha, seed, params) for α = ``alpha``.

    Generation 0 trains on p alone and its randomness does not depend on α, so its files and
    rows are identical for every α except the α column. Returns False when the source is not
    done (or the target already is). The copied metrics.json is written last, atomically.
    """
    src = store.cell(src_alpha, seed, 0, params)
    dst = store.cell(alpha, seed, 0, params)
    if not (src / "metrics.json").exists() or (dst / "metrics.json").exists():
        return False
    dst.mkdir(parents=True, exist_ok=True)
    for f in sorted(src.iterdir()):
        if f.name != "metrics.json" and not f.name.startswith("."):
            atomic_write_bytes(dst / f.name, f.read_bytes())
    meta = read_json(src / "metrics.json")
    meta["rows"] = [{**r, "alpha": float(alpha)} for r in meta["rows"]]
    meta["shared_from_alpha"] = float(src_alpha)
    meta.pop("files", None)
    write_cell_metrics(dst, meta)
    return True


def _load_training_set(cell) -> TrainingSet:
    return TrainingSet(load_npy(cell / "train.npy"), load_npy(cell / "provenance.npy"))


class ChainRunner:
    """One chain's generations as three steps, shared by :func:`run_chain` (one chain, one
    generation after another) and the batched executor (:mod:`collapselab.lockstep`, which
    fits the networks of several chains at one generation together):

        train, q_law = runner.prepare(i)          # q_i's training set and exact law
        score, state = runner.fit(i, train, q_law)   # or a batched fit of several chains
        seconds = runner.finish(i, train, q_law, score, state, fit_seconds)

    ``finish`` samples p̂_{i+1}, measures, writes generation i's cell (metrics.json last) and
    advances the chain. The runner holds what the next generation reads (the exact laws, the
    previous training set and samples), rebuilt from the run directory when it is created, so
    a runner created after an interruption continues with the same numbers.
    """

    def __init__(
        self, cfg: Config, alpha: float, seed: int, store: RunStore, params: dict | None = None
    ):
        params = dict(params or {})
        self.cfg = cfg.with_params(params)
        self.ctx = ChainContext(self.cfg, alpha, seed, store, params)
        self.G = self.cfg.loop.generations
        self.start = self.next = store.completed(alpha, seed, params)
        self.laws: dict[int, object] = {}
        self.previous: TrainingSet | None = None
        self.latest: np.ndarray | None = None
        if self.start < self.G and self.start:
            last = store.cell(alpha, seed, self.start - 1, params)
            self.previous = _load_training_set(last)
            self.latest = load_npy(last / "samples.npy")
        if self.start < self.G:
            self.laws = _law_history(self.ctx, self.start)

    @property
    def done(self) -> bool:
        return self.next >= self.G

    def _check(self, generation: int) -> None:
        if generation != self.next:  # the steps read state that only generation `next` matches
            raise ValueError(f"chain is at generation {self.next}, not {generation}")

    def prepare(self, generation: int) -> tuple[TrainingSet, object]:
        """q_i's training set (policies, from this generation's real/policy streams) and its
        exact law (None when unknown)."""
        self._check(generation)
        ctx, cfg, i = self.ctx, self.cfg, generation
        real_gen, _ = streams(ctx.seed, i, "real")
        _, policy_rng = streams(ctx.seed, i, "policy")
        train = build_training_set(
            cfg.loop.policy,
            i,
            alpha=ctx.alpha,
            n_train=cfg.loop.n_train,
            draw_real=lambda n, g=real_gen: ctx.target.sample(n, g).float().numpy(),
            # (images: resampled from the training split; mixtures: fresh exact draws)
            pools={i: self.latest} if i else {},
            previous=self.previous,
            rng=policy_rng,
            augmentation_lambda=cfg.loop.augmentation_lambda,
        )
        return train, training_law(ctx, i, self.laws)

    def fit(self, generation: int, train: TrainingSet, q_law):
        """This chain's own score fit (:func:`fit_score`, looked up at call time so that the
        executors' test hooks, which wrap it, apply)."""
        self._check(generation)
        return fit_score(self.ctx, generation, train, q_law)

    def finish(
        self, generation: int, train: TrainingSet, q_law, score, state, fit_seconds: float
    ) -> float:
        """Sample p̂_{i+1}, measure, write the cell; returns the generation's seconds
        (``fit_seconds``, the time spent preparing and fitting, plus sampling and measuring).
        Raises :class:`NonFiniteSamples` before anything is written when the samples are not
        finite."""
        self._check(generation)
        ctx, cfg, i = self.ctx, self.cfg, generation
        cell = ctx.store.cell(ctx.alpha, ctx.seed, i, ctx.params)
        t_fit = time.perf_counter()
        samples = draw_samples(ctx, score, cfg.loop.samples, i)
        if not np.isfinite(samples).all():
            # NaN/Inf would poison every later generation: stop before the cell is written.
            raise NonFiniteSamples(f"generation {i} produced NaN/Inf samples (the model diverged)")
        t_sample = time.perf_counter()
        law_next = output_law(ctx, score)
        self.laws[i + 1] = law_next
        rows = measure(ctx, i, samples, train, law_next, q_law)
        rows += measure_pathwise(ctx, i, score, q_law, rows)
        if i == 0:
            rows = generation_zero_rows(ctx) + rows
        t_end = time.perf_counter()
        atomic_save_npy(cell / "train.npy", train.x)
        atomic_save_npy(cell / "provenance.npy", train.origin)
        atomic_save_npy(cell / "samples.npy", samples)
        if state is not None:
            from .scores.neural import save_model

            save_model(cell / "model.safetensors", state, {"generation": i, "alpha": ctx.alpha})
        timings = {"fit": fit_seconds, "sample": t_sample - t_fit, "measure": t_end - t_sample}
        write_cell_metrics(cell, {"rows": rows, "timings": timings})
        self.previous, self.latest = train, samples
        if cfg.score.kind == "kde":
            self.laws.pop(i, None)  # finite-KDE laws hold the whole training set: keep p̂_{i+1}
        self.next = i + 1
        return fit_seconds + (t_end - t_fit)


def run_chain(
    cfg: Config,
    alpha: float,
    seed: int,
    store: RunStore,
    on_generation: Callable[[int, float], None] | None = None,
    params: dict | None = None,
) -> int:
    """Run (or resume) one chain; returns the number of generations computed now.

    ``params`` are the chain's values of swept keys other than α and seed (``cfg`` is the
    experiment's configuration; the chain runs ``cfg.with_params(params)``).
    """
    runner = ChainRunner(cfg, alpha, seed, store, params)
    for i in range(runner.start, runner.G):
        t_start = time.perf_counter()
        train, q_law = runner.prepare(i)
        score, state = runner.fit(i, train, q_law)
        seconds = runner.finish(i, train, q_law, score, state, time.perf_counter() - t_start)
        if on_generation is not None:
            on_generation(i, seconds)
    return max(0, runner.G - runner.start)
