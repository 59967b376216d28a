"""Input pipelines: stateless batch sources, built-in loaders, TFDS loading (offline)."""

import ast
import graphlib
import os
import re
import sys
from pathlib import Path

import numpy as np
import pytest

from fewstep_jax.data import (
    ArraySource,
    ArraySpec,
    BatchSource,
    NoiseSource,
    SamplerSource,
    load_dataset,
    load_digits,
    load_mnist,
    load_tfds_arrays,
)
from tests.tfds_local import build_image_dataset

MNIST_PATH = "/work/shared/data/mnist.npz"


def _toy_arrays(n: int = 10) -> dict[str, np.ndarray]:
    # Row i holds the value i everywhere, so a batch reveals which examples it contains.
    x = np.repeat(np.arange(n, dtype=np.float32)[:, None], 3, axis=1)
    return {"x": x, "label": np.arange(n, dtype=np.int32)}


def _gaussian(rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
    return {
        "x": rng.standard_normal((n, 2)).astype(np.float32),
        "label": rng.integers(0, 3, n).astype(np.int32),
    }


def _make_sources(process_index: int = 0, process_count: int = 1, seed: int = 3) -> dict:
    kw = dict(global_batch_size=4, seed=seed, process_index=process_index, process_count=process_count)
    return {
        "array": ArraySource(_toy_arrays(10), **kw),
        "sampler": SamplerSource(_gaussian, **kw),
        "noise": NoiseSource((2, 2, 1), num_classes=5, **kw),
    }


KINDS = ["array", "sampler", "noise"]


def _assert_batches_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


# ----------------------------------------------------------------------------- sources


@pytest.mark.parametrize("kind", KINDS)
def test_protocol_and_spec(kind):
    src = _make_sources()[kind]
    assert isinstance(src, BatchSource)
    assert src.local_batch_size == 4
    batch = src.batch(0)
    assert set(batch) == set(src.element_spec)
    for k, spec in src.element_spec.items():
        assert isinstance(spec, ArraySpec)
        assert batch[k].shape == (4, *spec.shape), k
        assert batch[k].dtype == spec.dtype, k


@pytest.mark.parametrize("kind", KINDS)
def test_deterministic_and_steps_differ(kind):
    a, b = _make_sources()[kind], _make_sources()[kind]
    _assert_batches_equal(a.batch(5), b.batch(5))
    _assert_batches_equal(a.batch(5), a.batch(5))
    key = "noise" if kind == "noise" else "x"
    assert not np.array_equal(a.batch(0)[key], a.batch(1)[key])
    other_seed = _make_sources(seed=4)[kind]
    assert not np.array_equal(a.batch(0)[key], other_seed.batch(0)[key])


@pytest.mark.parametrize("kind", KINDS)
def test_resumable_without_history(kind):
    walked = _make_sources()[kind]
    history = [walked.batch(s) for s in range(8)]
    fresh = _make_sources()[kind]
    for s in (7, 3, 0, 5):  # out of order on purpose
        _assert_batches_equal(fresh.batch(s), history[s])


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("process_count", [2, 4])
def test_process_split_reassembles_global_batch(kind, process_count):
    single = _make_sources()[kind]
    procs = [_make_sources(p, process_count)[kind] for p in range(process_count)]
    assert all(p.local_batch_size == 4 // process_count for p in procs)
    # 10 examples, batch 4: steps 2 and 4 straddle epoch boundaries.
    for step in range(6):
        parts = [p.batch(step) for p in procs]
        joined = {k: np.concatenate([b[k] for b in parts]) for k in parts[0]}
        _assert_batches_equal(joined, single.batch(step))


def test_indivisible_batch_and_bad_args_raise():
    with pytest.raises(ValueError, match="not divisible by process_count 3"):
        ArraySource(_toy_arrays(), global_batch_size=4, seed=0, process_index=0, process_count=3)
    with pytest.raises(ValueError, match="process_index 2"):
        NoiseSource((2,), global_batch_size=4, seed=0, process_index=2, process_count=2)
    with pytest.raises(ValueError, match="leading dimension"):
        ArraySource({"x": np.zeros((5, 2)), "label": np.zeros(4)}, global_batch_size=2, seed=0)
    with pytest.raises(ValueError, match="step must be >= 0"):
        ArraySource(_toy_arrays(), global_batch_size=2, seed=0).batch(-1)
    bad = lambda rng, n: {"x": np.zeros((n + 1, 2))}
    with pytest.raises(ValueError, match="'x' with shape"):
        SamplerSource(bad, global_batch_size=2, seed=0)


def test_epoch_coverage_exactly_once():
    n, g = 24, 8
    src = ArraySource(_toy_arrays(n), global_batch_size=g, seed=11)
    assert src.steps_per_epoch == 3
    epoch0 = np.concatenate([src.batch(s)["label"] for s in range(3)])
    epoch1 = np.concatenate([src.batch(s)["label"] for s in range(3, 6)])
    np.testing.assert_array_equal(np.sort(epoch0), np.arange(n))
    np.testing.assert_array_equal(np.sort(epoch1), np.arange(n))
    assert not np.array_equal(epoch0, epoch1)  # reshuffled each epoch
    assert not np.array_equal(epoch0, np.arange(n))  # actually shuffled
    # The permutation is the documented one: default_rng([seed, epoch]).
    np.testing.assert_array_equal(epoch1, np.random.default_rng([11, 1]).permutation(n))
    # x rows travel with their labels.
    b = src.batch(4)
    np.testing.assert_array_equal(b["x"][:, 0], b["label"].astype(np.float32))


def test_epochs_concatenate_across_batch_boundaries():
    n, g = 10, 4  # 5 steps = 20 positions = exactly 2 epochs, batches 2 and 4 straddle
    src = ArraySource(_toy_arrays(n), global_batch_size=g, seed=2)
    stream = np.concatenate([src.batch(s)["label"] for s in range(5)])
    np.testing.assert_array_equal(np.sort(stream[:n]), np.arange(n))
    np.testing.assert_array_equal(np.sort(stream[n:]), np.arange(n))
    unshuffled = ArraySource(_toy_arrays(n), global_batch_size=g, seed=2, shuffle=False)
    np.testing.assert_array_equal(unshuffled.batch(2)["label"], [8, 9, 0, 1])


def test_sampler_source_uses_step_seeded_generator():
    src = SamplerSource(_gaussian, global_batch_size=6, seed=9, process_index=1, process_count=3)
    want = _gaussian(np.random.default_rng([9, 4]), 6)
    _assert_batches_equal(src.batch(4), {k: v[2:4] for k, v in want.items()})


def test_noise_source_statistics_and_labels():
    src = NoiseSource((8, 8, 3), global_batch_size=256, seed=0, num_classes=10)
    b = src.batch(0)
    assert b["noise"].dtype == np.float32 and b["noise"].shape == (256, 8, 8, 3)
    assert b["label"].dtype == np.int32 and b["label"].shape == (256,)
    z = b["noise"].ravel()
    assert abs(z.mean()) < 0.02 and abs(z.std() - 1.0) < 0.02
    assert b["label"].min() >= 0 and b["label"].max() < 10
    assert len(np.unique(b["label"])) == 10
    # Rows are independent draws, not copies.
    assert not np.array_equal(b["noise"][0], b["noise"][1])
    unconditional = NoiseSource((4,), global_batch_size=2, seed=0)
    assert set(unconditional.batch(0)) == {"noise"}
    assert set(unconditional.element_spec) == {"noise"}


# ----------------------------------------------------------------------------- loaders


def test_digits_scaling_and_shape():
    from sklearn.datasets import load_digits as sk_load_digits

    d = load_digits()
    assert d["x"].shape == (1797, 8, 8, 1) and d["x"].dtype == np.float32
    assert d["label"].shape == (1797,) and d["label"].dtype == np.int32
    assert d["x"].min() == -1.0 and d["x"].max() == 1.0
    raw = sk_load_digits()
    np.testing.assert_allclose(d["x"][..., 0], raw.images / 8.0 - 1.0, atol=1e-6)
    np.testing.assert_array_equal(d["label"], raw.target)
    _assert_batches_equal(load_dataset("digits"), d)


@pytest.mark.skipif(not os.path.isfile(MNIST_PATH), reason=f"{MNIST_PATH} not present")
def test_mnist_npz():
    d = load_mnist(MNIST_PATH, split="test")
    assert d["x"].shape == (10000, 28, 28, 1) and d["x"].dtype == np.float32
    assert d["label"].dtype == np.int32 and set(np.unique(d["label"])) == set(range(10))
    assert d["x"].min() == -1.0 and d["x"].max() == 1.0
    with np.load(MNIST_PATH) as f:
        raw = f["x_test"][:5]
    np.testing.assert_allclose(d["x"][:5, ..., 0], raw / 127.5 - 1.0, atol=1e-6)


def test_mnist_errors(tmp_path):
    missing = tmp_path / "nope.npz"
    with pytest.raises(FileNotFoundError, match=r"nope\.npz.*tfds"):
        load_mnist(missing)
    bad = tmp_path / "bad.npz"
    np.savez(bad, images=np.zeros((2, 28, 28), np.uint8))
    with pytest.raises(ValueError, match="x_train"):
        load_mnist(bad)
    with pytest.raises(ValueError, match="split"):
        load_mnist(bad, split="validation")


def test_load_dataset_dispatch(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "mini.npz"
    arrays = {f"x_{s}": rng.integers(0, 256, (6, 4, 4), dtype=np.uint8) for s in ("train", "test")}
    arrays |= {f"y_{s}": np.arange(6) for s in ("train", "test")}
    np.savez(path, **arrays)
    d = load_dataset("mnist", path=path, split="test")
    np.testing.assert_allclose(d["x"][..., 0], arrays["x_test"] / 127.5 - 1.0, atol=1e-6)
    with pytest.raises(ValueError, match="known: digits, mnist"):
        load_dataset("imagenet")


def test_mnist_without_path_is_tfds_and_says_not_prepared(tmp_path):
    pytest.importorskip("tensorflow_datasets")
    # No path and no prepared TFDS data: a clear error, no download attempt.
    with pytest.raises(FileNotFoundError, match="not prepared"):
        load_dataset("mnist", data_dir=tmp_path / "tfds")


def test_tfds_without_tensorflow_says_what_to_install(monkeypatch):
    """Without tensorflow-datasets (None in sys.modules: `import` fails as if not installed) the
    TFDS readers raise one line naming the extra; the other loaders do not need it."""
    from fewstep_jax.data import tfds_data_source, tfds_image_info
    from fewstep_jax.data.tfds_source import TFDS_INSTALL_HINT
    from fewstep_jax.metrics.fid import load_tfds_images

    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)
    hint = "^" + re.escape(TFDS_INSTALL_HINT) + "$"
    for read in (
        lambda: load_dataset("tfds:cifar10"),
        lambda: load_dataset("mnist"),
        lambda: load_tfds_arrays("cifar10"),
        lambda: tfds_image_info("cifar10"),
        lambda: tfds_data_source("cifar10"),
        lambda: load_tfds_images("cifar10:train"),
    ):
        with pytest.raises(ImportError, match=hint):
            read()
    assert "\n" not in TFDS_INSTALL_HINT and 'pip install "fewstep-jax[tfds]"' in TFDS_INSTALL_HINT
    assert load_dataset("digits")["x"].shape == (1797, 8, 8, 1)


def _imports(path: Path) -> set[str]:
    """Every module a file imports, at top level or inside functions."""
    tree = ast.parse(path.read_text())
    names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    return names | {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}


def test_data_modules_import_one_way():
    """The modules of fewstep_jax/data import one another without a cycle (lazy imports included):
    sources, images <- random_access <- tfds_source <- builtin <- the package."""
    import fewstep_jax.data as package

    folder = Path(package.__file__).parent
    graph = {
        p.stem: {m.rsplit(".", 1)[-1] for m in _imports(p) if m.startswith("fewstep_jax.data.")}
        for p in folder.glob("*.py")
        if p.stem != "__init__"
    }
    order = list(graphlib.TopologicalSorter(graph).static_order())  # raises CycleError on a cycle
    assert set(order) == set(graph) >= {"sources", "images", "random_access", "tfds_source", "builtin"}


# ----------------------------------------------------------------------------- tfds

N_TINY = 40


def _tiny_examples(split: str) -> list[tuple[np.ndarray, int]]:
    rng = np.random.default_rng(0 if split == "train" else 1)
    n = N_TINY if split == "train" else 10
    return [(rng.integers(0, 256, (8, 8, 1), dtype=np.uint8), i % 3) for i in range(n)]


@pytest.fixture(scope="module", params=["tfrecord", "array_record"])
def tiny_tfds_dir(request, tmp_path_factory):
    """A tiny image dataset prepared locally (no download), in the given on-disk format."""
    pytest.importorskip("tensorflow_datasets")
    data_dir = tmp_path_factory.mktemp(f"tfds_{request.param}")
    splits = ("train", "test")
    build_image_dataset(data_dir, "TinyImages", _tiny_examples, (8, 8, 1), 3, splits, request.param)
    return os.fspath(data_dir)


def test_tfds_local_dataset(tiny_tfds_dir):
    d = load_tfds_arrays("tiny_images", split="train", data_dir=tiny_tfds_dir)
    assert d["x"].shape == (N_TINY, 8, 8, 1) and d["x"].dtype == np.float32
    assert d["label"].shape == (N_TINY,) and d["label"].dtype == np.int32
    assert d["x"].min() >= -1.0 and d["x"].max() <= 1.0
    # Same examples (TFDS reorders them on disk), each with its own label, scaled x / 127.5 - 1.
    want = {img.tobytes(): lab for img, lab in _tiny_examples("train")}
    got_raw = np.rint((d["x"] + 1.0) * 127.5).astype(np.uint8)
    got = {img.tobytes(): int(lab) for img, lab in zip(got_raw, d["label"])}
    assert got == want
    # Deterministic order across loads, and reachable through load_dataset.
    again = load_dataset("tfds:tiny_images", split="train", data_dir=tiny_tfds_dir)
    _assert_batches_equal(again, d)
    assert load_tfds_arrays("tiny_images", split="test", data_dir=tiny_tfds_dir)["x"].shape[0] == 10
    src = ArraySource(d, global_batch_size=8, seed=0)
    assert src.batch(0)["x"].shape == (8, 8, 8, 1)


def test_tfds_missing_data_is_clear_error(tiny_tfds_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="tiny_images"):
        load_tfds_arrays("tiny_images", data_dir=os.fspath(tmp_path))
    with pytest.raises(ValueError, match="no image feature 'img'"):
        load_tfds_arrays("tiny_images", data_dir=tiny_tfds_dir, image_key="img")
