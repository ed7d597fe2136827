import pytest

from collapselab.config import build_config, list_presets, load_config
from collapselab.errors import ConfigError


@pytest.mark.parametrize(
    "data, field",
    [
        ({"sweep": {"alphas": [1.5]}}, "sweep.alphas"),
        ({"sampler": {"steps": -3}}, "sampler.steps"),
        ({"target": {"kind": "gmm", "dim": 3, "means": [[0, 0]]}}, "target.means"),
        ({"bogus": 1}, "bogus"),
        ({"score": {"kind": "transformer"}}, "score.kind"),
        ({"score": {"bandwidth": 0}}, "score.bandwidth"),
        ({"loop": {"policy": "keep_all"}}, "loop.policy"),
        ({"sampler": {"t0": 5.0}}, "sampler.t0"),
        (
            {"target": {"kind": "gmm", "dim": 2, "means": [[0, 0], [1, 1]], "weights": [0.5]}},
            "target.weights",
        ),
        ({"device": "tpu"}, "device"),
        ({"sampler": {"kind": "ddpm", "clip": True}}, "sampler.clip"),  # not an image target
    ],
)
def test_bad_values_name_the_field(data, field):
    with pytest.raises(ConfigError) as info:
        build_config(data)
    msg = str(info.value)
    assert msg.startswith(field), msg
    assert "\n" not in msg


def test_every_preset_validates():
    names = list_presets()
    assert {"quickstart", "paper-gmm", "paper-gmm-cpu"} <= set(names)
    from collapselab.experiments.observability import experiment_of, load_observability_config

    for name in names:
        if experiment_of(name) is not None:  # a non-chain experiment validates its own keys
            load_observability_config(name)
            continue
        cfg = load_config(name)
        assert cfg.name == name


def test_overrides_scalars_and_lists():
    cfg = load_config(
        "quickstart", ["sweep.alphas=[0.2, 0.3]", "loop.generations=2", "score.kind=population_kde"]
    )
    assert cfg.sweep.alphas == [0.2, 0.3]
    assert cfg.loop.generations == 2 and cfg.score.kind == "population_kde"
    with pytest.raises(ConfigError, match="^loop.nope"):
        load_config("quickstart", ["loop.nope=1"])
    with pytest.raises(ConfigError, match="^--set"):
        load_config("quickstart", ["loop.generations"])


def test_unknown_source():
    with pytest.raises(ConfigError, match="no preset or file"):
        load_config("no-such-preset")


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config("quickstart")
    path = tmp_path / "c.yaml"
    path.write_text(cfg.dump())
    assert load_config(str(path)) == cfg
