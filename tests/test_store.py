import math

from collapselab.engine.store import atomic_write_json, read_json


def test_non_finite_values_round_trip_in_every_numeric_column(tmp_path):
    row = {"metric": "bound_kl_upper", "estimator": "theory", "note": "nan", "value": math.inf,
           "stderr": math.nan, "measured": -math.inf, "held": None}
    atomic_write_json(tmp_path / "m.json", {"rows": [row]})
    back = read_json(tmp_path / "m.json")["rows"][0]
    assert back["value"] == math.inf and math.isnan(back["stderr"])
    assert back["measured"] == -math.inf and back["held"] is None
    assert back["note"] == "nan"  # text columns stay text
    assert not list(tmp_path.glob(".*.tmp"))  # atomic write leaves no temporary file
