"""FID / KID: preprocessing, the FID Inception (shape, torch parity, weight converter), sharding.

The real Inception weights are not available offline: the network is checked with random params,
against a PyTorch FID Inception written here (torchvision's module names, pytorch-fid's FID
blocks), whose random state dict also exercises the .pth -> .npz converter.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg
from jax.sharding import Mesh

from fewstep_jax.metrics import fid as fid_lib
from fewstep_jax.metrics import inception as inc

SMALL = 107  # smallest cheap size at which the E blocks still see a 2x2 grid (pools matter there)
_apply = jax.jit(inc.inception_apply)


@pytest.fixture(scope="module")
def random_params():
    return inc.random_inception_params(seed=0)


# ---------------------------------------------------------------------------------------------
# Preprocessing
# ---------------------------------------------------------------------------------------------


def test_to_uint8_hand_values():
    x = np.array([-1.0, 1.0, 0.0, -0.999, 0.5, 2.0, -3.0, 0.2], np.float32).reshape(1, 2, 4, 1)
    # (x + 1) * 127.5 = 0, 255, 127.5 (half to even -> 128), 0.1275, 191.25, 382.5, -255, 153
    expected = np.array([0, 255, 128, 0, 191, 255, 0, 153], np.uint8).reshape(1, 2, 4, 1)
    got = fid_lib.to_uint8(x)
    assert got.dtype == np.uint8
    np.testing.assert_array_equal(got, expected)
    u = np.arange(12, dtype=np.uint8).reshape(1, 2, 2, 3)
    np.testing.assert_array_equal(fid_lib.to_uint8(u), u)  # uint8 passes unchanged


@pytest.mark.parametrize(
    "bad",
    [
        np.zeros((2, 8, 8, 2), np.float32),  # C = 2
        np.zeros((8, 8, 3), np.float32),  # no batch axis
        np.full((1, 4, 4, 3), np.nan, np.float32),
        np.zeros((1, 4, 4, 3), np.int32),  # neither uint8 nor float
    ],
)
def test_to_uint8_rejects(bad):
    with pytest.raises(ValueError):
        fid_lib.to_uint8(bad)


def test_preprocess_constant_and_hand_ramp():
    const = np.full((2, 5, 7, 3), 200, np.uint8)
    out = np.asarray(fid_lib.preprocess(const, 299))
    assert out.shape == (2, 299, 299, 3)
    np.testing.assert_allclose(out, 200 / 127.5 - 1, atol=1e-6)
    # Row [0, 100] upsampled 2 -> 4 with half-pixel centres: source x = (j + 0.5) / 2 - 0.5 =
    # -0.25 (clamped to 0), 0.25, 0.75, 1.25 (clamped to 1) -> 0, 25, 75, 100.
    ramp = np.array([[0, 100], [0, 100]], np.uint8).reshape(1, 2, 2, 1)
    out = np.asarray(fid_lib.preprocess(ramp, 4))
    assert out.shape == (1, 4, 4, 3)  # grayscale repeated to RGB
    expected = np.array([0.0, 25.0, 75.0, 100.0]) / 127.5 - 1
    np.testing.assert_allclose(out, np.broadcast_to(expected[None, None, :, None], out.shape), atol=1e-6)


def test_preprocess_grayscale_equals_repeated_rgb():
    g = np.random.default_rng(0).integers(0, 256, (2, 9, 9, 1), dtype=np.uint8)
    a = fid_lib.preprocess(g, 23)
    b = fid_lib.preprocess(np.repeat(g, 3, axis=-1), 23)
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)  # summation order only


@pytest.mark.parametrize("hw,size", [((32, 32), 299), ((40, 50), 17)])
def test_resize_matches_pytorch_fid(hw, size):
    """Our resize == pytorch-fid's F.interpolate(bilinear, align_corners=False), up and down."""
    torch = pytest.importorskip("torch")
    u = np.random.default_rng(1).integers(0, 256, (2, *hw, 3), dtype=np.uint8)
    ours = np.asarray(fid_lib.preprocess(u, size))
    t = torch.from_numpy(u).permute(0, 3, 1, 2).float() / 255.0
    t = torch.nn.functional.interpolate(t, size=(size, size), mode="bilinear", align_corners=False)
    ref = (2 * t - 1).permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(ours, ref, atol=2e-6)


# ---------------------------------------------------------------------------------------------
# Frechet distance, statistics, KID
# ---------------------------------------------------------------------------------------------


def _frechet_reference(mu1, s1, mu2, s2):
    """Independent computation: tr (s1 s2)^{1/2} = sum sqrt(eig(s1^{1/2} s2 s1^{1/2}))."""
    r = scipy.linalg.sqrtm(s1).real  # s1 is SPD here, so this is the symmetric root
    eig = np.linalg.eigvalsh(r @ s2 @ r)
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(eig.clip(0)).sum())


def test_frechet_distance_matches_independent_computation():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(400, 16)) @ rng.normal(size=(16, 16))
    b = 0.5 + rng.normal(size=(300, 16)) @ rng.normal(size=(16, 16)) * 0.7
    mu1, s1 = fid_lib.compute_statistics(a)
    mu2, s2 = fid_lib.compute_statistics(b)
    np.testing.assert_allclose(mu1, a.mean(0), rtol=1e-12)
    np.testing.assert_allclose(s1, np.cov(a.T, ddof=1), rtol=1e-12)
    got = fid_lib.fid_from_stats(mu1, s1, mu2, s2)
    assert got > 1.0
    # Both are float64 with well-conditioned 16x16 covariances: agreement to ~1e-9 relative.
    assert got == pytest.approx(_frechet_reference(mu1, s1, mu2, s2), rel=1e-8)
    assert fid_lib.fid_from_stats(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-8)


def test_kid_matches_independent_computation():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(12, 5)), rng.normal(0.3, 1.0, size=(12, 5))
    d, m = 5, 12

    def k(a, b):
        return (float(a @ b) / d + 1.0) ** 3

    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / (m * m)
    # subset_size = m uses every sample, so each subset (a permutation) gives the same value.
    mean, std = fid_lib.kid(x, y, num_subsets=3, subset_size=m)
    assert mean == pytest.approx(xx + yy - 2 * xy, rel=1e-10)
    assert std == pytest.approx(0.0, abs=1e-12)


def test_reference_stats_roundtrip_and_errors(tmp_path):
    rng = np.random.default_rng(0)
    mu, sigma = rng.normal(size=4), np.eye(4) + 0.1
    path = tmp_path / "ref_stats"  # no suffix: written to exactly this path
    fid_lib.save_reference_stats(path, mu, sigma)
    got_mu, got_sigma = fid_lib.load_reference_stats(path)
    np.testing.assert_array_equal(got_mu, mu)
    np.testing.assert_array_equal(got_sigma, sigma)
    adm = tmp_path / "adm_like.npz"  # ADM reference batches carry extra keys
    np.savez(adm, arr_0=np.zeros((2, 4, 4, 3), np.uint8), mu=mu, sigma=sigma, mu_s=mu)
    np.testing.assert_array_equal(fid_lib.load_reference_stats(adm)[0], mu)
    np.savez(tmp_path / "no_sigma.npz", mu=mu)
    with pytest.raises(ValueError, match="sigma"):
        fid_lib.load_reference_stats(tmp_path / "no_sigma.npz")
    with pytest.raises(FileNotFoundError, match=r"nope\.npz"):
        fid_lib.load_reference_stats(tmp_path / "nope.npz")
    with pytest.raises(ValueError, match="sigma"):
        fid_lib.save_reference_stats(tmp_path / "bad.npz", mu, sigma[:3])


# ---------------------------------------------------------------------------------------------
# Network
# ---------------------------------------------------------------------------------------------


def test_activations_shape_and_resize(random_params):
    """Any input size is resized to 299 and gives (B, 2048); padding of the last batch is cut."""
    imgs = np.random.default_rng(0).uniform(-1, 1, (3, 32, 32, 3)).astype(np.float32)
    acts = fid_lib.compute_activations(random_params, imgs, batch_size=2)
    assert acts.shape == (3, inc.FEATURE_DIM) and acts.dtype == np.float32
    assert np.all(np.isfinite(acts)) and np.all(acts >= 0)  # mean of ReLU outputs
    assert np.abs(acts[0] - acts[1]).max() > 1e-3  # distinct images, distinct features
    # The last image went alone (with 1 padding image) through the same function.
    again = fid_lib.compute_activations(random_params, imgs[2:], batch_size=2)
    np.testing.assert_allclose(again[0], acts[2], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=">= 75"):
        inc.inception_apply(random_params, jnp.zeros((1, 64, 64, 3)))


def test_sharded_activations_equal_unsharded(random_params):
    assert jax.device_count() == 8
    mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "model"))
    imgs = np.random.default_rng(1).uniform(-1, 1, (10, 40, 40, 3)).astype(np.float32)
    plain = fid_lib.compute_activations(random_params, imgs, batch_size=8, resize_to=SMALL)
    sharded = fid_lib.compute_activations(random_params, imgs, batch_size=8, mesh=mesh, resize_to=SMALL)
    assert sharded.shape == (10, inc.FEATURE_DIM)
    # float32 through ~100 layers with another per-device batch (so another summation order):
    # single entries differ by up to ~2e-5 (seen once in CI); a sharding bug moves them by O(1)
    np.testing.assert_allclose(sharded, plain, rtol=1e-4, atol=1e-4)
    x = fid_lib.preprocess(fid_lib.to_uint8(imgs[:2]), SMALL)
    np.testing.assert_allclose(plain[:2], _apply(random_params, x), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="multiple of the mesh size"):
        fid_lib.compute_activations(random_params, imgs, batch_size=6, mesh=mesh, resize_to=SMALL)


# ---------------------------------------------------------------------------------------------
# PyTorch reference and converter
# ---------------------------------------------------------------------------------------------


def _torch_fid_inception():
    """pytorch-fid's FIDInceptionV3 trunk (up to pool3), written out with torchvision's names."""
    torch = pytest.importorskip("torch")
    nn, F = torch.nn, torch.nn.functional

    class Conv(nn.Module):
        def __init__(self, cin, cout, k, stride=1, padding=0):
            super().__init__()
            self.conv = nn.Conv2d(cin, cout, k, stride=stride, padding=padding, bias=False)
            self.bn = nn.BatchNorm2d(cout, eps=0.001)

        def forward(self, x):
            return F.relu(self.bn(self.conv(x)))

    def avg(x):
        return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)

    class A(nn.Module):
        def __init__(self, cin, pool):
            super().__init__()
            self.branch1x1 = Conv(cin, 64, 1)
            self.branch5x5_1, self.branch5x5_2 = Conv(cin, 48, 1), Conv(48, 64, 5, padding=2)
            self.branch3x3dbl_1 = Conv(cin, 64, 1)
            self.branch3x3dbl_2 = Conv(64, 96, 3, padding=1)
            self.branch3x3dbl_3 = Conv(96, 96, 3, padding=1)
            self.branch_pool = Conv(cin, pool, 1)

        def forward(self, x):
            b5 = self.branch5x5_2(self.branch5x5_1(x))
            b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
            return torch.cat([self.branch1x1(x), b5, b3, self.branch_pool(avg(x))], 1)

    class B(nn.Module):
        def __init__(self, cin):
            super().__init__()
            self.branch3x3 = Conv(cin, 384, 3, stride=2)
            self.branch3x3dbl_1 = Conv(cin, 64, 1)
            self.branch3x3dbl_2 = Conv(64, 96, 3, padding=1)
            self.branch3x3dbl_3 = Conv(96, 96, 3, stride=2)

        def forward(self, x):
            b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
            return torch.cat([self.branch3x3(x), b3, F.max_pool2d(x, 3, stride=2)], 1)

    class C(nn.Module):
        def __init__(self, cin, c7):
            super().__init__()
            r, c = dict(k=(1, 7), padding=(0, 3)), dict(k=(7, 1), padding=(3, 0))
            self.branch1x1 = Conv(cin, 192, 1)
            self.branch7x7_1, self.branch7x7_2 = Conv(cin, c7, 1), Conv(c7, c7, **r)
            self.branch7x7_3 = Conv(c7, 192, **c)
            self.branch7x7dbl_1, self.branch7x7dbl_2 = Conv(cin, c7, 1), Conv(c7, c7, **c)
            self.branch7x7dbl_3, self.branch7x7dbl_4 = Conv(c7, c7, **r), Conv(c7, c7, **c)
            self.branch7x7dbl_5 = Conv(c7, 192, **r)
            self.branch_pool = Conv(cin, 192, 1)

        def forward(self, x):
            b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
            bd = x
            for i in range(1, 6):
                bd = getattr(self, f"branch7x7dbl_{i}")(bd)
            return torch.cat([self.branch1x1(x), b7, bd, self.branch_pool(avg(x))], 1)

    class D(nn.Module):
        def __init__(self, cin):
            super().__init__()
            self.branch3x3_1, self.branch3x3_2 = Conv(cin, 192, 1), Conv(192, 320, 3, stride=2)
            self.branch7x7x3_1 = Conv(cin, 192, 1)
            self.branch7x7x3_2 = Conv(192, 192, (1, 7), padding=(0, 3))
            self.branch7x7x3_3 = Conv(192, 192, (7, 1), padding=(3, 0))
            self.branch7x7x3_4 = Conv(192, 192, 3, stride=2)

        def forward(self, x):
            b3 = self.branch3x3_2(self.branch3x3_1(x))
            b7 = x
            for i in range(1, 5):
                b7 = getattr(self, f"branch7x7x3_{i}")(b7)
            return torch.cat([b3, b7, F.max_pool2d(x, 3, stride=2)], 1)

    class E(nn.Module):
        def __init__(self, cin, max_pool):
            super().__init__()
            self.max_pool = max_pool
            self.branch1x1 = Conv(cin, 320, 1)
            self.branch3x3_1 = Conv(cin, 384, 1)
            self.branch3x3_2a = Conv(384, 384, (1, 3), padding=(0, 1))
            self.branch3x3_2b = Conv(384, 384, (3, 1), padding=(1, 0))
            self.branch3x3dbl_1 = Conv(cin, 448, 1)
            self.branch3x3dbl_2 = Conv(448, 384, 3, padding=1)
            self.branch3x3dbl_3a = Conv(384, 384, (1, 3), padding=(0, 1))
            self.branch3x3dbl_3b = Conv(384, 384, (3, 1), padding=(1, 0))
            self.branch_pool = Conv(cin, 192, 1)

        def forward(self, x):
            b3 = self.branch3x3_1(x)
            b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
            bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
            bd = torch.cat([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], 1)
            pooled = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else avg(x)
            return torch.cat([self.branch1x1(x), b3, bd, self.branch_pool(pooled)], 1)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.Conv2d_1a_3x3 = Conv(3, 32, 3, stride=2)
            self.Conv2d_2a_3x3 = Conv(32, 32, 3)
            self.Conv2d_2b_3x3 = Conv(32, 64, 3, padding=1)
            self.Conv2d_3b_1x1 = Conv(64, 80, 1)
            self.Conv2d_4a_3x3 = Conv(80, 192, 3)
            self.Mixed_5b, self.Mixed_5c, self.Mixed_5d = A(192, 32), A(256, 64), A(288, 64)
            self.Mixed_6a = B(288)
            self.Mixed_6b, self.Mixed_6c = C(768, 128), C(768, 160)
            self.Mixed_6d, self.Mixed_6e = C(768, 160), C(768, 192)
            self.Mixed_7a = D(768)
            self.Mixed_7b, self.Mixed_7c = E(1280, False), E(2048, True)
            self.fc = nn.Linear(2048, 1008)  # in pytorch-fid's file, unused for FID

        def forward(self, x):
            x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
            x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(F.max_pool2d(x, 3, stride=2)))
            x = F.max_pool2d(x, 3, stride=2)
            for name in ["5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"]:
                x = getattr(self, f"Mixed_{name}")(x)
            return x.mean(dim=(2, 3))

    torch.manual_seed(0)
    net = Net().eval()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.Conv2d):
                fan_in = m.weight[0].numel()
                m.weight.normal_(0.0, (2.0 / fan_in) ** 0.5)
            elif isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0.0, 0.1)
                m.running_mean.normal_(0.0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return torch, net


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """(torch net, its state dict as numpy, path of the .npz written by the --convert command)."""
    torch, net = _torch_fid_inception()
    d = tmp_path_factory.mktemp("inception")
    pth, out = d / "pt_inception.pth", d / "inception_fid.npz"
    torch.save(net.state_dict(), pth)
    inc.main(["--convert", str(pth), "--out", str(out)])
    sd = {k: v.numpy() for k, v in net.state_dict().items()}
    return net, sd, out


def test_converter_roundtrip(converted):
    _, sd, out = converted
    with np.load(out) as data:
        flat = {k: data[k] for k in data.files}
    assert set(flat) == set(inc.param_shapes())
    # Every torch param/buffer except the unused fc and BN counters is consumed exactly once.
    used = {inc.torch_key(k) for k in flat}
    assert used == {k for k in sd if not k.endswith("num_batches_tracked") and not k.startswith("fc.")}
    for k, v in flat.items():
        ref = sd[inc.torch_key(k)]
        np.testing.assert_array_equal(v, ref.transpose(2, 3, 1, 0) if ref.ndim == 4 else ref)
    # Hand-written spot checks of the mapping and of the OIHW -> HWIO transpose.
    k1 = flat["Conv2d_1a_3x3/conv/kernel"]
    assert k1.shape == (3, 3, 3, 32)
    assert k1[2, 1, 0, 5] == sd["Conv2d_1a_3x3.conv.weight"][5, 0, 2, 1]
    assert flat["Mixed_6b/branch7x7_2/conv/kernel"].shape == (1, 7, 128, 128)
    assert flat["Mixed_7c/branch3x3dbl_3b/conv/kernel"].shape == (3, 1, 384, 384)
    for flax_key, torch_key in [
        ("Mixed_7c/branch_pool/bn/var", "Mixed_7c.branch_pool.bn.running_var"),
        ("Mixed_5b/branch1x1/bn/scale", "Mixed_5b.branch1x1.bn.weight"),
        ("Mixed_5b/branch1x1/bn/mean", "Mixed_5b.branch1x1.bn.running_mean"),
        ("Mixed_5b/branch1x1/bn/bias", "Mixed_5b.branch1x1.bn.bias"),
    ]:
        np.testing.assert_array_equal(flat[flax_key], sd[torch_key])


def test_converter_rejects_wrong_state_dicts(converted):
    _, sd, _ = converted
    missing = {k: v for k, v in sd.items() if k != "Mixed_6c.branch7x7_3.bn.running_var"}
    with pytest.raises(ValueError, match=re.escape("Mixed_6c.branch7x7_3.bn.running_var")):
        inc.convert_torch_state_dict(missing)
    with pytest.raises(ValueError, match=re.escape("Mixed_8x.conv.weight")):
        inc.convert_torch_state_dict({**sd, "Mixed_8x.conv.weight": np.zeros(1)})
    wrong = {**sd, "Mixed_5b.branch1x1.conv.weight": np.zeros((64, 192, 3, 3), np.float32)}
    with pytest.raises(ValueError, match=re.escape("Mixed_5b.branch1x1.conv.weight")):
        inc.convert_torch_state_dict(wrong)


def test_load_inception_params_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"absent\.npz.*--convert"):
        inc.load_inception_params(tmp_path / "absent.npz")
    np.savez(tmp_path / "junk.npz", a=np.zeros(3))
    with pytest.raises(ValueError, match="missing keys"):
        inc.load_inception_params(tmp_path / "junk.npz")


def test_flax_matches_torch_reference(converted):
    """Whole-network parity with the torch FID Inception: pins conv layout, paddings, the
    count_include_pad=False average pools and the max pool of Mixed_7c (2x2 grid at 107)."""
    net, _, out = converted
    torch = pytest.importorskip("torch")
    x = np.random.default_rng(2).uniform(-1, 1, (2, SMALL, SMALL, 3)).astype(np.float32)
    with torch.no_grad():
        ref = net(torch.from_numpy(x).permute(0, 3, 1, 2)).numpy()
    got = np.asarray(_apply(inc.load_inception_params(out), jnp.asarray(x)))
    assert got.shape == ref.shape == (2, 2048)
    scale = np.abs(ref).max()
    assert scale > 0.1
    np.testing.assert_allclose(got, ref, atol=1e-4 * scale)


# ---------------------------------------------------------------------------------------------
# End to end (slow: 2048-d sqrtm takes over a minute on 2 cores)
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_fid_commands_end_to_end(converted, tmp_path):
    _, _, weights = converted
    imgs = np.random.default_rng(3).integers(0, 256, (16, 32, 32, 3), dtype=np.uint8)
    np.savez(tmp_path / "samples.npz", arr_0=imgs)
    stats = tmp_path / "ref.npz"
    fid_lib.main(
        [
            "stats",
            "--inception",
            str(weights),
            "--images",
            str(tmp_path / "samples.npz"),
            "--out",
            str(stats),
            "--batch-size",
            "8",
        ]
    )
    mu, sigma = fid_lib.load_reference_stats(stats)
    assert mu.shape == (2048,) and sigma.shape == (2048, 2048)
    params = inc.load_inception_params(weights)
    value = fid_lib.fid(params, imgs, (mu, sigma), batch_size=8)
    # Against itself FID is 0 up to sqrtm's round-off on a rank-15 covariance.
    assert 0.0 <= value < 1e-4 * np.trace(sigma)
