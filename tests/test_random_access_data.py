"""Random-access batches (RandomAccessSource): the same batches as ArraySource for any seed, step and
process split, read row by row from an ArrayRecord TFDS dataset built locally (offline), and picked
by DatasetTestbed (testbed.in_memory) for a short training run."""

import logging
import os

import numpy as np
import pytest

from fewstep_jax.data import (
    ArraySource,
    RandomAccessSource,
    image_arrays,
    load_tfds_arrays,
    tfds_data_source,
    tfds_image_info,
)
from fewstep_jax.modes.dryrun import load_config_file
from fewstep_jax.modes.train_teacher import train_teacher
from fewstep_jax.runs import writers
from fewstep_jax.testbeds import dataset as dataset_testbed
from fewstep_jax.testbeds.dataset import make_dataset_testbed
from tests.tfds_local import build_image_dataset

tfds = pytest.importorskip("tensorflow_datasets")

SIZE, N, N_CLASSES = 8, 37, 5  # N prime: batches of 8 straddle epoch boundaries


def _records() -> list[dict]:
    rng = np.random.default_rng(0)
    return [
        {"image": rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8), "label": i % N_CLASSES}
        for i in range(N)
    ]


class ListContainer:
    """A plain in-memory random-access container with the TFDS data-source interface."""

    def __init__(self, records):
        self.records = records

    def __len__(self):
        return len(self.records)

    def __getitem__(self, i):
        return self.records[i]

    def __getitems__(self, keys):
        return [self.records[k] for k in keys]


class CountingContainer:
    """Wraps a container and records every index read (batched or single)."""

    def __init__(self, inner, batched: bool = True):
        self.inner, self.calls = inner, []
        if batched:
            self.__getitems__ = self._getitems

    def __len__(self):
        return len(self.inner)

    def __getitem__(self, i):
        self.calls.append([i])
        return self.inner[i]

    def _getitems(self, keys):
        self.calls.append(list(keys))
        return [self.inner[k] for k in keys]


def _build(data_dir: str, file_format: str) -> None:
    pairs = [(r["image"], r["label"]) for r in _records()]
    shape = (SIZE, SIZE, 3)
    build_image_dataset(data_dir, "TinyAr", lambda split: pairs, shape, N_CLASSES, ("train",), file_format)


@pytest.fixture(scope="module")
def ar_dir(tmp_path_factory) -> str:
    pytest.importorskip("array_record", reason="array_record is not installed: no ArrayRecord datasets")
    d = os.fspath(tmp_path_factory.mktemp("tfds_ar"))
    _build(d, "array_record")
    return d


@pytest.fixture(scope="module")
def tfrecord_dir(tmp_path_factory) -> str:
    d = os.fspath(tmp_path_factory.mktemp("tfds_tfrecord"))
    _build(d, "tfrecord")
    return d


def _assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def _check_same_batches(container, arrays: dict, label_key) -> None:
    """Every (seed, step, process) of 1 and 2 processes: RandomAccessSource == ArraySource."""
    keys = ["x"] if label_key is None else ["x", "label"]
    for seed in (0, 7):
        for count in (1, 2):
            for p in range(count):
                ref = ArraySource({k: arrays[k] for k in keys}, 8, seed, p, count)
                src = RandomAccessSource(container, 8, seed, p, count, label_key=label_key)
                assert src.element_spec == ref.element_spec
                for step in (0, 3, 4, 9, 13):  # 4 and 9 straddle epochs (positions 37, 74)
                    _assert_same(src.batch(step), ref.batch(step))
        # the two processes' rows are the one-process global batch, in order
        whole = RandomAccessSource(container, 8, seed, label_key=label_key).batch(4)
        halves = [RandomAccessSource(container, 8, seed, p, 2, label_key=label_key).batch(4) for p in (0, 1)]
        _assert_same({k: np.concatenate([h[k] for h in halves]) for k in keys}, whole)


@pytest.mark.parametrize("label_key", ["label", None])
def test_in_memory_container_gives_array_source_batches(label_key):
    records = _records()
    raw = {"image": np.stack([r["image"] for r in records]), "label": np.array([r["label"] for r in records])}
    _check_same_batches(ListContainer(records), image_arrays(raw, "image", "label", "tiny"), label_key)


def test_array_record_tfds_gives_array_source_batches(ar_dir):
    container = tfds_data_source("tiny_ar", "train", ar_dir)
    assert len(container) == N
    _check_same_batches(container, load_tfds_arrays("tiny_ar", "train", ar_dir), "label")


@pytest.mark.parametrize("batched", [True, False])
def test_reads_only_this_process_rows(batched):
    counting = CountingContainer(ListContainer(_records()), batched=batched)
    for p in (0, 1):
        ref = ArraySource({"x": np.zeros((N, 1))}, 8, 5, p, 2)
        src = RandomAccessSource(counting, 8, 5, p, 2, data_shape=(SIZE, SIZE, 3))
        assert src.element_spec["x"].shape == (SIZE, SIZE, 3)
        assert counting.calls == []  # known from data_shape: no read
        for step in (0, 4, 11):
            src.batch(step)
            read = [k for call in counting.calls for k in call]
            assert read == sorted(set(ref.indices(step).tolist()))  # each row once, ascending
            assert len(counting.calls) == (1 if batched else len(read))
            counting.calls.clear()


def test_duplicate_index_in_a_straddling_batch_is_read_once():
    counting = CountingContainer(ListContainer(_records()[:3]))
    src = RandomAccessSource(counting, 4, 0)  # 3 examples, batch 4: one index appears twice
    idx = src.indices(0)
    assert len(set(idx.tolist())) == 3
    batch = src.batch(0)
    assert counting.calls == [[0, 1, 2]]
    ref = ArraySource(
        image_arrays(
            {"image": np.stack([r["image"] for r in _records()[:3]]), "label": np.arange(3) % N_CLASSES},
            "image",
            "label",
            "t",
        ),
        4,
        0,
    )
    _assert_same(batch, ref.batch(0))


def test_bad_container_or_records_are_clear_errors():
    with pytest.raises(TypeError, match="__len__ and __getitem__"):
        RandomAccessSource(object(), 8, 0)
    with pytest.raises(ValueError, match="empty dataset"):
        RandomAccessSource(ListContainer([]), 8, 0)
    src = RandomAccessSource(ListContainer([{"img": np.zeros((2, 2, 3), np.uint8)}] * 8), 8, 0)
    with pytest.raises(ValueError, match=r"lack key\(s\) \['image', 'label'\]"):
        src.batch(0)
    floats = ListContainer([{"image": np.zeros((2, 2, 3), np.float32)}] * 8)
    src = RandomAccessSource(floats, 8, 0, label_key=None)
    with pytest.raises(ValueError, match="must be uint8"):
        src.batch(0)


def _config(data_dir: str, in_memory: bool):
    c = load_config_file("configs/cifar10_rf_teacher.py")
    c.testbed.name, c.testbed.data_dir, c.testbed.in_memory = "tfds:tiny_ar", data_dir, in_memory
    return c


def test_testbed_metadata_and_choice_of_source(ar_dir, tfrecord_dir, monkeypatch, caplog):
    info = tfds_image_info("tiny_ar", "train", ar_dir)
    assert (info.num_examples, info.data_shape, info.num_classes) == (N, (SIZE, SIZE, 3), N_CLASSES)
    assert info.file_format == "array_record" and info.float32_bytes == N * SIZE * SIZE * 3 * 4

    tb = make_dataset_testbed(_config(ar_dir, in_memory=False))
    assert tb.random_access and tb.data_shape == (SIZE, SIZE, 3) and tb.num_classes == N_CLASSES
    src = tb.source(True, 8, 0, 1, 2)
    assert isinstance(src, RandomAccessSource)
    assert "arrays" not in tb.__dict__  # metadata and batches without loading the split
    _assert_same(src.batch(3), ArraySource(load_tfds_arrays("tiny_ar", "train", ar_dir), 8, 0, 1, 2).batch(3))
    assert set(tb.source(False, 8, 0, 0, 1).batch(0)) == {"x"}

    # in_memory=True: small splits in memory, large ones (over the limit) by index
    assert isinstance(make_dataset_testbed(_config(ar_dir, True)).source(True, 8, 0, 0, 1), ArraySource)
    monkeypatch.setattr(dataset_testbed, "IN_MEMORY_MAX_BYTES", info.float32_bytes - 1)
    big = make_dataset_testbed(_config(ar_dir, True))
    assert isinstance(big.source(True, 8, 0, 0, 1), RandomAccessSource)

    # TFRecord has no random access: in memory whatever in_memory says, saying why and how much
    tb = make_dataset_testbed(_config(tfrecord_dir, in_memory=False))
    with caplog.at_level(logging.INFO):
        src = tb.source(True, 8, 0, 0, 1)
    assert isinstance(src, ArraySource) and not tb.random_access
    text = caplog.text
    assert "no random access" in text and "in_memory=False" in text
    assert f"{N * SIZE * SIZE * 3 * 4 / 1e9:.2f} GB per host" in text
    with pytest.raises(ValueError, match="no random access"):
        tfds_data_source("tiny_ar", "train", tfrecord_dir)
    with pytest.raises(FileNotFoundError, match=r"testbed\.name='tfds:tiny_ar'.*_missing"):
        _ = make_dataset_testbed(_config(os.fspath(ar_dir) + "_missing", False)).data_shape


def test_training_reads_batches_by_index(ar_dir, tmp_path, monkeypatch):
    from test_dataset_runs import shrink  # the tiny-UNet test-size config of the dataset runs

    steps_read = []

    class Recording(RandomAccessSource):
        def batch(self, step):
            steps_read.append(step)
            return super().batch(step)

    monkeypatch.setattr(dataset_testbed, "RandomAccessSource", Recording)
    c = load_config_file("configs/cifar10_rf_teacher.py")
    shrink(c, ar_dir, None)
    c.testbed.name, c.testbed.in_memory = "tfds:tiny_ar", False
    c.train.num_steps, c.train.log_every, c.train.checkpoint_every = 2, 1, 2
    train_teacher(c, os.fspath(tmp_path))
    assert {0, 1} <= set(steps_read)
    losses = [r["loss"] for r in writers.read_metrics(tmp_path) if "loss" in r]
    assert len(losses) == 2 and all(np.isfinite(losses))
