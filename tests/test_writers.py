"""Metric writers: TensorBoard event files + metrics.jsonl on the main process only."""

import json

import numpy as np
import pytest

from fewstep_jax.train import writers


def test_main_writer_writes_tensorboard_and_jsonl(tmp_path):
    w = writers.make_writer(tmp_path, is_main=True)
    w.write_scalars(1, {"loss": np.float32(0.5), "lr": 1e-3})
    w.write_scalars(2, {"loss": 0.25})
    writers.write_images(w, 2, {"samples": np.linspace(-1, 1, 4 * 5 * 6 * 3).reshape(4, 5, 6, 3)})
    w.flush()
    w.close()
    assert list(tmp_path.glob("events.out.tfevents.*"))
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows == [{"step": 1, "loss": 0.5, "lr": 1e-3}, {"step": 2, "loss": 0.25}]
    assert writers.read_metrics(tmp_path) == rows


def test_non_main_writer_writes_nothing_to_disk(tmp_path):
    w = writers.make_writer(tmp_path / "logs", is_main=False)
    w.write_scalars(1, {"loss": 1.0})
    writers.write_images(w, 1, {"x": np.zeros((1, 2, 2, 1))})
    w.flush()
    w.close()
    assert not (tmp_path / "logs").exists() or not list((tmp_path / "logs").iterdir())
    assert writers.read_metrics(tmp_path / "logs") == []


def test_image_grid_layout_and_range():
    imgs = np.stack([np.full((2, 3, 1), v) for v in (-1.0, 0.0, 1.0, 2.0, -5.0)])
    grid = writers.image_grid(imgs, pad=1)
    # 5 images -> 3 columns x 2 rows of (2, 3) tiles with 1-pixel borders.
    assert grid.shape == (2 * 3 + 1, 3 * 4 + 1, 1) and grid.dtype == np.uint8
    assert grid[1, 1, 0] == 0 and grid[1, 5, 0] == 128 and grid[1, 9, 0] == 255
    assert grid[4, 1, 0] == 255 and grid[4, 5, 0] == 0  # clipped to [-1, 1]
    assert grid[0].max() == 0  # border
    with pytest.raises(ValueError, match=r"'x' must be NHWC, got shape \(2, 2\)"):
        writers.write_images(None, 0, {"x": np.zeros((2, 2))})


def test_progress_reporter_prints_every_n_steps_on_main_only():
    lines = []
    p = writers.ProgressReporter(10, every_steps=4, print_fn=lines.append)
    for step in range(1, 11):
        p(step, {"loss": 0.5 / step})
    assert [ln.split(" | ")[0] for ln in lines] == ["step 4/10", "step 8/10", "step 10/10"]
    assert "loss 0.0625" in lines[1] and "steps/s" in lines[1] and "ETA" in lines[1]
    quiet = []
    q = writers.ProgressReporter(10, every_steps=2, is_main=False, print_fn=quiet.append)
    for step in range(1, 11):
        q(step, {"loss": 1.0})
    assert quiet == []


def test_parameter_overview_lists_shapes_and_total():
    text = writers.log_parameter_overview({"dense": {"kernel": np.ones((3, 4), np.float32)}})
    assert "dense/kernel" in text and "(3, 4)" in text and "Total: 12" in text


def test_eval_images_go_to_tensorboard(tmp_path):
    """The loop's eval writer: scalars as eval/..., NHWC batches under images/ as image grids."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from fewstep_jax.train.loop import write_eval

    w = writers.make_writer(str(tmp_path), is_main=True)
    imgs = np.linspace(-1, 1, 4 * 8 * 8).reshape(4, 8, 8, 1).astype(np.float32)
    scalars = write_eval(w, 3, {"fd": 1.5, "images/euler_nfe4": imgs})
    w.flush()
    assert scalars == {"fd": 1.5}
    acc = EventAccumulator(str(tmp_path), size_guidance={"images": 0, "tensors": 0}).Reload()
    tags = acc.Tags()
    assert any("samples/euler_nfe4" in t for t in tags.get("images", []) + tags.get("tensors", [])), tags
    assert any("eval/fd" in t for t in tags.get("scalars", []) + tags.get("tensors", [])), tags
