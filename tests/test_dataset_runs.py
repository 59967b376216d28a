"""Real-dataset (tfds:<name>) runs end to end on a tiny TFDS dataset built locally (offline):
train_teacher with FID in its evaluations, distillation from that teacher (with data and
data-free), and clear errors for a wrong dataset or an incomplete FID set-up."""

import json
import logging
import math
import os

import numpy as np
import pytest

from fewstep_jax.modes.distill import distill
from fewstep_jax.modes.dryrun import load_config_file
from fewstep_jax.modes.train_teacher import train_teacher
from fewstep_jax.runs import writers
from fewstep_jax.teachers.neural import latest_checkpoint
from fewstep_jax.testbeds import make_testbed_from_config
from fewstep_jax.testbeds.dataset import DatasetTestbed
from tests.tfds_local import build_image_dataset

tfds = pytest.importorskip("tensorflow_datasets")

SIZE, N_IMAGES, N_CLASSES = 8, 64, 10
STEPS = 4
FID_BATCH, FID_RESIZE = 16, 75  # one Inception compilation for every FID of the module


def _examples() -> list[tuple[np.ndarray, int]]:
    # smooth random colour blobs: images with some structure, labels 0..9
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE] / SIZE
    out = []
    for i in range(N_IMAGES):
        cy, cx, r = rng.uniform(0.2, 0.8, 3)
        blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (0.05 + 0.1 * r))
        img = blob[..., None] * rng.uniform(0, 255, 3) + rng.uniform(0, 40, (SIZE, SIZE, 3))
        out.append((np.clip(img, 0, 255).astype(np.uint8), i % N_CLASSES))
    return out


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> str:
    """A tiny CIFAR-like dataset prepared locally (no download), like tests/test_data.py's."""

    d = tmp_path_factory.mktemp("tfds")
    shape = (SIZE, SIZE, 3)
    build_image_dataset(d, "TinyCifar", lambda _: _examples(), shape, N_CLASSES, ("train",), "array_record")
    return os.fspath(d)


@pytest.fixture(scope="module")
def fid_files(tmp_path_factory, data_dir) -> tuple[str, str]:
    """Random Inception weights in the converted-.npz format and the dataset's reference stats."""
    import jax
    from flax import traverse_util
    from jax.sharding import Mesh

    from fewstep_jax.data import load_dataset
    from fewstep_jax.metrics import fid, inception

    d = tmp_path_factory.mktemp("fid")
    params = inception.random_inception_params(seed=0)
    weights = os.fspath(d / "inception_random.npz")
    with open(weights, "wb") as f:
        np.savez(f, **traverse_util.flatten_dict(params, sep="/"))
    x = load_dataset("tfds:tiny_cifar", data_dir=data_dir)["x"]
    mesh = Mesh(np.array(jax.local_devices()), ("data",))
    acts = fid.compute_activations(params, x, FID_BATCH, mesh, resize_to=FID_RESIZE)
    ref = os.fspath(d / "tiny_cifar_stats.npz")
    fid.save_reference_stats(ref, *fid.compute_statistics(acts))
    return weights, ref


def tiny_unet(m) -> None:
    """The scale UNet config shrunk to one 16-channel level (compiles in seconds)."""
    m.sample_size = SIZE
    m.block_out_channels = (16,)
    m.down_block_types, m.up_block_types = ("DownBlock2D",), ("UpBlock2D",)
    m.layers_per_block = 1
    m.attention_head_dim = 16
    m.norm_num_groups = 4
    m.dropout = 0.0
    m.dtype = "float32"


def shrink(c, data_dir: str, fid: tuple[str, str] | None) -> None:
    """A scale config at test size: the tiny dataset, a tiny UNet, a few steps, small evals."""
    c.testbed.name, c.testbed.data_dir = "tfds:tiny_cifar", data_dir
    tiny_unet(c.model)
    for aux in c.aux_nets.values():  # e.g. TDM's fake score, a copy of the full-size model
        tiny_unet(aux.model)
    c.train.num_steps, c.train.batch_size = STEPS, 16
    c.train.log_every, c.train.checkpoint_every = 2, STEPS
    c.train.async_checkpoints = False
    c.optim.warmup_steps = 1
    c.mesh.data = -1
    c.eval.batch_size = 16
    c.eval.num_samples = c.eval.train_num_samples = 16
    c.eval.train_nfes, c.eval.train_solvers = (2,), ("euler",)
    c.eval.teacher_solvers = ("euler",)
    c.eval.fid_batch_size, c.eval.fid_resize_to = FID_BATCH, FID_RESIZE
    if fid:
        c.eval.fid_inception, c.eval.fid_reference = fid


@pytest.fixture(scope="module")
def teacher(tmp_path_factory, data_dir, fid_files):
    """cifar10_rf_teacher at test size, FID on, one periodic and one final evaluation."""
    workdir = tmp_path_factory.mktemp("teacher")
    c = load_config_file("configs/cifar10_rf_teacher.py")
    shrink(c, data_dir, fid_files)
    c.train.eval_every = 2
    (workdir / "config.json").write_text(c.to_json_best_effort())  # as main.py writes it
    train_teacher(c, os.fspath(workdir))
    return workdir


def _event_tags(workdir) -> set[str]:
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    tags = set()
    for f in workdir.glob("events.out.tfevents.*"):
        for event in EventFileLoader(os.fspath(f)).Load():
            tags |= {v.tag for v in event.summary.value}
    return tags


def test_teacher_trains_on_the_dataset_with_checkpoints_events_and_sample_images(teacher):
    assert latest_checkpoint(teacher).name == str(STEPS)
    rows = writers.read_metrics(teacher)
    assert [r["step"] for r in rows if "loss" in r] == [2, 4]
    evals = [r for r in rows if "eval/euler_nfe2/nonfinite_fraction" in r]
    assert [r["step"] for r in evals] == [2, STEPS]  # periodic and final
    assert evals[-1]["eval/euler_nfe2/nonfinite_fraction"] == 0.0
    assert not any(k.startswith("eval/analytic") for r in rows for k in r)  # no analytic teacher
    assert "samples/euler_nfe2" in _event_tags(teacher)  # the sample grid in TensorBoard
    assert "eval/euler_nfe2/fid" in (teacher / "report.md").read_text()


def test_training_eval_reports_a_finite_fid(teacher, data_dir, fid_files):
    final = json.loads((teacher / "teacher_eval.json").read_text())["eval"]
    assert final["step"] == STEPS
    value = final["eval/euler_nfe2/fid"]
    assert math.isfinite(value) and value > 0
    # the scorer measures the reference's own data at (numerically) zero: same weights and stats
    c = load_config_file("configs/cifar10_rf_teacher.py")
    shrink(c, data_dir, fid_files)
    tb = make_testbed_from_config(c)
    assert isinstance(tb, DatasetTestbed) and tb.exact_teacher is None and not tb.has_exact_teacher
    assert tb.distance_names == ("fid",)
    assert tb.distances(tb.arrays["x"])["fid"] < 1e-3 * value
    assert math.isnan(tb.distances(np.full((4, SIZE, SIZE, 3), np.nan, np.float32))["fid"])


def test_fid_from_activations_equals_the_frechet_distance():
    from fewstep_jax.metrics import fid, sample_distances

    rng = np.random.default_rng(0)
    ref = rng.normal(0.3, 1.2, (400, 48))
    mu, sigma = sample_distances.gaussian_stats(ref)
    for n in (5, 48, 100):  # rank-deficient, square, full rank
        x = rng.normal(size=(n, 48))
        want = sample_distances.frechet_distance(*sample_distances.gaussian_stats(x), mu, sigma)
        assert fid.fid_from_activations(x, mu, sigma) == pytest.approx(want, rel=1e-6)


def _student(get_config, teacher_workdir, data_dir, fid) -> object:
    c = get_config()
    shrink(c, data_dir, fid)
    c.teacher.workdir = os.fspath(teacher_workdir)
    c.sampler.nfes = (1, 2, 4)
    return c


def test_distill_traflow_from_the_teacher_reports_fid_at_nfe_1_2_4(teacher, data_dir, fid_files, tmp_path):
    c = _student(lambda: load_config_file("configs/cifar10_traflow.py"), teacher, data_dir, fid_files)
    assert c.student.data == "data" and c.method == "traflow"
    # the cheapest traflow to compile: short Euler teacher targets, no velocity term
    c.losses.traflow.num_grid = c.losses.traflow.max_jump = 2
    c.losses.traflow.substeps, c.losses.traflow.solver, c.losses.traflow.lam_vel = 1, "euler", 0.0
    d = distill(c, os.fspath(tmp_path))
    assert int(d.state.step) == STEPS
    rows = json.loads((tmp_path / "eval.json").read_text())["rows"]
    by = {(r["method"], r["nfe"]): r for r in rows}
    for nfe in (1, 2, 4):
        for method in ("traflow", "teacher euler"):
            assert math.isfinite(by[method, nfe]["fid"]) and by[method, nfe]["fid"] > 0
            assert "flow_map_mse" not in by[method, nfe]  # no exact flow map on a real dataset
    assert by["traflow", 1]["steps"] == STEPS
    text = (tmp_path / "report.md").read_text()
    assert "| method | nfe | fid |" in text and "| traflow | 4 |" in text
    assert (tmp_path / "samples.png").exists()


@pytest.mark.slow  # a third UNet training step to compile (two networks): ~50 s on a loaded 2-core CPU
def test_data_free_tdm_needs_no_dataset_and_says_fid_is_off(teacher, tmp_path, caplog):
    # data-free: the dataset is never read (its data_dir does not even exist)
    c = _student(
        lambda: load_config_file("configs/cifar10_tdm.py"), teacher, os.fspath(tmp_path / "no_such_dir"), None
    )
    assert c.student.data == "noise" and c.method == "tdm"
    c.train.num_steps = 2
    with caplog.at_level(logging.WARNING):
        distill(c, os.fspath(tmp_path / "run"))
    assert any("FID is off" in r.message and "eval.fid_inception" in r.message for r in caplog.records)
    rows = json.loads((tmp_path / "run" / "eval.json").read_text())["rows"]
    assert {r["nfe"] for r in rows if r["method"] == "tdm"} == {1, 2, 4}
    assert not any("fid" in r for r in rows)
    assert "FID off" in (tmp_path / "run" / "report.md").read_text()


def test_wrong_dataset_or_setup_is_a_clear_error(data_dir, fid_files, tmp_path):
    c = load_config_file("configs/cifar10_rf_teacher.py")
    shrink(c, data_dir, None)
    c.testbed.name = "tfds:no_such_set"
    with pytest.raises(FileNotFoundError, match=r"tfds:no_such_set.*no_such_set"):
        train_teacher(c, os.fspath(tmp_path / "a"))
    c.testbed.name, c.testbed.data_dir = "tfds:tiny_cifar", os.fspath(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="missing"):
        train_teacher(c, os.fspath(tmp_path / "b"))
    c.testbed.name = "cifar10"  # neither an exact testbed nor the tfds: form
    with pytest.raises(ValueError, match=r"'cifar10'.*gmm8.*tfds:<name>"):
        train_teacher(c, os.fspath(tmp_path / "c"))
    c.testbed.name, c.testbed.data_dir = "tfds:tiny_cifar", data_dir
    c.eval.fid_inception = fid_files[0]  # without fid_reference
    with pytest.raises(ValueError, match="fid_reference is empty"):
        train_teacher(c, os.fspath(tmp_path / "d"))
    c.eval.fid_inception = ""
    c.model.sample_size = 32  # the network does not fit the images
    with pytest.raises(ValueError, match=r"\(32, 32, 3\).*\(8, 8, 3\)"):
        train_teacher(c, os.fspath(tmp_path / "e"))
    s = load_config_file("configs/cifar10_traflow.py")
    shrink(s, data_dir, None)
    s.teacher.workdir = ""  # a real dataset has no analytic teacher to distil
    with pytest.raises(ValueError, match=r"teacher\.workdir"):
        distill(s, os.fspath(tmp_path / "f"))
