"""Fixed feature spaces for Frechet distances on images.

Two feature maps, both frozen once fitted, so that numbers are comparable across runs:

* ``PCAFeatures``: the top-k principal components of a real data set (any image size).
* The shipped MNIST classifier (``assets/mnist_classifier.npz``): ``mnist_features`` returns the
  128-d penultimate layer, ``mnist_classifier_logits`` the 10 class logits.

How the shipped classifier was trained (``train_mnist_classifier`` with its defaults, written by
``python -m fewstep_jax.metrics.features --train-mnist-classifier
--mnist=../shared/data/mnist.npz --out=fewstep_jax/assets/mnist_classifier.npz``):

* Input: (B, 28, 28, 1) float32 in [-1, 1] (uint8 pixels / 127.5 - 1).
* Architecture (``MnistClassifier``, Flax Linen): Conv 3x3 16 stride 1 -> ReLU -> Conv 3x3 32
  stride 2 -> ReLU -> Conv 3x3 64 stride 2 -> ReLU -> Conv 3x3 64 stride 2 -> ReLU (4x4x64,
  padding SAME) -> flatten -> Dense 128 (the *features*, taken before their ReLU) -> ReLU ->
  Dense 10 (logits). 193k parameters.
* Training: all 60000 training digits, no augmentation, batch 128 drawn by epoch-wise
  permutations from ``np.random.default_rng(seed)``; params from ``jax.random.PRNGKey(seed)``;
  softmax cross-entropy; optax Adam(b1=0.9, b2=0.999) with a cosine learning-rate decay from 2e-3
  to 0 over ``steps`` = 1500 steps (3.2 epochs); seed 0; float32 on CPU.
* The npz holds the params as a flattened dict (``params/<layer>/<kernel|bias>``) plus
  ``meta/test_accuracy`` (on all 10000 test digits), ``meta/steps``, ``meta/seed``.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib.resources
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

_FEATURE_DIM = 128
_PARAM_PREFIX = "params/"
_META_PREFIX = "meta/"


# ---------------------------------------------------------------------------------------------
# PCA features
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PCAFeatures:
    """Projection on the top-k principal components of a reference set.

    Attributes:
      mean: (D,) mean of the flattened reference data.
      components: (k, D) orthonormal principal directions, largest variance first; each sign is
        fixed so that its largest-magnitude entry is positive (deterministic across LAPACKs).
    """

    mean: np.ndarray
    components: np.ndarray

    @classmethod
    def fit(cls, data: Any, k: int = 32) -> PCAFeatures:
        """Fit on data (B, ...) (flattened to (B, D)); needs k <= min(B, D)."""
        x = _flatten(data, "data")
        n, d = x.shape
        if not 1 <= k <= min(n, d):
            raise ValueError(f"k={k} must be in [1, min(B, D)] = [1, {min(n, d)}] for data {x.shape}")
        mean = x.mean(axis=0)
        # Economy SVD of the centred data: rows of vt are the principal directions.
        _, _, vt = np.linalg.svd(x - mean, full_matrices=False)
        comps = vt[:k]
        pivot = np.argmax(np.abs(comps), axis=1)
        comps = comps * np.sign(comps[np.arange(k), pivot])[:, None]
        return cls(mean=mean.astype(np.float32), components=comps.astype(np.float32))

    @property
    def dim(self) -> int:
        return int(self.components.shape[0])

    def __call__(self, x: Any) -> np.ndarray:
        """Features (B, k) of x (B, ...) with the reference's flattened size D."""
        flat = _flatten(x, "x")
        if flat.shape[1] != self.mean.shape[0]:
            raise ValueError(
                f"x has {flat.shape[1]} values per sample (shape {np.shape(x)}), "
                f"PCA was fitted on {self.mean.shape[0]}"
            )
        return ((flat - self.mean) @ self.components.T.astype(np.float64)).astype(np.float32)

    def inverse(self, z: Any) -> np.ndarray:
        """Flattened reconstructions (B, D) from features z (B, k)."""
        z = np.asarray(z, np.float64)
        if z.ndim != 2 or z.shape[1] != self.dim:
            raise ValueError(f"features must have shape (B, {self.dim}), got {z.shape}")
        return (z @ self.components + self.mean).astype(np.float32)

    def save(self, path: str | os.PathLike) -> None:
        np.savez(path, mean=self.mean, components=self.components)

    @classmethod
    def load(cls, path: str | os.PathLike) -> PCAFeatures:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"PCA features file not found: {path}")
        with np.load(path) as f:
            missing = {"mean", "components"} - set(f.files)
            if missing:
                raise ValueError(f"{path} lacks key(s) {sorted(missing)}")
            return cls(mean=f["mean"], components=f["components"])


def _flatten(x: Any, name: str) -> np.ndarray:
    x = np.asarray(x, np.float64)
    if x.ndim < 2 or x.shape[0] == 0:
        raise ValueError(f"{name} must have shape (B, ...) with B >= 1, got {x.shape}")
    return x.reshape(x.shape[0], -1)


# ---------------------------------------------------------------------------------------------
# MNIST classifier
# ---------------------------------------------------------------------------------------------


class MnistClassifier(nn.Module):
    """Small CNN on (B, 28, 28, 1) images in [-1, 1]; returns (logits (B, 10), features (B, 128))."""

    @nn.compact
    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        for i, (ch, stride) in enumerate([(16, 1), (32, 2), (64, 2), (64, 2)]):
            x = nn.relu(nn.Conv(ch, (3, 3), strides=stride, padding="SAME", name=f"conv{i}")(x))
        feats = nn.Dense(_FEATURE_DIM, name="fc")(x.reshape(x.shape[0], -1))
        logits = nn.Dense(10, name="head")(nn.relu(feats))
        return logits, feats


def as_mnist_images(x: Any) -> np.ndarray:
    """(B, 28, 28) or (B, 28, 28, 1) -> float32 (B, 28, 28, 1); anything else is a ValueError."""
    x = np.asarray(x)
    if x.ndim == 3 and x.shape[1:] == (28, 28):
        x = x[..., None]
    if x.ndim != 4 or x.shape[1:] != (28, 28, 1):
        raise ValueError(f"MNIST images must have shape (B, 28, 28) or (B, 28, 28, 1), got {x.shape}")
    return x.astype(np.float32)


def load_mnist(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Train and test arrays of an mnist.npz (images (N, 28, 28, 1) in [-1, 1], labels int32)."""
    from fewstep_jax.data.builtin import load_mnist as load_split

    train, test = load_split(path, "train"), load_split(path, "test")
    return {"x_train": train["x"], "y_train": train["label"], "x_test": test["x"], "y_test": test["label"]}


def train_mnist_classifier(
    mnist_path: str | os.PathLike,
    seed: int = 0,
    steps: int = 1500,
    batch_size: int = 128,
    learning_rate: float = 2e-3,
    log_every: int = 500,
) -> tuple[dict, float]:
    """Train ``MnistClassifier`` deterministically; returns (params, test accuracy in [0, 1])."""
    data = load_mnist(mnist_path)
    x_train, y_train = data["x_train"], data["y_train"]
    model = MnistClassifier()
    params = model.init(jax.random.PRNGKey(seed), jnp.zeros((1, 28, 28, 1)))["params"]
    tx = optax.adam(optax.cosine_decay_schedule(learning_rate, steps))
    opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state, x, y):
        def loss_fn(p):
            logits, _ = model.apply({"params": p}, x)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    rng = np.random.default_rng(seed)
    per_epoch = len(x_train) // batch_size
    start = time.time()
    for i in range(steps):
        if i % per_epoch == 0:
            perm = rng.permutation(len(x_train))
        idx = perm[(i % per_epoch) * batch_size : (i % per_epoch + 1) * batch_size]
        params, opt_state, loss = step(params, opt_state, x_train[idx], y_train[idx])
        if log_every and (i + 1) % log_every == 0:
            print(f"step {i + 1}/{steps} loss {float(loss):.4f} ({time.time() - start:.0f}s)")
    params = jax.tree.map(np.asarray, params)
    logits = mnist_classifier_logits(data["x_test"], params=params)
    accuracy = float(np.mean(np.argmax(logits, axis=1) == data["y_test"]))
    return params, accuracy


def save_classifier(path: str | os.PathLike, params: Mapping, meta: Mapping[str, float]) -> None:
    flat = traverse_util.flatten_dict(params, sep="/")
    arrays = {_PARAM_PREFIX + k: np.asarray(v, np.float32) for k, v in flat.items()}
    arrays.update({_META_PREFIX + k: np.asarray(v) for k, v in meta.items()})
    np.savez_compressed(path, **arrays)


def load_classifier(path: str | os.PathLike | None = None) -> tuple[dict, dict[str, float]]:
    """(params, meta) from a classifier npz; default: the weights shipped with the package."""
    if path is None:
        ref = importlib.resources.files("fewstep_jax") / "assets" / "mnist_classifier.npz"
        with importlib.resources.as_file(ref) as p:
            return load_classifier(p)
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"MNIST classifier weights not found: {path}")
    with np.load(path) as f:
        flat = {k[len(_PARAM_PREFIX) :]: f[k] for k in f.files if k.startswith(_PARAM_PREFIX)}
        meta = {k[len(_META_PREFIX) :]: f[k].item() for k in f.files if k.startswith(_META_PREFIX)}
    if not flat:
        raise ValueError(f"{path} holds no '{_PARAM_PREFIX}*' arrays")
    params = traverse_util.unflatten_dict(flat, sep="/")
    expected = jax.eval_shape(MnistClassifier().init, jax.random.PRNGKey(0), jnp.zeros((1, 28, 28, 1)))[
        "params"
    ]
    want = {k: v.shape for k, v in traverse_util.flatten_dict(expected, sep="/").items()}
    got = {k: v.shape for k, v in flat.items()}
    if want != got:
        raise ValueError(f"{path} does not match MnistClassifier: expected {want}, got {got}")
    return params, meta


@functools.cache
def _shipped_params() -> dict:
    return load_classifier()[0]


@jax.jit
def _apply(params: dict, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    return MnistClassifier().apply({"params": params}, x)


def _run(x: Any, params: Mapping | None, which: int, batch_size: int) -> np.ndarray:
    x = as_mnist_images(x)
    params = _shipped_params() if params is None else params
    outs = [
        np.asarray(_apply(params, jnp.asarray(x[i : i + batch_size]))[which])
        for i in range(0, len(x), batch_size)
    ]
    dim = 10 if which == 0 else _FEATURE_DIM
    return np.concatenate(outs) if outs else np.zeros((0, dim), np.float32)


def mnist_features(x: Any, params: Mapping | None = None, batch_size: int = 1000) -> np.ndarray:
    """Penultimate features (B, 128) of images (B, 28, 28[, 1]) in [-1, 1]; default: shipped weights."""
    return _run(x, params, 1, batch_size)


def mnist_classifier_logits(x: Any, params: Mapping | None = None, batch_size: int = 1000) -> np.ndarray:
    """Class logits (B, 10) of images (B, 28, 28[, 1]) in [-1, 1]; default: shipped weights."""
    return _run(x, params, 0, batch_size)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--train-mnist-classifier", action="store_true", required=True)
    parser.add_argument("--mnist", required=True, help="path of mnist.npz")
    parser.add_argument("--out", required=True, help="output .npz")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=1500)
    args = parser.parse_args(argv)
    params, accuracy = train_mnist_classifier(args.mnist, seed=args.seed, steps=args.steps)
    save_classifier(args.out, params, {"test_accuracy": accuracy, "steps": args.steps, "seed": args.seed})
    size = Path(args.out).stat().st_size
    print(f"test accuracy {accuracy:.4f}; wrote {args.out} ({size / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
