"""Typed, validated configuration: YAML in, resolved YAML out.

Every key is checked (type, range, cross-field consistency) before any compute; an unknown key
is an error. ``load_config`` turns any problem into a :class:`ConfigError` naming the field.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from .errors import ConfigError

PRESET_DIR = Path(__file__).parent / "presets"


class ConfigWarning(UserWarning):
    """A configuration that is accepted but probably not meant (a key given twice)."""


def _no_bool(v):
    # YAML's true/false are ints to pydantic; a count or a seed given as a boolean is a slip.
    if isinstance(v, bool):
        raise ValueError("must be an integer, not a boolean")
    return v


Prob = Annotated[float, Field(ge=0.0, le=1.0)]
PosInt = Annotated[int, BeforeValidator(_no_bool), Field(gt=0)]
NonNegInt = Annotated[int, BeforeValidator(_no_bool), Field(ge=0)]
PosFloat = Annotated[float, Field(gt=0.0, allow_inf_nan=False)]
NonNegFloat = Annotated[float, Field(ge=0.0, allow_inf_nan=False)]
# Fewest points the kNN estimators of a non-image run accept (10 batches of more than k + 1).
MIN_POINTS = 70
# Seeds are stored in the results table's int64 column.
Seed = Annotated[int, BeforeValidator(_no_bool), Field(ge=0, le=2**63 - 1)]


TRAIN_BACKEND_ENV = "COLLAPSELAB_TRAIN_BACKEND"


def default_train_backend() -> str:
    """``$COLLAPSELAB_TRAIN_BACKEND`` if set, else "torch" (never chosen by the machine)."""
    import os

    return os.environ.get(TRAIN_BACKEND_ENV, "").strip() or "torch"


def enable_native_backend() -> None:
    """Import collapselab.fast, which registers the "native" MLP trainer (the one place outside
    cli/api that imports it); a clear error where it is absent or broken."""
    try:
        import collapselab.fast  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - absent, or unimportable on this machine
        raise ValueError(f"train_backend: native needs the optional package collapselab.fast, "
                         f"which cannot be imported here ({type(exc).__name__}: {exc}); "
                         f"use train_backend: torch") from None


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class TargetConfig(_Strict):
    """The target law p. ``gmm``: means (K×dim); ``paper_gmm``: the paper's layout; ``ring``:
    2-D toy; ``dataset``: images from a local dataset (p is its empirical law)."""

    kind: Literal["gmm", "ring", "paper_gmm", "dataset"] = "ring"
    dim: PosInt = 2
    means: list[list[float]] | None = None
    std: PosFloat | list[PosFloat] = 0.5
    weights: list[NonNegFloat] | None = None
    n_components: PosInt = 8
    radius: PosFloat = 4.0
    dataset: Literal["digits", "fashion-mnist", "mnist", "cifar10", "npy", "npz"] = "digits"
    root: str | None = None
    classes: list[NonNegInt] | None = None
    downsample: PosInt | None = None
    limit: PosInt | None = None

    @model_validator(mode="after")
    def _check(self):
        if self.kind == "ring" and self.dim != 2:
            raise ValueError("dim: the ring target is 2-D; use dim: 2")
        if self.kind == "paper_gmm" and self.dim < 2:
            raise ValueError("dim: the paper layout needs dim >= 2")
        if self.kind == "dataset":
            if self.dataset in ("npy", "npz") and not self.root:
                raise ValueError("root: required for dataset npy/npz (path of the array file)")
            return self
        if self.means is not None:
            if self.kind != "gmm":
                raise ValueError("means: only allowed with kind: gmm")
            for row in self.means:
                if len(row) != self.dim:
                    raise ValueError(f"means: every mean must have dim={self.dim} entries")
        elif self.kind == "gmm":
            raise ValueError("means: required with kind: gmm (a list of K points of length dim)")
        k = self.components
        if isinstance(self.std, list) and len(self.std) != k:
            raise ValueError(f"std: give one value or {k} values (one per component)")
        if self.weights is not None:
            if len(self.weights) != k:
                raise ValueError(f"weights: need {k} values (one per component)")
            if abs(sum(self.weights) - 1.0) > 1e-6:
                raise ValueError("weights: must sum to 1")
        return self

    @property
    def components(self) -> int:
        if self.kind == "gmm":
            return len(self.means or [])
        return 5 if self.kind == "paper_gmm" else self.n_components


class ProcessConfig(_Strict):
    """Forward process: ``ou`` (the paper's) or ``vp`` with a linear β schedule."""

    kind: Literal["ou", "vp"] = "ou"
    T: PosFloat = 4.0
    beta_min: PosFloat = 0.1
    beta_max: PosFloat = 20.0


class ScoreConfig(_Strict):
    """Score model. analytic: exact score of q_i (oracle); kde: finite KDE on the training set;
    population_kde: the N → ∞ KDE (law stays a Gaussian mixture); mlp / unet: ε-prediction
    networks trained by denoising score matching (EMA weights sample); plugin: the model
    ``factory(**options)`` returns (``package.module:function`` or a name registered in the
    ``collapselab.models`` entry-point group; docs/plugins.md); diffusers: a diffusers UNet2DModel
    with its DDPM scheduler (image targets; ``options`` are the adapter's arguments). ``objective:
    flow_matching`` (mlp / unet) trains a velocity field by conditional flow matching instead
    (linear path, noise at flow time 0; ``coupling: ot`` pairs each batch by minibatch optimal
    transport), sampled by the ODE (``sampler.kind: ode``) over its own time [0, 1]."""

    kind: Literal["analytic", "kde", "population_kde", "mlp", "unet", "plugin", "diffusers"] = "kde"
    objective: Literal["dsm", "flow_matching"] = "dsm"
    coupling: Literal["independent", "ot"] = "independent"
    # Its square enters the kernels' variances: a bound far above any data scale keeps it finite.
    bandwidth: Annotated[float, Field(gt=0.0, le=1e6, allow_inf_nan=False)] = 0.6
    factory: str | None = None
    options: dict[str, Any] = {}
    # networks
    hidden: PosInt = 128
    layers: PosInt = 3
    base_channels: PosInt = 32
    channel_mults: list[PosInt] = [1, 2]
    num_res_blocks: PosInt = 1
    attention_levels: list[NonNegInt] = []
    dropout: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.1
    # training (denoising score matching)
    train_steps: PosInt = 2000
    epochs: PosFloat | None = None
    epochs_first: PosFloat | None = None
    batch_size: PosInt = 512
    lr: PosFloat = 2e-3
    weight_decay: NonNegFloat = 0.0
    optimizer: Literal["adam", "adamw"] = "adam"
    schedule: Literal["constant", "cosine"] = "constant"
    ema_decay: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.999
    patience: PosInt | None = None
    val_fraction: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.0
    warm_start: bool = False
    # The MLP trainer: "torch" (autograd, PyTorch's ensembling for K chains) or "native" (the
    # optional CPU accelerator collapselab.fast). Never chosen by the machine: the default is
    # torch unless $COLLAPSELAB_TRAIN_BACKEND says otherwise.
    train_backend: Literal["torch", "native"] = Field(default_factory=default_train_backend)

    @model_validator(mode="after")
    def _check_backend(self):
        if self.train_backend not in ("torch", "native"):  # a default from the environment
            raise ValueError(f"train_backend: allowed values are 'torch', 'native' (got "
                             f"{self.train_backend!r} from ${TRAIN_BACKEND_ENV})")
        if self.train_backend == "native":
            enable_native_backend()
        return self

    # CUDA speed-ups of the U-Net's DSM step (scores/gpu_fast.py): true = all, or a list of
    # bf16 / channels_last / compile / cuda_graphs. Ignored on CPU.
    gpu_fast: bool | list[str] = False

    @field_validator("gpu_fast", mode="before")
    @classmethod
    def _gpu_fast(cls, value):
        allowed = ["bf16", "channels_last", "compile", "cuda_graphs"]
        ok = isinstance(value, bool) or (
            isinstance(value, list) and all(v in allowed for v in value)
        )
        if not ok:
            got = f" (got {value!r})" if isinstance(value, list) else ""  # scalars: added
            raise ValueError(f"must be true, false or a list of {allowed}{got}")
        return value

    @model_validator(mode="after")
    def _check(self):
        if self.patience is not None and self.val_fraction == 0:
            raise ValueError("patience: early stopping needs a validation split (val_fraction > 0)")
        if self.kind == "plugin" and not (self.factory and self.factory.strip()):
            raise ValueError("factory: required with kind: plugin (package.module:function or "
                             "a name registered in the collapselab.models entry-point group)")
        if self.kind != "plugin" and self.factory is not None:
            raise ValueError("factory: only allowed with kind: plugin")
        if self.kind not in ("plugin", "diffusers") and self.options:
            raise ValueError("options: only allowed with kind: plugin or diffusers")
        if self.objective == "flow_matching" and self.kind not in ("mlp", "unet"):
            raise ValueError("objective: flow_matching needs a network (kind: mlp or unet)")
        if self.coupling == "ot" and self.objective != "flow_matching":
            raise ValueError("coupling: ot is for objective: flow_matching")
        return self


class SamplerConfig(_Strict):
    """Reverse-time sampler from T to t0 with ``steps`` steps (paper: 500, t0 = 0.02).
    ``ode``: the probability-flow ODE by Heun's method (deterministic given the start noise);
    a flow-matching model integrates its own velocity over [0, 1] in ``steps`` Heun steps."""

    kind: Literal["euler_maruyama", "ddpm", "ode"] = "euler_maruyama"
    steps: PosInt = 500
    t0: NonNegFloat = 0.02
    # The reverse-time grid (processes.time_grid): geometric and edm are finest near t0, where
    # the reverse drift is stiffest; uniform is DDPM's grid. ε̂² and η use the same schedule.
    schedule: Literal["uniform", "geometric", "edm"] = "geometric"
    rho: PosFloat = 7.0  # the edm schedule's exponent (Karras et al. 2022)
    # DDPM's "clip_denoised" (Ho et al.'s sampler): each step's predicted x0 clamped to the
    # data range [-1, 1] of image targets. Changes the output law: images only.
    clip: bool = False


class LoopConfig(_Strict):
    """The recursion: policy building q_i's training set, generations, set sizes."""

    policy: Literal[
        "fresh_mixture", "replace", "accumulate", "accumulate_subsample", "augmentation"
    ] = "fresh_mixture"
    generations: PosInt = 5
    n_train: PosInt = 2000
    n_samples: PosInt | None = None
    augmentation_lambda: NonNegFloat = 1.0

    @property
    def samples(self) -> int:
        return self.n_samples or self.n_train


class EstimatorConfig(_Strict):
    """Which divergence estimators run each generation and with how many points.

    For image targets the divergences are measured in the feature space of a classifier
    trained in-project (``feature_dim``, ``feature_epochs``); ``extra`` may then also hold
    fid_local, kid, precision_recall and density_coverage."""

    exact: bool = True
    sample_based: list[Literal["classifier", "knn"]] = ["knn"]
    n_mc: PosInt = 20000
    n_eval: PosInt = 2000
    extra: list[
        Literal[
            "second_moment",
            "sliced_w2",
            "mmd",
            "fid_local",
            "kid",
            "precision_recall",
            "density_coverage",
        ]
    ] = ["second_moment", "sliced_w2"]
    feature_dim: PosInt = 32
    feature_epochs: PosFloat | None = None
    # flow_likelihood (networks sampled by sampler.kind: ode): the model's own ODE outputs
    # whose change-of-variables log densities give D_i and I_i by importance sampling.
    n_flow: PosInt = 1000


class PathwiseConfig(_Strict):
    """Path quantities per generation (docs/paper.md §3), when q_i's law is known exactly:
    ε⋆² by quadrature over ``n_times`` points (``n_mc`` draws each), ε̂² along at least
    ``max(n_paths, min_paths)`` learned trajectories (more until ``rel_stderr`` is met), η
    (costly: ``n_paths`` ideal trajectories + a regression) and the bound_* rows of docs/paper.md §4
    with the unknown constants C, c and the transient i0."""

    score_energy: bool = True
    learned: bool = True
    observability: bool = False
    n_times: Annotated[int, BeforeValidator(_no_bool), Field(ge=3)] = 50
    n_mc: PosInt = 1000
    n_paths: PosInt = 1000
    # ε̂²: at least min_paths learned paths, then more (batches of that size, up to max_paths)
    # until its stderr is below rel_stderr of the mean — path energies are strongly skewed.
    min_paths: PosInt = 2000
    max_paths: PosInt = 20000
    rel_stderr: Annotated[float, Field(gt=0.0, le=1.0)] = 0.1
    steps: PosInt = 100
    i0: NonNegInt = 0
    C: NonNegFloat = 0.0
    c: NonNegFloat = 0.0


class SweepConfig(_Strict):
    """The grid of chains: α × seeds × any other swept key (``score.bandwidth: [0.3, 0.6]``).

    ``alpha``/``seed`` are accepted as spellings of ``alphas``/``seeds``; every other key is a
    dotted path of the configuration with a list of values, and becomes a column of the results.
    """

    alphas: list[Prob] = [0.1, 0.5, 0.9]
    seeds: list[Seed] = [0, 1]
    grid: dict[str, list[Any]] = {}

    @model_validator(mode="before")
    @classmethod
    def _collect_grid(cls, data):
        if not isinstance(data, dict):
            return data
        data = dict(data)
        for single, plural in (("alpha", "alphas"), ("seed", "seeds")):
            if single in data:
                if plural in data:
                    raise ValueError(f"{single}: give either {single} or {plural}, not both")
                data[plural] = data.pop(single)
        grid = dict(data.pop("grid", None) or {})
        for key in list(data):
            if key not in ("alphas", "seeds"):
                grid[key] = data.pop(key)
        data["grid"] = grid
        return data

    @model_validator(mode="after")
    def _nonempty(self):
        if not self.alphas:
            raise ValueError("alphas: give at least one fresh-data fraction in [0, 1]")
        if not self.seeds:
            raise ValueError("seeds: give at least one non-negative integer seed")
        for key, values in self.grid.items():
            if key.split(".")[0] in ("sweep", "name", "description", "notes"):
                raise ValueError(f"{key}: this key cannot be swept")
            if "." not in key:
                raise ValueError(
                    f"{key}: unknown key (sweep alphas, seeds or a dotted config "
                    "key such as score.bandwidth)"
                )
            if not isinstance(values, list) or not values:
                raise ValueError(f"{key}: give a non-empty list of values to sweep")
        return self

    def combinations(self) -> list[dict[str, Any]]:
        """Every assignment of the swept keys other than α and seed (one empty dict if none)."""
        combos: list[dict[str, Any]] = [{}]
        for key, values in self.grid.items():
            combos = [{**c, key: v} for c in combos for v in values]
        return combos


class Config(_Strict):
    name: str = "custom"
    description: str = ""
    target: TargetConfig = TargetConfig()
    process: ProcessConfig = ProcessConfig()
    score: ScoreConfig = ScoreConfig()
    sampler: SamplerConfig = SamplerConfig()
    loop: LoopConfig = LoopConfig()
    estimators: EstimatorConfig = EstimatorConfig()
    pathwise: PathwiseConfig = PathwiseConfig()
    sweep: SweepConfig = SweepConfig()
    device: Literal["cpu", "cuda"] | str = "cpu"
    notes: str = ""

    @model_validator(mode="after")
    def _cross(self):
        if self.sampler.t0 >= self.process.T:
            raise ValueError("sampler.t0: must be smaller than process.T")
        if self.sampler.schedule == "geometric" and self.sampler.t0 <= 0:
            raise ValueError("sampler.schedule: geometric needs sampler.t0 > 0 "
                             "(allowed with t0 = 0: uniform, edm)")
        image = self.target.kind == "dataset"
        if image and self.score.kind not in ("mlp", "unet", "diffusers", "plugin"):
            raise ValueError("score.kind: image targets need a network score (mlp, unet, "
                             "diffusers or plugin)")
        if not image and self.score.kind in ("unet", "diffusers"):
            raise ValueError(f"score.kind: {self.score.kind} needs an image target "
                             "(target.kind: dataset)")
        if self.sampler.clip and not (image and self.sampler.kind == "ddpm"):
            raise ValueError("sampler.clip: only with sampler.kind ddpm on an image target "
                             "(target.kind: dataset, pixels in [-1, 1])")
        if not image:
            # Checked here, not by the run that would die on them after writing its directory.
            pc = self.pathwise
            if self.sampler.t0 == 0 and (pc.score_energy or pc.learned or pc.observability):
                raise ValueError("sampler.t0: must be > 0 when pathwise quantities are measured "
                                 "(their time grids are geometric down to t0); or set "
                                 "pathwise.score_energy, learned and observability to false")
            for field, n in (("estimators.n_eval", self.estimators.n_eval),
                             ("loop.n_train", self.loop.n_train),
                             ("loop.n_samples", self.loop.samples)):
                if n < MIN_POINTS:
                    raise ValueError(f"{field}: must be at least {MIN_POINTS} (the kNN "
                                     "estimators split the points into 10 batches of more "
                                     "than k + 1 = 6)")
        if not re.fullmatch(r"cpu|cuda(:[0-9]+)?", self.device):
            raise ValueError("device: allowed values are cpu, cuda, cuda:N (N = 0, 1, …)")
        if self.process.kind == "vp" and self.process.beta_max < self.process.beta_min:
            raise ValueError("process.beta_max: must be >= process.beta_min")
        for params in self.sweep.combinations() if self.sweep.grid else []:
            try:
                self.with_params(params)
            except ConfigError as exc:
                raise ValueError(f"sweep.{exc.field}: {str(exc).split(': ', 1)[1]}") from None
        return self

    def with_params(self, params: dict[str, Any]) -> Config:
        """The configuration of one chain of the grid: swept keys set, grid emptied."""
        if not params:
            return self
        data = self.model_dump(mode="json")
        data["sweep"]["grid"] = {}
        for key, value in params.items():
            apply_override(data, key.split("."), value)
        return build_config(data)

    def dump(self) -> str:
        """The resolved configuration as YAML, without the keys that do not apply to the
        chosen kinds (applicable_dump)."""
        return yaml.safe_dump(applicable_dump(self), sort_keys=False, allow_unicode=True)


_NETWORK_TRAINING = ("train_steps", "epochs", "epochs_first", "batch_size", "lr", "weight_decay",
                     "optimizer", "schedule", "ema_decay", "patience", "val_fraction",
                     "warm_start")
_UNET = ("base_channels", "channel_mults", "num_res_blocks", "attention_levels")
# (section, key) → when the key is used. Keys not listed always apply (new keys stay visible).
APPLIES = {
    ("target", "means"): lambda c: c.target.kind == "gmm",
    ("target", "weights"): lambda c: c.target.kind in ("gmm", "paper_gmm"),
    ("target", "n_components"): lambda c: c.target.kind == "ring",
    ("target", "radius"): lambda c: c.target.kind == "ring",
    ("target", "std"): lambda c: c.target.kind != "dataset",
    **{("target", k): (lambda c: c.target.kind == "dataset")
       for k in ("dataset", "root", "classes", "downsample", "limit")},
    ("process", "beta_min"): lambda c: c.process.kind == "vp",
    ("process", "beta_max"): lambda c: c.process.kind == "vp",
    ("score", "bandwidth"): lambda c: c.score.kind in ("kde", "population_kde"),
    ("score", "hidden"): lambda c: c.score.kind == "mlp",
    ("score", "layers"): lambda c: c.score.kind == "mlp",
    ("score", "dropout"): lambda c: c.score.kind == "unet",
    **{("score", k): (lambda c: c.score.kind == "unet") for k in _UNET},
    **{("score", k): (lambda c: c.score.kind in ("mlp", "unet")) for k in _NETWORK_TRAINING},
    ("sampler", "clip"): lambda c: c.sampler.kind == "ddpm",
    ("sampler", "rho"): lambda c: c.sampler.schedule == "edm",
    ("loop", "augmentation_lambda"): lambda c: c.loop.policy == "augmentation",
    ("estimators", "feature_dim"): lambda c: c.target.kind == "dataset",
    ("estimators", "feature_epochs"): lambda c: c.target.kind == "dataset",
}


def applicable_dump(cfg: Config) -> dict:
    """``cfg.model_dump(mode="json")`` without the keys that apply to none of the chains'
    kinds (APPLIES; every swept combination is considered) and still hold their default, so
    config.yaml shows what the run uses. A key set to a non-default value is kept even where
    it does not apply: dropping it would make the resumed configuration differ."""
    data = cfg.model_dump(mode="json")
    chain_cfgs = [cfg.with_params(p) for p in cfg.sweep.combinations()] if cfg.sweep.grid \
        else [cfg]
    defaults = Config().model_dump(mode="json")
    for (section, key), applies in APPLIES.items():
        sec = data.get(section)
        if not isinstance(sec, dict) or key not in sec:
            continue
        if any(applies(c) for c in chain_cfgs):
            continue
        if sec[key] == (defaults.get(section) or {}).get(key, object()):
            del sec[key]
    return data


# ---- loading ----------------------------------------------------------------------------
def list_presets() -> dict[str, str]:
    """Preset name → one-line description."""
    out = {}
    for path in sorted(PRESET_DIR.glob("*.yaml")):
        data = yaml.safe_load(path.read_text()) or {}
        out[path.stem] = str(data.get("description", "")).strip().splitlines()[0:1]
        out[path.stem] = out[path.stem][0] if out[path.stem] else ""
    return out


class _WarningLoader(yaml.SafeLoader):
    """yaml.safe_load, warning (:class:`ConfigWarning`) about a key given twice in one
    mapping (YAML keeps the last silently)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                continue
            key = key_node.value
            if key in seen:
                warnings.warn(f"{self.name}: key '{key}' given twice (line "
                              f"{key_node.start_mark.line + 1}); the last value is used",
                              ConfigWarning, stacklevel=2)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def preset_notes(name: str) -> str:
    """A preset's ``notes`` (what it reproduces and what was scaled), one paragraph."""
    data = yaml.safe_load((PRESET_DIR / f"{name}.yaml").read_text()) or {}
    return " ".join(str(data.get("notes", "") or "").split())


def show_preset(name: str) -> str:
    """A preset's YAML as written, with its ``notes`` turned into comments at the top, ready to
    save, edit and run (``collapselab show NAME > my.yaml``)."""
    import textwrap

    path = PRESET_DIR / f"{name}.yaml"
    if not path.exists():
        names = ", ".join(list_presets())
        raise ConfigError("preset", f"no preset named '{name}' (presets: {names})")
    lines, out, skipping = path.read_text().splitlines(), [], False
    for line in lines:
        if line.startswith("notes:"):
            skipping = True  # the block (folded or plain) ends at the next top-level key
            continue
        if skipping and (line.startswith((" ", "\t")) or not line.strip()):
            continue
        skipping = False
        out.append(line)
    notes = preset_notes(name)
    head = [f"# collapselab preset '{name}': save, edit and run with `collapselab run FILE`."]
    if notes:
        head += ["#"] + ["# " + t for t in textwrap.wrap(notes, 94)]
    return "\n".join(head + out) + "\n"


def _read_source(source: str | Path) -> dict:
    path = Path(source)
    if not path.suffix and (PRESET_DIR / f"{source}.yaml").exists():
        path = PRESET_DIR / f"{source}.yaml"
    if not path.exists():
        names = ", ".join(list_presets())
        raise ConfigError("config", f"no preset or file named '{source}' (presets: {names})")
    if not path.is_file():
        raise ConfigError(str(path), "is a directory, not a YAML file")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(str(path), "not a YAML file (not UTF-8 text)") from None
    except OSError as exc:
        raise ConfigError(str(path), f"cannot be read ({exc.strerror})") from None
    if "\0" in text:
        raise ConfigError(str(path), "not a YAML file (binary content)")
    try:
        loader = _WarningLoader(text)
        loader.name = str(path)
        try:
            data = loader.get_single_data()
        finally:
            loader.dispose()
    except yaml.YAMLError as exc:
        line = getattr(getattr(exc, "problem_mark", None), "line", None)
        where = f" (line {line + 1})" if line is not None else ""
        raise ConfigError(str(path), f"not valid YAML{where}") from None
    if data is None or data == {}:
        # Running the whole default experiment from an empty file is never what was meant.
        raise ConfigError(str(path), "the file is empty; give at least one key (see "
                                     "`collapselab presets` for complete examples)")
    if not isinstance(data, dict):
        raise ConfigError(str(path), "the top level must be a mapping of keys")
    return data


def parse_override(text: str) -> tuple[list[str], Any]:
    """``key.path=value``; the value is parsed as YAML so lists and numbers work."""
    if "=" not in text:
        raise ConfigError("--set", f"expected key.path=value, got '{text}'")
    key, raw = text.split("=", 1)
    if not key.strip():
        raise ConfigError("--set", f"empty key in '{text}'")
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        value = raw
    path = key.strip().split(".")
    if path[0] == "sweep" and len(path) > 2:  # sweep.score.bandwidth: one swept dotted key
        path = ["sweep", ".".join(path[1:])]
    return path, value


def apply_override(data: dict, path: list[str], value: Any) -> None:
    node = data
    for part in path[:-1]:
        nxt = node.get(part)
        if nxt is None:
            nxt = node[part] = {}
        if not isinstance(nxt, dict):
            raise ConfigError(".".join(path), f"'{part}' is not a section")
        node = nxt
    node[path[-1]] = value


def _format_error(err: ValidationError) -> ConfigError:
    first = err.errors()[0]
    loc = [str(p) for p in first["loc"]]
    if loc[:2] == ["sweep", "grid"]:  # swept keys are written sweep.<key>: say it so
        loc = ["sweep", *loc[2:]]
    msg = first["msg"]
    if first["type"] == "extra_forbidden":
        return ConfigError(".".join(loc), "unknown key (check the spelling; see the presets)")
    if first["type"] == "literal_error":
        return ConfigError(".".join(loc), msg.replace("Input should be", "allowed values are"))
    # Errors raised by our validators carry "field: message"; qualify the field by its section.
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
        if ": " in msg:
            field, rest = msg.split(": ", 1)
            prefix = loc[:1] if loc and "." not in field else []
            return ConfigError(".".join(prefix + [field]), rest)
        return ConfigError(".".join(loc) or "config", msg)
    got = first.get("input")
    if got is not None and not isinstance(got, dict | list):
        msg = f"{msg} (got {got!r})"
    return ConfigError(".".join(loc) or "config", msg)


def build_config(data: dict) -> Config:
    try:
        return Config.model_validate(data)
    except ValidationError as err:
        raise _format_error(err) from None


# Public names of the readers, for experiments that validate their own models (observability).
read_source = _read_source
format_error = _format_error


def load_config(source: str | Path, overrides: list[str] = ()) -> Config:
    """Read a preset name or YAML file, apply ``--set`` overrides, validate everything."""
    data = _read_source(source)
    for text in overrides:
        path, value = parse_override(text)
        apply_override(data, path, value)
    return build_config(data)


def repeated_overrides(overrides: list[str]) -> list[str]:
    """One line for each key that ``--set`` gives more than once (the last value wins)."""
    given: dict[str, str] = {}
    out = []
    for text in overrides:
        try:
            key = ".".join(parse_override(text)[0])
        except ConfigError:
            continue  # load_config reports it
        if key in given:
            out.append(f"--set {key} given twice ('{given[key]}', then '{text}'); the last "
                       "value is used")
        given[key] = text
    return out
