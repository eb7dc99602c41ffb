"""Tests for zsbir_infer.itq: ITQ fitting, codes, persistence and Hamming distances."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from zsbir_infer.itq import ITQ, hamming_distance, pack_bits, unpack_bits


def _data(n: int = 600, d: int = 32, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    # Anisotropic, off-centre data so that centring and PCA matter.
    return rng.standard_normal((n, d)) * np.linspace(3.0, 0.2, d) + 5.0


def test_loss_decreases_and_rotation_orthogonal() -> None:
    x = _data()
    model = ITQ.fit(x, n_bits=16, n_iter=30, seed=1)
    hist = np.array(model.loss_history)
    assert hist.shape == (31,)
    assert np.all(np.diff(hist) <= 1e-9 * hist[0])  # non-increasing (up to rounding)
    assert hist[-1] < hist[0] * 0.99  # and it actually improves on the random rotation
    r = model.rotation
    np.testing.assert_allclose(r @ r.T, np.eye(16), atol=1e-10)
    np.testing.assert_allclose(model.components.T @ model.components, np.eye(16), atol=1e-10)
    assert model.quantization_loss(x) == pytest.approx(hist[-1])


def test_pca_directions_and_mean() -> None:
    x = _data(d=8)
    model = ITQ.fit(x, n_bits=3, n_iter=0)
    np.testing.assert_allclose(model.mean, x.mean(axis=0))
    # The data's variances decrease along the axes, so the top-3 PCA directions are close to e0, e1, e2.
    np.testing.assert_allclose(np.abs(model.components[:3, :3]), np.eye(3), atol=0.15)
    assert (model.dim, model.n_bits, model.n_bytes) == (8, 3, 1)


def test_codes_shapes_and_consistency() -> None:
    x = _data()
    model = ITQ.fit(x, n_bits=20, n_iter=5)
    bits = model.transform_bits(x[:10])
    packed = model.transform(x[:10])
    assert bits.shape == (10, 20) and bits.dtype == np.uint8 and set(np.unique(bits)) <= {0, 1}
    assert packed.shape == (10, 3) and packed.dtype == np.uint8
    np.testing.assert_array_equal(unpack_bits(packed, 20), bits)
    np.testing.assert_array_equal(bits, (model.project(x[:10]) > 0).astype(np.uint8))
    # Centred training data: every bit is balanced-ish (neither always 0 nor always 1).
    frac = model.transform_bits(x).mean(axis=0)
    assert np.all((frac > 0.2) & (frac < 0.8))


def test_close_vectors_have_close_codes() -> None:
    rng = np.random.default_rng(4)
    x = _data(n=800, d=64, seed=4)
    model = ITQ.fit(x, n_bits=64, n_iter=20)
    base = x[:200]
    near = base + 0.01 * rng.standard_normal(base.shape)
    far = x[200:400]
    d_near = np.diag(hamming_distance(model.transform(base), model.transform(near)))
    d_far = np.diag(hamming_distance(model.transform(base), model.transform(far)))
    assert d_near.mean() < 2.0
    assert d_far.mean() > 20.0


def test_save_load_round_trip(tmp_path: Path) -> None:
    x = _data()
    model = ITQ.fit(x, n_bits=16, n_iter=10, seed=3)
    path = tmp_path / "itq.npz"
    model.save(path)
    loaded = ITQ.load(path)
    np.testing.assert_array_equal(loaded.rotation, model.rotation)
    np.testing.assert_array_equal(loaded.transform(x), model.transform(x))
    assert loaded.loss_history == model.loss_history
    np.savez(tmp_path / "other.npz", a=np.zeros(3))
    with pytest.raises(ValueError, match="not a zsbir ITQ model"):
        ITQ.load(tmp_path / "other.npz")
    with pytest.raises(FileNotFoundError):
        ITQ.load(tmp_path / "missing.npz")


def test_seed_determinism_and_recenter() -> None:
    x = _data()
    a = ITQ.fit(x, n_bits=8, n_iter=5, seed=0)
    b = ITQ.fit(x, n_bits=8, n_iter=5, seed=0)
    np.testing.assert_array_equal(a.rotation, b.rotation)
    shifted = x + 3.0
    # recenter=True subtracts the data's own mean, undoing the shift (DSN-style per-set centring).
    np.testing.assert_array_equal(a.transform(shifted, recenter=True), a.transform(x, recenter=True))
    np.testing.assert_allclose(a.project(x, recenter=True), a.project(x), atol=1e-9)


def test_fit_and_transform_validation() -> None:
    x = _data(d=8)
    with pytest.raises(ValueError, match="n_bits"):
        ITQ.fit(x, n_bits=9)
    with pytest.raises(ValueError, match="n_bits"):
        ITQ.fit(x, n_bits=0)
    with pytest.raises(ValueError, match="n_iter"):
        ITQ.fit(x, n_bits=4, n_iter=-1)
    with pytest.raises(ValueError, match="at least 2"):
        ITQ.fit(x[:1], n_bits=4)
    with pytest.raises(ValueError, match="2-D"):
        ITQ.fit(x[0], n_bits=4)
    with pytest.raises(ValueError, match="NaN"):
        ITQ.fit(np.full((4, 8), np.nan), n_bits=4)
    model = ITQ.fit(x, n_bits=4, n_iter=2)
    with pytest.raises(ValueError, match="dimension 5"):
        model.transform(np.zeros((2, 5)))


def _ref_hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Bit-by-bit reference: unpack every byte with shifts and count differences."""
    out = np.zeros((a.shape[0], b.shape[0]), dtype=np.int64)
    for i in range(a.shape[0]):
        for j in range(b.shape[0]):
            d = 0
            for k in range(a.shape[1]):
                for bit in range(8):
                    d += ((int(a[i, k]) >> bit) & 1) != ((int(b[j, k]) >> bit) & 1)
            out[i, j] = d
    return out


@pytest.mark.parametrize("n_bytes", [1, 3, 8, 9, 16])
def test_hamming_against_bitwise_reference(n_bytes: int) -> None:
    rng = np.random.default_rng(n_bytes)
    a = rng.integers(0, 256, size=(7, n_bytes), dtype=np.uint8)
    b = rng.integers(0, 256, size=(5, n_bytes), dtype=np.uint8)
    got = hamming_distance(a, b)
    assert got.shape == (7, 5) and got.dtype == np.int32
    np.testing.assert_array_equal(got, _ref_hamming(a, b))


def test_hamming_hand_cases_and_validation() -> None:
    # 0x00 vs 0xFF differ in 8 bits; 0x0F vs 0xF0 in 8; 0b0101 vs 0b0110 in 2.
    a = np.array([[0x00], [0x0F], [0b0101]], dtype=np.uint8)
    b = np.array([[0xFF], [0xF0], [0b0110]], dtype=np.uint8)
    assert np.diag(hamming_distance(a, b)).tolist() == [8, 8, 2]
    with pytest.raises(ValueError, match="code widths differ"):
        hamming_distance(np.zeros((1, 2), np.uint8), np.zeros((1, 3), np.uint8))
    with pytest.raises(ValueError, match="uint8"):
        hamming_distance(np.zeros((1, 2), np.int64), np.zeros((1, 2), np.uint8))


def test_pack_bits_validation() -> None:
    assert pack_bits(np.array([[1, 0, 0, 0, 0, 0, 0, 1]])).tolist() == [[0b10000001]]
    with pytest.raises(ValueError, match="only 0 and 1"):
        pack_bits(np.array([[0, 2]]))
    with pytest.raises(ValueError, match="2-D"):
        pack_bits(np.array([0, 1]))
