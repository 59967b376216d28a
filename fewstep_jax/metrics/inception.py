"""The FID Inception-v3 in Flax Linen (NHWC), as a pure function ``params, images -> (B, 2048)``.

This is the network of pytorch-fid's ``FIDInceptionV3``, itself a port of the TensorFlow graph
``inception-2015-12-05`` used by the original TTUR FID code. It differs from torchvision's
Inception-v3 in the TF quirks that pytorch-fid reproduces:

* the average pools of the A, C and E blocks (Mixed_5b-d, 6b-e, 7b) exclude the zero padding
  from the count (``count_include_pad=False``);
* the pool branch of the last block (Mixed_7c, "E_2") is a 3x3 *max* pool (stride 1, pad 1);
* BatchNorm eps is 1e-3, every conv is bias-free and followed by BN and ReLU;
* the features are the 2048-d global average pool of Mixed_7c ("pool3"); the 1008-way fc layer
  is not needed for FID and is not kept.

Input: (B, H, W, 3) float32 in [-1, 1], H = W = 299 for FID (any size >= 75 runs; resizing and
the uint8 quantisation live in ``fid.py``). BatchNorm is in inference mode with its running
statistics stored as ordinary params (``bn/{scale, bias, mean, var}``), so the whole model is one
params pytree and ``inception_apply`` is a pure function.

Weights come from a file the user gives: pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth``.
Convert it once (needs torch; nothing is downloaded)::

    python -m fewstep_jax.metrics.inception --convert pt_inception-2015-12-05-6726825d.pth \\
        --out inception_fid.npz

The .npz holds one float32 array per param, keyed by its Flax path joined with "/" (e.g.
``Mixed_5b/branch1x1/conv/kernel``). Conv kernels are HWIO (torch OIHW transposed by
(2, 3, 1, 0)); BN ``weight, bias, running_mean, running_var`` become ``scale, bias, mean, var``.
"""

from __future__ import annotations

import argparse
import functools
import os
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

FEATURE_DIM = 2048
INPUT_SIZE = 299
MIN_INPUT_SIZE = 75
BN_EPS = 1e-3

CONVERT_COMMAND = (
    "python -m fewstep_jax.metrics.inception --convert pt_inception-2015-12-05-6726825d.pth "
    "--out inception_fid.npz"
)

# Flax BN leaf -> torch BatchNorm2d buffer/param name.
_BN_TO_TORCH = {"scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var"}
# Torch keys present in pytorch-fid's state dict that FID features do not use.
_IGNORED_TORCH_SUFFIXES = ("num_batches_tracked",)
_IGNORED_TORCH_PREFIXES = ("fc.", "AuxLogits.")

Pad = tuple[int, int]


# ---------------------------------------------------------------------------------------------
# Network
# ---------------------------------------------------------------------------------------------


class FrozenBatchNorm(nn.Module):
    """Inference-mode BatchNorm whose running statistics are plain params (no mutable state)."""

    eps: float = BN_EPS

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (c,))
        bias = self.param("bias", nn.initializers.zeros, (c,))
        mean = self.param("mean", nn.initializers.zeros, (c,))
        var = self.param("var", nn.initializers.ones, (c,))
        mult = scale * jax.lax.rsqrt(var + self.eps)
        return x * mult + (bias - mean * mult)


class BasicConv(nn.Module):
    """Bias-free conv -> BN(eps 1e-3) -> ReLU, as torchvision's ``BasicConv2d``."""

    features: int
    kernel: tuple[int, int]
    strides: tuple[int, int] = (1, 1)
    padding: Pad = (0, 0)  # symmetric (pad_h, pad_w), as torch's Conv2d(padding=...)
    precision: Any = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        ph, pw = self.padding
        x = nn.Conv(
            self.features,
            self.kernel,
            strides=self.strides,
            padding=((ph, ph), (pw, pw)),
            use_bias=False,
            precision=self.precision,
            name="conv",
        )(x)
        return nn.relu(FrozenBatchNorm(name="bn")(x))


def _avg_pool_3x3_same(x: jax.Array) -> jax.Array:
    # TF's SAME average pool divides by the number of *valid* pixels (count_include_pad=False).
    return nn.avg_pool(x, (3, 3), (1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_3x3_s2(x: jax.Array) -> jax.Array:
    return nn.max_pool(x, (3, 3), (2, 2), padding="VALID")


class InceptionA(nn.Module):
    """Mixed_5b/5c/5d: 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | avgpool-1x1 (FIDInceptionA)."""

    pool_features: int
    precision: Any = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        conv = lambda f, k, p, name: BasicConv(f, k, padding=p, precision=self.precision, name=name)
        b1 = conv(64, (1, 1), (0, 0), "branch1x1")(x)
        b5 = conv(48, (1, 1), (0, 0), "branch5x5_1")(x)
        b5 = conv(64, (5, 5), (2, 2), "branch5x5_2")(b5)
        b3 = conv(64, (1, 1), (0, 0), "branch3x3dbl_1")(x)
        b3 = conv(96, (3, 3), (1, 1), "branch3x3dbl_2")(b3)
        b3 = conv(96, (3, 3), (1, 1), "branch3x3dbl_3")(b3)
        bp = conv(self.pool_features, (1, 1), (0, 0), "branch_pool")(_avg_pool_3x3_same(x))
        return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
    """Mixed_6a (grid reduction 35 -> 17): 3x3/2 | 1x1-3x3-3x3/2 | maxpool/2."""

    precision: Any = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        p = self.precision
        b3 = BasicConv(384, (3, 3), (2, 2), precision=p, name="branch3x3")(x)
        bd = BasicConv(64, (1, 1), precision=p, name="branch3x3dbl_1")(x)
        bd = BasicConv(96, (3, 3), padding=(1, 1), precision=p, name="branch3x3dbl_2")(bd)
        bd = BasicConv(96, (3, 3), (2, 2), precision=p, name="branch3x3dbl_3")(bd)
        return jnp.concatenate([b3, bd, _max_pool_3x3_s2(x)], axis=-1)


class InceptionC(nn.Module):
    """Mixed_6b-6e: 1x1 | 1x1-1x7-7x1 | 1x1-7x1-1x7-7x1-1x7 | avgpool-1x1 (FIDInceptionC)."""

    channels_7x7: int
    precision: Any = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c7 = self.channels_7x7
        conv = lambda f, k, p, name: BasicConv(f, k, padding=p, precision=self.precision, name=name)
        row, col = ((1, 7), (0, 3)), ((7, 1), (3, 0))  # (kernel, padding) pairs
        b1 = conv(192, (1, 1), (0, 0), "branch1x1")(x)
        b7 = conv(c7, (1, 1), (0, 0), "branch7x7_1")(x)
        b7 = conv(c7, *row, "branch7x7_2")(b7)
        b7 = conv(192, *col, "branch7x7_3")(b7)
        bd = conv(c7, (1, 1), (0, 0), "branch7x7dbl_1")(x)
        bd = conv(c7, *col, "branch7x7dbl_2")(bd)
        bd = conv(c7, *row, "branch7x7dbl_3")(bd)
        bd = conv(c7, *col, "branch7x7dbl_4")(bd)
        bd = conv(192, *row, "branch7x7dbl_5")(bd)
        bp = conv(192, (1, 1), (0, 0), "branch_pool")(_avg_pool_3x3_same(x))
        return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
    """Mixed_7a (grid reduction 17 -> 8): 1x1-3x3/2 | 1x1-1x7-7x1-3x3/2 | maxpool/2."""

    precision: Any = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        p = self.precision
        b3 = BasicConv(192, (1, 1), precision=p, name="branch3x3_1")(x)
        b3 = BasicConv(320, (3, 3), (2, 2), precision=p, name="branch3x3_2")(b3)
        b7 = BasicConv(192, (1, 1), precision=p, name="branch7x7x3_1")(x)
        b7 = BasicConv(192, (1, 7), padding=(0, 3), precision=p, name="branch7x7x3_2")(b7)
        b7 = BasicConv(192, (7, 1), padding=(3, 0), precision=p, name="branch7x7x3_3")(b7)
        b7 = BasicConv(192, (3, 3), (2, 2), precision=p, name="branch7x7x3_4")(b7)
        return jnp.concatenate([b3, b7, _max_pool_3x3_s2(x)], axis=-1)


class InceptionE(nn.Module):
    """Mixed_7b/7c: 1x1 | 1x1-(1x3,3x1) | 1x1-3x3-(1x3,3x1) | pool-1x1.

    ``max_pool=False``: FIDInceptionE_1 (avg pool, count_include_pad=False), Mixed_7b.
    ``max_pool=True``: FIDInceptionE_2 (3x3 max pool, stride 1, pad 1), Mixed_7c.
    """

    max_pool: bool
    precision: Any = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        conv = lambda f, k, p, name: BasicConv(f, k, padding=p, precision=self.precision, name=name)
        b1 = conv(320, (1, 1), (0, 0), "branch1x1")(x)
        b3 = conv(384, (1, 1), (0, 0), "branch3x3_1")(x)
        b3a = conv(384, (1, 3), (0, 1), "branch3x3_2a")(b3)
        b3b = conv(384, (3, 1), (1, 0), "branch3x3_2b")(b3)
        bd = conv(448, (1, 1), (0, 0), "branch3x3dbl_1")(x)
        bd = conv(384, (3, 3), (1, 1), "branch3x3dbl_2")(bd)
        bda = conv(384, (1, 3), (0, 1), "branch3x3dbl_3a")(bd)
        bdb = conv(384, (3, 1), (1, 0), "branch3x3dbl_3b")(bd)
        if self.max_pool:
            # Padding of a max pool is -inf, as torch's max_pool2d(padding=1).
            pooled = nn.max_pool(x, (3, 3), (1, 1), padding=((1, 1), (1, 1)))
        else:
            pooled = _avg_pool_3x3_same(x)
        bp = conv(192, (1, 1), (0, 0), "branch_pool")(pooled)
        return jnp.concatenate([b1, b3a, b3b, bda, bdb, bp], axis=-1)


class InceptionV3(nn.Module):
    """FID Inception-v3 trunk: (B, H, W, 3) in [-1, 1] -> (B, 2048) pool3 features."""

    precision: Any = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f"Inception expects (B, H, W, 3) images, got shape {x.shape}")
        if min(x.shape[1:3]) < MIN_INPUT_SIZE:
            raise ValueError(
                f"Inception needs H, W >= {MIN_INPUT_SIZE} (FID uses {INPUT_SIZE}); got {x.shape}"
            )
        p = self.precision
        x = BasicConv(32, (3, 3), (2, 2), precision=p, name="Conv2d_1a_3x3")(x)
        x = BasicConv(32, (3, 3), precision=p, name="Conv2d_2a_3x3")(x)
        x = BasicConv(64, (3, 3), padding=(1, 1), precision=p, name="Conv2d_2b_3x3")(x)
        x = _max_pool_3x3_s2(x)
        x = BasicConv(80, (1, 1), precision=p, name="Conv2d_3b_1x1")(x)
        x = BasicConv(192, (3, 3), precision=p, name="Conv2d_4a_3x3")(x)
        x = _max_pool_3x3_s2(x)
        x = InceptionA(32, precision=p, name="Mixed_5b")(x)
        x = InceptionA(64, precision=p, name="Mixed_5c")(x)
        x = InceptionA(64, precision=p, name="Mixed_5d")(x)
        x = InceptionB(precision=p, name="Mixed_6a")(x)
        x = InceptionC(128, precision=p, name="Mixed_6b")(x)
        x = InceptionC(160, precision=p, name="Mixed_6c")(x)
        x = InceptionC(160, precision=p, name="Mixed_6d")(x)
        x = InceptionC(192, precision=p, name="Mixed_6e")(x)
        x = InceptionD(precision=p, name="Mixed_7a")(x)
        x = InceptionE(max_pool=False, precision=p, name="Mixed_7b")(x)
        x = InceptionE(max_pool=True, precision=p, name="Mixed_7c")(x)
        return jnp.mean(x, axis=(1, 2))


def inception_apply(params: Mapping, images: jax.Array) -> jax.Array:
    """Pool3 features (B, 2048) of images (B, H, W, 3) float32 in [-1, 1] (H = W = 299 for FID)."""
    return InceptionV3().apply({"params": params}, images)


def random_inception_params(seed: int = 0) -> dict:
    """Random params for tests (the real weights are not available offline).

    He-normal conv kernels and random BN statistics (numpy, so there is nothing to compile) keep
    activations of order one through the 94 layers.
    """
    rng = np.random.default_rng(seed)
    flat = {}
    for key, shape in param_shapes().items():
        leaf = key.rsplit("/", 1)[-1]
        if leaf == "kernel":
            fan_in = shape[0] * shape[1] * shape[2]
            value = rng.normal(0.0, np.sqrt(2.0 / fan_in), shape)
        elif leaf in ("scale", "var"):
            value = rng.uniform(0.5, 1.5, shape)
        else:  # bias, mean
            value = rng.normal(0.0, 0.1, shape)
        flat[key] = value.astype(np.float32)
    return traverse_util.unflatten_dict(flat, sep="/")


# ---------------------------------------------------------------------------------------------
# Weights: torch state dict -> flat npz -> params
# ---------------------------------------------------------------------------------------------


def param_shapes() -> dict[str, tuple[int, ...]]:
    """Flat ``"a/b/c" -> shape`` of every param (computed abstractly, no FLOPs)."""
    return dict(_param_shapes())


@functools.cache
def _param_shapes() -> dict[str, tuple[int, ...]]:
    x = jax.ShapeDtypeStruct((1, INPUT_SIZE, INPUT_SIZE, 3), jnp.float32)
    tree = jax.eval_shape(InceptionV3().init, jax.random.PRNGKey(0), x)["params"]
    flat = traverse_util.flatten_dict(tree, sep="/")
    return {k: tuple(v.shape) for k, v in flat.items()}


def torch_key(flax_key: str) -> str:
    """pytorch-fid state-dict key of a flat Flax key, e.g. ``Mixed_5b/branch1x1/bn/var`` ->
    ``Mixed_5b.branch1x1.bn.running_var``."""
    *path, leaf = flax_key.split("/")
    if path[-1] == "conv" and leaf == "kernel":
        leaf = "weight"
    elif path[-1] == "bn" and leaf in _BN_TO_TORCH:
        leaf = _BN_TO_TORCH[leaf]
    else:
        raise ValueError(f"no torch name for Flax param {flax_key!r}")
    return ".".join([*path, leaf])


def convert_torch_state_dict(state_dict: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """pytorch-fid FIDInceptionV3 state dict (torch tensors or arrays) -> flat Flax params.

    Conv weights OIHW -> HWIO; BN weight/bias/running_mean/running_var -> scale/bias/mean/var.
    Every expected key must be present with the right shape; ``fc.*``, ``AuxLogits.*`` and
    ``*.num_batches_tracked`` are ignored; any other key is an error.
    """

    def as_numpy(v: Any) -> np.ndarray:
        if hasattr(v, "detach"):  # torch.Tensor, without importing torch here
            v = v.detach().cpu().float().numpy()
        return np.asarray(v, dtype=np.float32)

    out: dict[str, np.ndarray] = {}
    missing, used = [], set()
    for fkey, shape in param_shapes().items():
        tkey = torch_key(fkey)
        if tkey not in state_dict:
            missing.append(tkey)
            continue
        used.add(tkey)
        value = as_numpy(state_dict[tkey])
        if value.ndim == 4:
            value = value.transpose(2, 3, 1, 0)  # OIHW -> HWIO
        if value.shape != shape:
            raise ValueError(
                f"state dict key {tkey!r} has shape {tuple(state_dict[tkey].shape)}, which gives "
                f"{value.shape} for Flax param {fkey!r}; expected {shape}"
            )
        out[fkey] = np.ascontiguousarray(value)
    unexpected = sorted(
        k
        for k in state_dict
        if k not in used
        and not k.endswith(_IGNORED_TORCH_SUFFIXES)
        and not k.startswith(_IGNORED_TORCH_PREFIXES)
    )
    if missing or unexpected:
        raise ValueError(
            "not a pytorch-fid FIDInceptionV3 state dict: "
            f"missing {len(missing)} keys {missing[:5]}, unexpected {len(unexpected)} keys "
            f"{unexpected[:5]}"
        )
    return out


def convert_torch_file(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Convert pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth`` to our flat .npz."""
    try:
        import torch  # optional: only the converter needs it
    except ImportError as e:
        raise ImportError("converting the .pth weights needs PyTorch (pip install torch)") from e
    if not os.path.isfile(src):
        raise FileNotFoundError(f"Inception weights {os.fspath(src)!r} not found")
    state_dict = torch.load(src, map_location="cpu", weights_only=True)
    if not isinstance(state_dict, Mapping):
        raise ValueError(f"{os.fspath(src)!r} does not hold a state dict (got {type(state_dict)})")
    flat = convert_torch_state_dict(state_dict)
    with open(dst, "wb") as f:  # an open file keeps np.savez from appending ".npz"
        np.savez(f, **flat)


def load_inception_params(path: str | os.PathLike) -> dict:
    """Params pytree (numpy float32) from an .npz written by ``--convert``."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"FID Inception weights {path!r} not found. Nothing is downloaded: get pytorch-fid's "
            f"pt_inception-2015-12-05-6726825d.pth and convert it with `{CONVERT_COMMAND}`."
        )
    with np.load(path) as data:
        flat = {k: np.asarray(data[k], np.float32) for k in data.files}
    expected = param_shapes()
    missing = sorted(set(expected) - set(flat))
    unexpected = sorted(set(flat) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"{path!r} is not an FID Inception .npz: missing keys {missing[:5]} "
            f"({len(missing)}), unexpected keys {unexpected[:5]} ({len(unexpected)})"
        )
    for k, shape in expected.items():
        if flat[k].shape != shape:
            raise ValueError(f"{path!r}: key {k!r} has shape {flat[k].shape}, expected {shape}")
    return traverse_util.unflatten_dict(flat, sep="/")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m fewstep_jax.metrics.inception",
        description="Convert pytorch-fid's FID Inception weights (.pth) to a Flax .npz.",
    )
    parser.add_argument("--convert", required=True, help="pt_inception-2015-12-05-6726825d.pth")
    parser.add_argument("--out", required=True, help="output .npz (e.g. inception_fid.npz)")
    args = parser.parse_args(argv)
    convert_torch_file(args.convert, args.out)
    n = len(param_shapes())
    print(f"wrote {n} arrays to {args.out}")


if __name__ == "__main__":
    main()
