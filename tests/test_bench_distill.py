"""The distillation benchmark harness: one command -> JSON + markdown with the command in its header;
a trained teacher as the reference, --set overrides, guided per-class scoring, the cost columns."""

import dataclasses
import json

import jax
import numpy as np
import pytest

from fewstep_jax.bench import distill as bench
from fewstep_jax.evaluation.scoring import class_distances, make_reference
from fewstep_jax.evaluation.student_eval import student_condition
from fewstep_jax.evaluation.teacher_solvers import solve_batched, solver_samplers
from fewstep_jax.solvers import make_grid
from fewstep_jax.testbeds.exact import make_testbed

N = 64  # evaluation noises
SMALL = [
    "--testbeds=gmm8",
    "--steps=3",
    "--nfes=1,2",
    "--teacher_solvers=euler,dpmpp_2m",
    f"--set=eval.num_samples={N}",
    "--set",
    "testbed.num_reference=500",
    "--set=train.log_every=1",
]


def _rows(payload, method, tb="gmm8"):
    return {r["nfe"]: r for r in payload["testbeds"][tb]["rows"] if r["method"] == method}


@pytest.fixture(scope="module")
def analytic(tmp_path_factory):
    d = tmp_path_factory.mktemp("analytic")
    argv = [*SMALL, "--recipes=traflow", f"--out={d / 'a.json'}", f"--workdir_root={d / 'runs'}"]
    argv += ["--set", "train.batch_size=64", "--set=model.width=16"]
    return bench.main(argv), d, argv


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    """A tiny unconditional train_teacher run (5 steps) with its config.json, as main writes it."""
    from fewstep_jax.main import save_config
    from fewstep_jax.modes.dryrun import load_config_file
    from fewstep_jax.modes.train_teacher import train_teacher

    d = tmp_path_factory.mktemp("teacher")
    c = load_config_file("configs/gmm8_teacher.py")
    c.model.width, c.model.num_classes = 16, 0
    c.train.num_steps, c.train.batch_size, c.train.log_every, c.train.checkpoint_every = 5, 64, 5, 5
    c.eval.train_num_samples, c.eval.train_nfes, c.eval.train_solvers = 64, (1,), ("euler",)
    c.testbed.num_reference = 500
    # a velocity far from the zero-initialised output, and the loaded (eval-EMA) params are the trained ones
    c.optim.lr, c.optim.warmup_steps, c.ema.decay = 1e-2, 1, 0.0
    save_config(c, str(d))
    train_teacher(c, str(d))
    return d


def test_one_command_writes_json_and_markdown_with_the_command(analytic):
    payload, d, argv = analytic
    saved = json.loads((d / "a.json").read_text())
    md = (d / "a.md").read_text()
    assert saved["command"] == payload["command"] == bench._command(argv)
    assert payload["command"].startswith("python -m fewstep_jax.bench.distill --testbeds=gmm8")
    assert f"Command: `{payload['command']}`" in md and "--set train.batch_size=64" in md
    assert payload["machine"] in md and f"Total: {payload['seconds']:.0f} s" in md
    student = _rows(saved, "traflow")
    assert set(student) == {1, 2}
    assert {"teacher euler", "teacher dpmpp_2m", "teacher (converged)"} <= {
        r["method"] for r in saved["testbeds"]["gmm8"]["rows"]
    }
    assert "| traflow | 1 |" in md and "| teacher dpmpp_2m | 2 |" in md
    assert saved["testbeds"]["gmm8"]["reference"]["per_class"] is False


def test_set_overrides_reach_every_run(analytic):
    payload, d, _ = analytic
    r = _rows(payload, "traflow")[1]
    assert r["batch"] == 64 and r["steps"] == 3
    assert payload["testbeds"]["gmm8"]["reference"]["num_samples"] == N
    # the trained network has the overridden width (checkpointed params of the run)
    from fewstep_jax.teachers.neural import latest_checkpoint, restore_state_tree

    state = restore_state_tree(latest_checkpoint(d / "runs" / "gmm8_traflow"))
    assert np.shape(state["params"]["input_proj"]["kernel"])[1] == 16
    assert payload["sets"]["model.width"] == 16


def test_cost_columns_count_teacher_nfe_from_the_metrics(analytic):
    from fewstep_jax.runs.writers import read_metrics

    payload, d, _ = analytic
    r = _rows(payload, "traflow")[1]
    assert r["wall_seconds"] >= r["train_seconds"] > 0
    per = bench.teacher_nfe_per_step(read_metrics(d / "runs" / "gmm8_traflow"))
    if per is None:  # a loss that does not report teacher_nfe: the cell stays empty
        assert "teacher_nfe" not in r
    else:
        assert r["teacher_nfe"] == pytest.approx(per * 3 * 64) and per > 0


def test_teacher_nfe_sums_terms_and_is_empty_without_the_metric(tmp_path):
    rows = [{"step": 1, "loss": 1.0}, {"step": 2, "a/teacher_nfe": 2.0, "fake/b/teacher_nfe": 1.0}]
    rows.append({"step": 3, "teacher_nfe": 5.0})
    assert bench.teacher_nfe_per_step(rows) == pytest.approx(4.0)
    assert bench.teacher_nfe_per_step(rows[:1]) is None
    c = bench.load_distill_config("gmm8", "traflow", 10)
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows[:1]))
    cost = bench.distill_cost(c, str(tmp_path), 2.0, 1.0)
    assert "teacher_nfe" not in cost and cost["steps"] == 10
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    cost = bench.distill_cost(c, str(tmp_path), 2.0, 1.0)
    assert cost["teacher_nfe"] == pytest.approx(4.0 * 10 * int(c.train.batch_size))
    # reflow: the pairs' generation is teacher evaluations too
    c = bench.load_distill_config("gmm8", "reflow", 10)
    cost = bench.distill_cost(c, str(tmp_path), 2.0, 1.0)
    pairs = int(c.student.pairs.num) * 2 * int(c.student.pairs.steps)  # Heun: 2 NFE per step
    assert cost["teacher_nfe"] == pytest.approx(4.0 * 10 * int(c.train.batch_size) + pairs)


def test_set_parsing_and_unknown_keys():
    assert bench.parse_sets(["a.b=1e-3", "c=ddpm", "d=(1, 2)", "e=True"]) == {
        "a.b": 1e-3,
        "c": "ddpm",
        "d": (1, 2),
        "e": True,
    }
    with pytest.raises(ValueError, match="key=value"):
        bench.parse_sets(["nokey"])
    c = bench.run_config("gmm8", "traflow", 5, sets={"testbed.path": "ddpm", "eval.num_samples": 32})
    assert c.testbed.path == "ddpm" and c.eval.num_samples == 32 and c.train.num_steps == 5
    with pytest.raises(ValueError, match=r"eval\.num_sample"):
        bench.run_config("gmm8", "traflow", sets={"eval.num_sample": 3})
    c = bench.run_config("gmm8", "tcd", nfes=(1, 2, 4, 8), gammas=(0.0, 0.3))
    assert tuple(c.sampler.nfes) == (1, 2, 4, 8) and tuple(c.sampler.gammas) == (0.0, 0.3)


def test_teacher_workdir_is_the_reference(teacher_dir, analytic, tmp_path):
    from fewstep_jax.teachers.neural import load_teacher_from_workdir

    # 0 student steps: the student is its teacher's copy, so its k-jump chain is the teacher's Euler
    argv = [*SMALL, "--recipes=traflow", f"--teacher_workdir={teacher_dir}", f"--out={tmp_path / 'n.json'}"]
    argv += [f"--workdir_root={tmp_path / 'runs'}", "--set=train.num_steps=0"]
    payload = bench.main(argv)
    ref = payload["testbeds"]["gmm8"]["reference"]
    assert ref["teacher"] == f"neural:{teacher_dir.name}" and not ref["per_class"]
    # the converged row is the neural teacher's adaptive solve of the same noise
    neural = load_teacher_from_workdir(teacher_dir)
    testbed = dataclasses.replace(make_testbed("gmm8", "rf", num_reference=500), teacher=neural)
    nref = make_reference(testbed, N, 0, 1000)
    x0 = nref.x0
    assert np.mean((x0 - nref.x1) ** 2) > 1e-3  # a trained teacher, not the identity
    conv = next(iter(_rows(payload, "teacher (converged)").values()))
    assert conv["sw2"] == pytest.approx(testbed.distances(x0)["sw2"], rel=1e-5)
    student, euler = _rows(payload, "traflow"), _rows(payload, "teacher euler")
    for nfe in (1, 2):
        assert student[nfe]["flow_map_mse"] == pytest.approx(euler[nfe]["flow_map_mse"], rel=1e-4)
        # the teacher rows are the neural teacher's, not the analytic teacher's
        a, n = _rows(analytic[0], "teacher dpmpp_2m")[nfe], _rows(payload, "teacher dpmpp_2m")[nfe]
        assert abs(a["sw2"] - n["sw2"]) > 1e-3 and abs(a["flow_map_mse"] - n["flow_map_mse"]) > 1e-3
    r = student[1]
    assert r["teacher_steps_frac"] == 0.0 and r["steps"] == 0
    wall = json.loads((teacher_dir / "teacher_eval.json").read_text())["wall_seconds"]
    assert r["teacher_seconds_frac"] == pytest.approx(r["wall_seconds"] / wall, rel=0.05)
    md = (tmp_path / "n.md").read_text()
    assert "teacher_steps_frac" in md and str(teacher_dir) in md
    assert payload["teacher"]["steps"] == 5 and payload["teacher_workdir"] == str(teacher_dir)


def test_cost_fraction_of_the_teacher_training(tmp_path):
    c = bench.load_distill_config("gmm8", "traflow", 30)
    run = bench.TeacherRun("t", None, c, steps=300, batch=64, wall_seconds=50.0)
    cost = bench.distill_cost(c, str(tmp_path), 10.0, 8.0, run)
    assert cost["teacher_steps_frac"] == pytest.approx(0.1)
    assert cost["teacher_seconds_frac"] == pytest.approx(0.2)
    cost = bench.distill_cost(c, str(tmp_path), 10.0, 8.0, dataclasses.replace(run, wall_seconds=None))
    assert "teacher_seconds_frac" not in cost and "teacher_steps_frac" in cost


def test_teacher_of_another_testbed_is_refused(teacher_dir):
    run = bench.load_teacher_run(str(teacher_dir))
    c = bench.load_distill_config("checker", "traflow", 5)
    with pytest.raises(ValueError, match="trained on testbed 'gmm8'"):
        bench.adopt_teacher(c, run)


def test_guidance_scores_per_class_with_the_guided_teacher(tmp_path):
    argv = [*SMALL, "--recipes=traflow", "--guidance=2", "--set=model.num_classes=8", "--set=model.width=16"]
    argv += ["--set=train.num_steps=0", f"--out={tmp_path / 'g.json'}", f"--workdir_root={tmp_path / 'r'}"]
    argv += ["--nfes=1", "--teacher_solvers=euler"]  # the last flag wins
    payload = bench.main(argv)
    ref = payload["testbeds"]["gmm8"]["reference"]
    assert ref["per_class"] and ref["guidance"] == 2.0 and ref["num_classes"] == 8
    testbed = make_testbed("gmm8", "rf", num_reference=500)
    labels = np.arange(N) % 8
    x1 = np.asarray(testbed.teacher.prior(jax.random.PRNGKey(0), N))
    # the teacher rows: guided (scale 2) with the balanced labels, distances per class
    grid = make_grid("uniform", 1, testbed.teacher.path)
    y = solve_batched(testbed.teacher, x1, grid, "euler", 64, False, labels, 2.0)
    row = _rows(payload, "teacher euler")[1]
    assert row["sw2"] == pytest.approx(class_distances(testbed, y, labels)["sw2"], rel=1e-5)
    assert row["sw2"] != pytest.approx(testbed.distances(y)["sw2"], rel=1e-3)
    # the data floor per class, with the data's own labels
    fresh = testbed.sample_data(np.random.default_rng(1), N)
    floor = _rows(payload, "data (same size)")[0]
    per_class = class_distances(testbed, fresh["x"], fresh["label"])
    assert floor["sw2"] == pytest.approx(per_class["sw2"], rel=1e-5)
    assert set(_rows(payload, "traflow")) == {1}
    assert "per class" in (tmp_path / "g.md").read_text()


def test_pooled_scores_conditional_samples_against_the_whole_data(tmp_path):
    argv = [*SMALL, "--recipes=traflow", "--set=model.num_classes=8", "--set=model.width=16", "--pooled"]
    argv += ["--set=train.num_steps=0", f"--out={tmp_path / 'p.json'}", f"--workdir_root={tmp_path / 'r'}"]
    argv += ["--nfes=1", "--teacher_solvers=euler"]
    payload = bench.main(argv)
    ref = payload["testbeds"]["gmm8"]["reference"]
    assert not ref["per_class"] and ref["num_classes"] == 8 and payload["pooled"]
    testbed = make_testbed("gmm8", "rf", num_reference=500)
    labels = np.arange(N) % 8
    x1 = np.asarray(testbed.teacher.prior(jax.random.PRNGKey(0), N))
    grid = make_grid("uniform", 1, testbed.teacher.path)
    y = solve_batched(testbed.teacher, x1, grid, "euler", 64, False, labels)
    row = _rows(payload, "teacher euler")[1]
    assert row["sw2"] == pytest.approx(testbed.distances(y)["sw2"], rel=1e-5)
    assert row["sw2"] != pytest.approx(class_distances(testbed, y, labels)["sw2"], rel=1e-3)


def test_guidance_needs_a_conditional_student(tmp_path):
    with pytest.raises(ValueError, match="num_classes"):
        bench.main([*SMALL, "--recipes=traflow", "--guidance=2", f"--out={tmp_path / 'x.json'}"])


def test_student_condition_and_guided_solver_samplers():
    c = bench.load_distill_config("gmm8", "tcd_cfg", 5)
    ref = dataclasses.make_dataclass("R", ["label", "guidance"])(np.arange(6) % 3, 2.5)
    cond = student_condition(c, ref)
    np.testing.assert_array_equal(cond["label"], np.arange(6) % 3)
    np.testing.assert_allclose(cond["guidance"], 1.5)  # LCM form w' = W - 1
    assert student_condition(c, ref.__class__(None, 1.0)) == {}
    testbed = make_testbed("gmm8", "rf", num_reference=100)
    x1 = np.asarray(testbed.teacher.prior(jax.random.PRNGKey(0), 8))
    lab = np.arange(8) % 8
    plain = solver_samplers(testbed.teacher, ("euler",), "uniform")["euler"](x1, 1)
    guided = solver_samplers(testbed.teacher, ("euler",), "uniform", 1000, False, lab, 3.0)["euler"](x1, 1)
    assert np.abs(plain - guided).max() > 1e-2


def test_reference_tolerance_trades_nfe_for_error():
    testbed = make_testbed("gmm8", "rf", num_reference=500)
    loose = make_reference(testbed, N, 0, N, rtol=1e-3)
    tight = make_reference(testbed, N, 0, N)
    assert loose.nfe < tight.nfe
    assert loose.mse_vs_tighter > tight.mse_vs_tighter
    assert np.allclose(loose.x0, tight.x0, atol=0.05)


def test_reference_rtol_flag_reaches_the_payload(analytic):
    payload, _, _ = analytic
    assert payload["reference_rtol"] == 1e-5
