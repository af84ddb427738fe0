"""The label-DP accountant against published values, the noise inside a mask, row transforms, batch sizes."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fedps.engine.crypto.encoding import PackingLayout, decode_ints
from fedps.engine.vertical.plan import auto_batch_size, batch_count
from fedps.engine.vertical.privacy import (Accountant, add_to_masked, calibrate, clip_rows, rdp_gaussian,
                                           rdp_subsampled_gaussian)
from fedps.engine.vertical.standardize import RowTransform, merge, moments
from fedps.errors import ConfigError

MNIST_ROWS, MNIST_BATCH = 60000, 256


@pytest.mark.parametrize("sigma,epochs,published,tolerance", [
    (1.3, 15, 1.19, 0.01), (1.1, 60, 3.01, 0.01), (0.7, 45, 7.10, 0.03)])
def test_accountant_matches_tensorflow_privacy_published_epsilons(sigma, epochs, published, tolerance):
    # TensorFlow Privacy's README (tutorials table, delta = 1e-5, N = 60000, batch 256): the
    # Poisson-subsampled Gaussian, accounted with RDP and the classic conversion.
    steps = math.ceil(epochs * MNIST_ROWS / MNIST_BATCH)
    accountant = Accountant(sigma, 1e-5, sample_rate=MNIST_BATCH / MNIST_ROWS, conversion="classic")
    assert accountant.epsilon(steps) == pytest.approx(published, abs=tolerance)
    # the tighter conversion (Balle et al. 2020, the default) never reports more
    assert Accountant(sigma, 1e-5, sample_rate=MNIST_BATCH / MNIST_ROWS).epsilon(steps) < published


def test_subsampling_at_rate_one_is_the_gaussian_mechanism():
    for alpha in (2, 5, 32):
        assert rdp_subsampled_gaussian(1.0, 1.5, alpha) == pytest.approx(rdp_gaussian(1.5, alpha))
        assert rdp_subsampled_gaussian(0.999999, 1.5, alpha) == pytest.approx(rdp_gaussian(1.5, alpha), rel=1e-4)


def test_gaussian_composition_matches_the_closed_form():
    # E compositions of the Gaussian with multiplier s: RDP E·a/(2s²); classic conversion minimised
    # over a has the closed form E/(2s²) + 2·sqrt(E·log(1/δ)/(2s²)) at a = 1 + sqrt(2s²·log(1/δ)/E)
    sigma, epochs, delta = 4.0, 10, 1e-5
    rho = epochs / (2 * sigma ** 2)
    closed = rho + 2 * math.sqrt(rho * math.log(1 / delta))
    assert Accountant(sigma, delta, conversion="classic").epsilon(epochs) == pytest.approx(closed, rel=2e-3)


def test_calibrated_noise_spends_exactly_the_budget():
    sigma = calibrate(8.0, 1e-5, 10)
    accountant = Accountant(sigma, 1e-5)
    assert accountant.epsilon(10) == pytest.approx(8.0, abs=1e-3)
    assert accountant.epsilon(11) > 8.0 and accountant.epsilon(9) < 8.0
    assert accountant.step() < accountant.step(4)          # epsilon grows with every release
    with pytest.raises(ConfigError, match="budget"):
        calibrate(0.0, 1e-5, 10)


def test_noise_added_inside_a_mask_reaches_only_the_sender():
    rng = np.random.default_rng(3)
    frac = 20
    values = rng.normal(0, 50, 7)
    layout = PackingLayout.for_bound(1024, 1 << 40)
    ints = [int(v) for v in np.rint(np.ldexp(values, frac)).astype(np.int64)]
    packed = [layout.pack(ints[i:i + layout.slots]) for i in range(0, len(ints), layout.slots)]
    masks = [int(rng.integers(1 << 62)) << 40 for _ in packed]
    masked = [p + m for p, m in zip(packed, masks)]
    noise = rng.normal(0, 3, len(values))
    noised = add_to_masked(masked, noise, layout.slots, layout.slot_bits, frac)
    unmasked = [v - m for v, m in zip(noised, masks)]
    out = [s for p in unmasked for s in layout.unpack(p)][:len(values)]
    np.testing.assert_allclose(decode_ints(out, frac), values + noise, atol=2.0 ** -frac)


def test_row_transform_standardises_with_the_partys_own_statistics_and_clips():
    rng = np.random.default_rng(0)
    x = rng.normal(5, 3, (300, 4)) * np.array([1, 10, 100, 0])      # last column constant
    stats = merge([moments(x[:100], 4), moments(x[100:], 4), None], 4)
    transform = RowTransform.from_moments(stats)
    z = transform.apply(x)
    np.testing.assert_allclose(z[:, :3].mean(axis=0), 0, atol=1e-9)
    np.testing.assert_allclose(z[:, :3].std(axis=0), 1, atol=1e-9)
    assert transform.scale[3] == 1.0
    clipped = RowTransform.from_moments(stats, clip_norm=1.5).apply(x)
    assert np.linalg.norm(clipped, axis=1).max() <= 1.5 + 1e-12
    assert RowTransform.from_json(transform.to_json()) == transform
    np.testing.assert_allclose(clip_rows(np.array([[3.0, 4.0]]), 1.0), [[0.6, 0.8]])


def test_batch_size_grows_with_rows_and_keeps_several_batches_per_epoch():
    sizes = [auto_batch_size(rows, 0.3) for rows in (200, 2_000, 30_000, 10_000_000)]
    assert sizes == sorted(sizes) and sizes[-1] == 1024
    for rows in (200, 569, 30_000):
        assert batch_count(rows, auto_batch_size(rows, 0.3), 0.3) >= 2
    assert auto_batch_size(569, 0.3, floor=80) == 80
