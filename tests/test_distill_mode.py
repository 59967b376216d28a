"""The distill mode end to end on an exact testbed: trains a recipe, scores it, writes a report."""

import json

from fewstep_jax.modes.distill import distill


def test_distill_recipe_trains_scores_and_reports(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(".")
    from fewstep_jax.bench.distill import load_distill_config

    c = load_distill_config(
        "gmm8",
        "traflow",
        60,
        {"eval.num_samples": 300, "testbed.num_reference": 1000, "train.log_every": 20, "model.width": 32},
    )
    d = distill(c, str(tmp_path))
    assert int(d.state.step) == 60
    res = json.loads((tmp_path / "eval.json").read_text())
    methods = {(r["method"], r["nfe"]) for r in res["rows"]}
    assert {("traflow", 1), ("traflow", 4), ("teacher euler", 1), ("teacher euler", 4)} <= methods
    student_1 = next(r for r in res["rows"] if r["method"] == "traflow" and r["nfe"] == 1)
    assert student_1["steps"] == 60 and student_1["flow_map_mse"] > 0
    text = (tmp_path / "report.md").read_text()
    assert "| traflow | 1 |" in text and "samples.png" in text and "trajectories.png" in text
    assert (tmp_path / "loss_curve.png").exists() and "loss_curve.png" in text
