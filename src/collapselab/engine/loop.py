"""One recursive chain (α, seed): generations 0..G−1, resumable (docs/paper.md §1).

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
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..config import Config
from ..measure import estimators as est
from ..measure.estimate import Estimate
from ..policies import TrainingSet, build_training_set, training_law_weights
from ..processes import OU, VPProcess, time_grid
from ..samplers import SAMPLERS, heun
from ..scores import registry
from ..targets import (
    EmpiricalTarget,
    GaussianMixture,
    LawMixture,
    mix_laws,
    paper_gmm_means,
    ring,
)
from .hooks import Hooks
from .store import (
    RunStore,
    atomic_save_npy,
    atomic_write_bytes,
    load_npy,
    read_json,
    write_cell_metrics,
)

PLUGIN_CHECKPOINT = "model.safetensors"  # a plug-in's state_dict(), where networks keep theirs
_STREAMS = {"real": 1, "policy": 2, "train": 3, "sample": 4, "eval": 5, "eval_real": 6, "path": 7,
            "gap": 8}


class NonFiniteSamples(FloatingPointError):
    """A generation's samples contain NaN/Inf (a diverged model); the chain stops there."""


@functools.lru_cache(maxsize=2)
def _empirical_target(dataset: str, root: str | None, classes: tuple[int, ...] | None,
                      downsample: int | None, limit: int | None, where: str) -> EmpiricalTarget:
    """Loaded once per process and data location (``where``): the CLI's check and every chain
    of an in-process run share it (loading an image data set is not free). Read-only."""
    from ..datasets import load_dataset

    kw = dict(root=root, classes=classes, downsample=downsample)
    test_split = "train" if dataset in ("npy", "npz") else "test"
    return EmpiricalTarget(
        load_dataset(dataset, split="train", limit=limit, **kw),
        load_dataset(dataset, split=test_split, **kw),
    )


def build_target(cfg: Config) -> GaussianMixture | EmpiricalTarget:
    t = cfg.target
    if t.kind == "dataset":
        from ..datasets import default_root

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
    workspace (read when cuBLAS starts, so set before the first product). Process-wide. On a
    GPU, two identical U-Net chains differ in their metrics without it; MLP chains
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
            from ..measure.features import FeatureExtractor

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
    from ..scores.neural import raw_state

    s = ctx.cfg.score
    prev = ctx.store.cell(ctx.alpha, ctx.seed, generation - 1, ctx.params) / "model.safetensors"
    init = raw_state(prev) if s.warm_start and generation > 0 and prev.exists() else None
    _, rng = streams(ctx.seed, generation, "train")
    return int(rng.integers(2**31)), init, max(ctx.cfg.sampler.t0, 1e-3)


def fit_score(ctx: ChainContext, generation: int, train: TrainingSet, q_law):
    """Fit generation i's score model (any kind: :mod:`.scores.registry`). Returns (score,
    state): what the chain samples and measures with, and what it checkpoints (or None)."""
    model = registry.make_model(ctx.cfg.score)
    _fit(ctx, model, generation, torch.from_numpy(train.x), q_law)
    return registry.ModelScore(model, ctx.event_shape), registry.model_state(model)


def _fit(ctx: ChainContext, model, generation: int, x: torch.Tensor, q_law) -> None:
    """``model.fit`` on generation i's training set ``x`` with the chain's seed of that
    generation (its ``train`` stream) and the extras the model's fit asks for."""

    def init_state():
        return _neural_inputs(ctx, generation)[1]

    _, rng = streams(ctx.seed, generation, "train")
    extras = {"generation": lambda: generation, "device": lambda: ctx.device,
              "law": lambda: q_law, "t_min": lambda: max(ctx.cfg.sampler.t0, 1e-3),
              "init_state": init_state}
    registry.fit_model(model, x, seed=int(rng.integers(2**31)), process=ctx.process,
                       extras=extras)


def fit_scores_batched(
    ctxs: list[ChainContext],
    generation: int,
    trains: list[TrainingSet],
    *,
    threads: int | None = None,
) -> list[tuple]:
    """:func:`fit_score` for several MLP chains of one group at one generation, trained
    together (:func:`~collapselab.scores.neural.fit_neural_batched`). Chain k gets what
    fit_score would give it (same init, seed, warm start, schedule and draws; the same numbers
    up to float rounding). The chains must share
    the score/sampler/process configuration (one group: they differ in α and seed only) and
    training sets of one shape. A diverged chain raises TrainingDivergedError with ``.chain``,
    its index in ``ctxs``."""
    from ..scores.neural import fit_neural_batched

    first = ctxs[0]
    if first.cfg.score.objective != "dsm":  # the batched trainer is DSM's: fit one by one
        return [fit_score(c, generation, t, None) for c, t in zip(ctxs, trains, strict=True)]
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
    if getattr(score, "draws_itself", False):
        return _model_samples(ctx, score, n, gen)
    sc = ctx.cfg.sampler
    x = torch.randn((n, *ctx.event_shape), generator=gen, dtype=torch.float32)
    times = time_grid(ctx.process.T, sc.t0, sc.steps, schedule=sc.schedule, rho=sc.rho)
    # Chunks bound the memory of network forwards; each chunk's noise follows from the stream.
    chunk = n if not ctx.is_image else 512
    clip = {"clip": (-1.0, 1.0)} if sc.clip else {}  # image pixels live in [-1, 1]
    if sc.kind == "ode" and hasattr(score, "velocity"):  # flow matching: its own time [0, 1]
        from ..measure.likelihood import velocity_flow

        flow = velocity_flow(score, sc.steps)
        with torch.no_grad():
            out = [heun(flow.field, x[i : i + chunk].to(ctx.device), flow.times)
                   for i in range(0, n, chunk)]
        return torch.cat(out).float().cpu().numpy()
    out = [
        SAMPLERS[sc.kind](
            score, x[i : i + chunk].to(ctx.device), times, ctx.process, generator=gen, **clip
        )
        for i in range(0, n, chunk)
    ]
    return torch.cat(out).float().cpu().numpy()


def _model_samples(ctx: ChainContext, score, n: int, gen: torch.Generator) -> np.ndarray:
    """n draws of p̂_{i+1} by a model that samples itself (``sample(n, generator=...)``), in
    chunks for images (memory), each chunk's randomness from the chain's sample stream."""
    chunk = n if not ctx.is_image else 512
    out = []
    for i in range(0, n, chunk):
        m = min(chunk, n - i)
        x = torch.as_tensor(score.sample(m, generator=gen)).detach()
        if tuple(x.shape) != (m, *ctx.event_shape):
            raise ValueError(f"the model's sample({m}) returned shape {tuple(x.shape)}, "
                             f"expected {(m, *ctx.event_shape)}")
        out.append(x.float().cpu())
    return torch.cat(out).numpy()


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
    """Image runs: D_{i+1} and I_i in the feature space of a classifier (docs/paper.md §5: the
    Gaussian χ² proxy; KL, Fréchet distance, KID, precision/recall, density/coverage too).
    D compares with p's held-out split, I with the training set of q_i."""
    from ..measure import feature_metrics as fm

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
        # A model's own law (sample + log_prob) is exactly what it drew: no ideal-process caveat.
        label = (lambda e: e) if getattr(law_next, "exact_model_law", False) else _ideal
        for key, e in est.mc_divergences(law_next, ctx.target, ecfg.n_mc, gen).items():
            rows.append(_row(ctx, nxt, f"accumulated_{key}", label(e)))
        if q_law is not None:
            for key, e in est.mc_divergences(law_next, q_law, ecfg.n_mc, gen).items():
                rows.append(_row(ctx, generation, f"intra_{key}", label(e)))
        if q_law is not None and has_marginals(q_law) and label is _ideal:
            # Against q_i pushed to t0 — the ideal reverse process's output, which is what the
            # Girsanov bounds of docs/paper.md §4 control (they ignore the t0 shrink).
            q_t0 = q_law.marginal(ctx.process, ctx.cfg.sampler.t0)
            for key, e in est.mc_divergences(law_next, q_t0, ecfg.n_mc, gen).items():
                rows.append(_row(ctx, generation, f"intra_{key}_t0", label(e)))
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


def model_flow(ctx: ChainContext, model):
    """The ODE that ``model`` is sampled by (``sampler.kind: ode``), as a
    :class:`~collapselab.measure.likelihood.ODEFlow`; None for the SDE samplers. The
    probability-flow
    grid is draw_samples' own (the sampler's schedule); a flow-matching model's is uniform on
    [0, 1]."""
    from ..measure.likelihood import pf_ode_flow, velocity_flow

    sc = ctx.cfg.sampler
    if sc.kind != "ode":
        return None
    if hasattr(model, "velocity"):
        return velocity_flow(model, sc.steps)
    return pf_ode_flow(model, ctx.process,
                       time_grid(ctx.process.T, sc.t0, sc.steps, schedule=sc.schedule, rho=sc.rho))


def measure_flow(ctx: ChainContext, generation: int, model) -> list[dict]:
    """D_{i+1} and I_i (χ², KL) of a network sampled by an ODE, by importance sampling with the
    model's change-of-variables log density (estimator ``flow_likelihood``,
    :func:`collapselab.measure.likelihood.flow_divergences`): ``estimators.n_flow`` of the model's
    own
    ODE outputs, against p and against q_i = Σ_g w_g p̂_g (p̂_0 = p; p̂_g, g ≥ 1, by the reverse
    ODE likelihood of generation g−1's saved model). Gaussian-mixture targets."""
    from ..measure.likelihood import flow_divergences
    from ..scores.neural import load_model

    cfg, ecfg = ctx.cfg, ctx.cfg.estimators
    if ctx.is_image or not ecfg.exact or cfg.score.kind not in ("mlp", "unet"):
        return []
    flow = model_flow(ctx, model)
    if flow is None or flow.euler_last:  # t0 = 0: the reverse ODE cannot start at the data
        return []
    weights = training_law_weights(cfg.loop.policy, generation, ctx.alpha,
                                   cfg.loop.augmentation_lambda)
    parts = []
    for g, w in weights.items():
        if w <= 0:
            continue
        if g == 0:
            parts.append((w, ctx.target.log_prob))
            continue
        prev = ctx.store.cell(ctx.alpha, ctx.seed, g - 1, ctx.params) / "model.safetensors"
        prev_flow = model_flow(ctx, load_model(prev, cfg.score, ctx.process, ctx.device))
        parts.append((w, lambda x, f=prev_flow: f.log_prob(x)[0].cpu()))

    def log_q(x):
        terms = [math.log(w) + lp(x).double() for w, lp in parts]
        return torch.logsumexp(torch.stack(terms), dim=0)

    gen, _ = streams(ctx.seed, generation, "eval")
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**62, (1,), generator=gen)))
    laws = {"accumulated": ctx.target.log_prob}
    if not (len(parts) == 1 and 0 in weights and weights[0] >= 1.0):
        laws["intra"] = log_q
    est_ = flow_divergences(flow, laws, ecfg.n_flow, gen, dim=math.prod(ctx.event_shape))
    est_.setdefault("intra_chi2", est_["accumulated_chi2"])  # q_0 = p
    est_.setdefault("intra_kl", est_["accumulated_kl"])
    nxt = generation + 1
    return [_row(ctx, nxt, "accumulated_chi2", est_["accumulated_chi2"]),
            _row(ctx, nxt, "accumulated_kl", est_["accumulated_kl"]),
            _row(ctx, generation, "intra_chi2", est_["intra_chi2"]),
            _row(ctx, generation, "intra_kl", est_["intra_kl"])]


def measure_target_energy(ctx: ChainContext, generation: int, model) -> list[dict]:
    """``score_energy_target``: ∫ β E_{p_t}‖ŝ_i − ∇log p_t‖² dt, the (implied) score error of
    generation i's network against the *target* p rather than q_i (docs/paper.md §3's ε⋆² with q_i
    replaced by p; equal to ε⋆,0² at generation 0). Defined at every generation of a neural
    chain on a Gaussian-mixture target, where ε⋆,i² needs q_i's exact law and is not."""
    from ..measure import pathwise as pw

    pc = ctx.cfg.pathwise
    if ctx.is_image or not pc.score_energy or ctx.cfg.score.kind not in ("mlp", "unet"):
        return []
    gen, _ = streams(ctx.seed, generation, "path")
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**62, (1,), generator=gen)))
    e = pw.score_energy_ideal(model, ctx.target, ctx.process, ctx.cfg.sampler.t0,
                              ctx.process.T, pc.n_times, pc.n_mc, gen)
    note = f"against the target p (not q_i); {e.note}"
    return [_row(ctx, generation, "score_energy_target",
                 Estimate(e.value, e.stderr, e.estimator, note))]


def sampler_gap(ctx: ChainContext, generation: int, x: np.ndarray, law_next) -> Estimate:
    """KL(law of the sampler's actual output ‖ law of the ideal reverse process at t0): the
    start-up (N(0, I) instead of q_T) and discretisation errors that the exact-density D_{i+1}
    and I_i leave out (docs/paper.md §2). Estimated on the generation's samples ``x`` with the ideal
    law's exact density (:func:`~collapselab.measure.estimators.knn_kl_known_b_paired`)."""
    gen, _ = streams(ctx.seed, generation, "gap")
    sc = ctx.cfg.sampler
    try:
        e = est.knn_kl_known_b_paired(x, law_next, generator=gen)
    except ValueError as exc:  # too few samples for kNN batches, or duplicate samples
        return Estimate(float("nan"), float("nan"), "knn_paired", f"not estimated: {exc}")
    note = (f"law of the {sc.kind} samples ({sc.steps} steps, {sc.schedule} grid) against the "
            f"ideal reverse process's law; {e.note}")
    return Estimate(e.value, e.stderr, e.estimator, note)


def has_marginals(law) -> bool:
    """Whether ``law``'s forward marginals (and their scores) are known exactly: Gaussian
    mixtures, finite-KDE laws and mixtures of them; not a plug-in model's own law."""
    if isinstance(law, LawMixture):
        return all(has_marginals(part) for part in law.laws)
    return callable(getattr(law, "marginal", None))


def _ideal(e: Estimate) -> Estimate:
    """Label an exact-density estimate as being of the ideal reverse process's law."""
    note = "law of the ideal reverse process (start-up and discretisation errors ignored)"
    return Estimate(e.value, e.stderr, e.estimator, f"{e.note}; {note}" if e.note else note)


def measure_pathwise(ctx, generation, score, q_law, rows) -> list[dict]:
    """ε⋆,i², ε̂_i², η_i of generation i's model against q_i, and the bound_* checks of
    docs/paper.md §4 against the measured I_i (rows already computed). Needs q_i's exact law.

    ε̂² follows the model's own reverse paths from its own T-marginal when its law is known
    (the start of the law the KL compares); then Prop 3.1 is an identity (de Bruijn) and
    ``calibration_eps_hat`` compares KL(p̂_t0 ‖ q_t0) with KL(p̂_T ‖ q_T) + ½ ε̂²."""
    from .. import theory
    from ..measure import pathwise as pw
    from ..verdicts import render_check

    pc = ctx.cfg.pathwise
    if q_law is None or not (pc.score_energy or pc.learned or pc.observability):
        return []
    if not (has_marginals(q_law) and getattr(score, "has_score", True)):
        return []  # a model without a score, or a q_i whose noised scores are unknown
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
        if ctx.cfg.sampler.kind == "ode":  # along the ODE's own paths (no Girsanov identity)
            from ..measure.likelihood import score_energy_ode

            e = score_energy_ode(score, q_law, ctx.process, t0, T, pc.steps,
                                 max(pc.n_paths, pc.min_paths), gen, times=grid)
        else:
            # The sampler's schedule: the error integrand is sharpest near t0, where a uniform
            # Euler grid under-resolves it (calibration_eps_hat shows it when the law is known).
            e = pw.score_energy_learned(
                score, q_law, ctx.process, t0, T, pc.steps, max(pc.n_paths, pc.min_paths), gen,
                start="model" if exact_own else "normal", times=grid, rel_tol=pc.rel_stderr,
                max_paths=max(pc.max_paths, pc.n_paths, pc.min_paths),
            )
        out.append(_row(ctx, i, "score_energy_learned", e))
        if ctx.cfg.sampler.kind != "ode":  # KL ≤ ½ ε̂² is Girsanov's: a statement on the SDE
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
    """Row 0: p̂_0 = p by convention, so D_0 = 0 exactly (docs/paper.md §1)."""
    zero = Estimate(0.0, 0.0, "exact", "p̂_0 = p by convention")
    return [_row(ctx, 0, "accumulated_chi2", zero), _row(ctx, 0, "accumulated_kl", zero)]


# ---- the chain -----------------------------------------------------------------------------
def _law_history(ctx: ChainContext, upto: int) -> dict[int, object]:
    """Exact laws of p̂_1..p̂_upto, rebuilt from completed cells (deterministic): each
    generation's model restored (:func:`_restore_model`) and asked for its output law. Models
    whose law holds their training set (``law_memory = "last"``: the finite KDE) keep only
    p̂_upto; models without an exact output law rebuild nothing."""
    laws: dict[int, object] = {}
    if upto == 0:
        return laws
    probe = registry.make_model(ctx.cfg.score)
    if not registry.has_output_law(probe):
        return laws
    first = upto - 1 if getattr(probe, "law_memory", "all") == "last" else 0
    for g in range(first, upto):
        q = training_law(ctx, g, laws)
        model = _restore_model(ctx, g, q)
        laws[g + 1] = output_law(ctx, registry.ModelScore(model, ctx.event_shape))
    return laws


def _restore_model(ctx: ChainContext, generation: int, q_law):
    """Generation i's fitted model, from its cell: loaded from its checkpoint when the model
    has ``load_state_dict`` and one was written, else fitted again on the cell's training set
    with the same seed (the fits here are deterministic). On ctx.device, as the fit put it:
    a resumed chain evaluates laws where an uninterrupted one does (same numbers)."""
    cell = ctx.store.cell(ctx.alpha, ctx.seed, generation, ctx.params)
    model = registry.make_model(ctx.cfg.score)
    ckpt = cell / PLUGIN_CHECKPOINT
    if callable(getattr(model, "load_state_dict", None)) and ckpt.exists():
        from ..scores.plugin_state import load_state

        model.load_state_dict(load_state(ckpt))
        return model
    path = cell / "train.npy"
    # (The analytic kinds read q_i's law, not the data: their laws rebuild without cells.)
    x = torch.from_numpy(load_npy(path)) if path.exists() else None
    _fit(ctx, model, generation, x, q_law)
    return model


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
    generation after another) and the batched executor (:mod:`collapselab.engine.lockstep`, which
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
        self, cfg: Config, alpha: float, seed: int, store: RunStore, params: dict | None = None,
        hooks: Hooks | None = None,
    ):
        params = dict(params or {})
        self.hooks = hooks if hooks else None  # the test hooks, called before each fit
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
        self.law_memory = getattr(registry.make_model(self.cfg.score), "law_memory", "all")

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
        """This chain's own score fit (:func:`fit_score`), the test hooks called first."""
        self._check(generation)
        if self.hooks is not None:
            self.hooks.at_fit(self.ctx, generation)
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
        rows += measure_flow(ctx, i, score) + measure_target_energy(ctx, i, score)
        if i == 0:
            rows = generation_zero_rows(ctx) + rows
        t_end = time.perf_counter()
        atomic_save_npy(cell / "train.npy", train.x)
        atomic_save_npy(cell / "provenance.npy", train.origin)
        atomic_save_npy(cell / "samples.npy", samples)
        if isinstance(state, dict):  # a plug-in's state_dict()
            from ..scores.plugin_state import save_state

            save_state(cell / PLUGIN_CHECKPOINT, state,
                       {"generation": i, "alpha": ctx.alpha, "score": cfg.score.kind,
                        "factory": cfg.score.factory})
        elif state is not None:
            from ..scores.neural import save_model

            save_model(cell / "model.safetensors", state, {"generation": i, "alpha": ctx.alpha})
        timings = {"fit": fit_seconds, "sample": t_sample - t_fit, "measure": t_end - t_sample}
        write_cell_metrics(cell, {"rows": rows, "timings": timings})
        self.previous, self.latest = train, samples
        if self.law_memory == "last":
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
    hooks: Hooks | None = None,
) -> int:
    """Run (or resume) one chain; returns the number of generations computed now.

    ``params`` are the chain's values of swept keys other than α and seed (``cfg`` is the
    experiment's configuration; the chain runs ``cfg.with_params(params)``); ``hooks`` are
    the test hooks (:class:`collapselab.engine.hooks.Hooks`) called before each score fit.
    """
    runner = ChainRunner(cfg, alpha, seed, store, params, hooks=hooks)
    for i in range(runner.start, runner.G):
        t_start = time.perf_counter()
        train, q_law = runner.prepare(i)
        score, state = runner.fit(i, train, q_law)
        seconds = runner.finish(i, train, q_law, score, state, time.perf_counter() - t_start)
        if on_generation is not None:
            on_generation(i, seconds)
    return max(0, runner.G - runner.start)
