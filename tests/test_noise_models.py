"""Noise models against closed-form likelihoods: fit quality, finiteness, gradients, files."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

from pn2v_live.core.noise import (
    GaussianMixtureNoiseModel,
    HistogramNoiseModel,
    HybridNoiseModel,
    PoissonGaussianNoiseModel,
    coverage_warning,
    darkest_level,
    noise_model_from_state,
)
from pn2v_live.core.noise.gmm import balanced_pick
from pn2v_live.core.noise.hybrid import FLOOR_RATIO, bin_probabilities
from pn2v_live.errors import UserError
from pn2v_live.storage.noise_model_file import load_noise_model, save_noise_model

GAIN, OFFSET, READ_NOISE = 1.5, 20.0, 3.0


def poisson_gaussian_pairs(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Signals uniform in [OFFSET, OFFSET + 200] ADU, continuous Poisson–Gaussian observations."""
    rng = np.random.default_rng(seed)
    signal = rng.uniform(OFFSET, OFFSET + 200, n)
    electrons = rng.poisson((signal - OFFSET) / GAIN)
    observation = OFFSET + GAIN * electrons + rng.normal(0, READ_NOISE, n)
    return signal.astype(np.float32), observation.astype(np.float32)


def true_variance(signal: np.ndarray) -> np.ndarray:
    return GAIN * (signal - OFFSET) + READ_NOISE**2


@pytest.fixture(scope="module")
def pairs() -> tuple[np.ndarray, np.ndarray]:
    return poisson_gaussian_pairs(8_000_000)


@pytest.fixture(scope="module")
def histogram(pairs) -> HistogramNoiseModel:
    return HistogramNoiseModel.fit(*pairs, bins=256)


def true_bin_probabilities(edges: np.ndarray, signal_low: float, signal_high: float) -> np.ndarray:
    """Exact Poisson–Gaussian probability of each observation bin, averaged over signals uniform
    in [signal_low, signal_high) (one histogram row): Σ_k Poisson(k; λ) · Normal-CDF differences."""
    electrons = np.arange(400)[:, None]
    probabilities = []
    for signal in np.linspace(signal_low, signal_high, 9)[:-1] + (signal_high - signal_low) / 16:
        weights = stats.poisson.pmf(electrons, (signal - OFFSET) / GAIN)
        cdf = stats.norm.cdf(edges[None, :], loc=OFFSET + GAIN * electrons, scale=READ_NOISE)
        probabilities.append((weights * np.diff(cdf, axis=1)).sum(0))
    return np.mean(probabilities, axis=0)


def test_histogram_rows_match_true_bin_probabilities(histogram):
    """KL(true ‖ histogram) of each row against the exact Poisson–Gaussian row."""
    table = histogram.table
    edges = table.low + table.width * np.arange(table.bins + 1)
    rows = np.flatnonzero((edges[:-1] > OFFSET + 10) & (edges[1:] < OFFSET + 190))
    divergences = []
    for r in rows:
        truth = true_bin_probabilities(edges, edges[r], edges[r + 1])
        model = histogram.table.density[r].numpy() * table.width
        keep = truth > 1e-12
        divergences.append(np.sum(truth[keep] * np.log(truth[keep] / model[keep])))
    # Sampling noise alone gives about (bins with mass) / (2 · pairs per row) ≈ 0.003 here; a
    # 20 % error in the noise variance would add 0.009.
    assert np.mean(divergences) < 0.006
    assert np.max(divergences) < 0.015


def test_histogram_log_likelihood_interpolates_rows_linearly(histogram):
    """Between two row centres the density is the linear blend of the two rows."""
    table = histogram.table
    centres = table.row_centres()
    r, t = 100, 0.3
    signal = centres[r] + t * table.width
    observation = torch.tensor([centres[r + 2].item()])
    column = int((observation - table.low) / table.width)
    expected = (1 - t) * table.density[r, column] + t * table.density[r + 1, column]
    got = histogram.log_likelihood(observation, signal.reshape(1)).exp()
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)


def test_poisson_gaussian_fit_recovers_parameters(pairs):
    model = PoissonGaussianNoiseModel.fit(*pairs, offset=OFFSET)
    assert model.gain == pytest.approx(GAIN, rel=0.02)
    assert model.read_noise == pytest.approx(READ_NOISE, rel=0.02)


def test_poisson_gaussian_log_likelihood_is_the_gaussian_density():
    model = PoissonGaussianNoiseModel(GAIN, OFFSET, READ_NOISE, (OFFSET, OFFSET + 200))
    rng = np.random.default_rng(1)
    signal = rng.uniform(0, 300, (64, 8)).astype(np.float32)
    observation = rng.uniform(0, 300, (64, 1)).astype(np.float32)
    got = model.log_likelihood(torch.from_numpy(observation), torch.from_numpy(signal)).numpy()
    variance = GAIN * np.clip(signal - OFFSET, 0, None) + READ_NOISE**2
    expected = stats.norm.logpdf(observation, loc=signal, scale=np.sqrt(variance))
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


def test_darkest_level_is_unbiased_on_a_dark_background():
    rng = np.random.default_rng(2)
    scene = np.zeros((128, 128))
    scene[32:96, 32:96] = 100.0
    frames = OFFSET + rng.normal(0, READ_NOISE, (20, 128, 128)) + scene
    # 5 % darkest of 16384 pixels, each measured on 10 frames: standard error 3/√(10·819) ≈ 0.03
    assert darkest_level(frames) == pytest.approx(OFFSET, abs=0.15)


@pytest.fixture(scope="module")
def gmm() -> GaussianMixtureNoiseModel:
    return GaussianMixtureNoiseModel.fit(*poisson_gaussian_pairs(1_000_000, seed=7))


@pytest.fixture(scope="module")
def sparse_pairs() -> tuple[np.ndarray, np.ndarray]:
    """Dense pairs with signal below OFFSET + 100 plus 20 bright ones (OFFSET + 150 or more):
    the coverage of a dim calibration pattern."""
    signal, observation = poisson_gaussian_pairs(1_000_000, seed=8)
    dim = np.flatnonzero(signal < OFFSET + 100)
    bright = np.flatnonzero(signal > OFFSET + 150)[:20]
    keep = np.concatenate([dim, bright])
    return signal[keep], observation[keep]


SPARSE_TABLE_RANGE = (0.0, OFFSET + 300)


@pytest.fixture(scope="module")
def sparse_hybrid(sparse_pairs, gmm) -> HybridNoiseModel:
    """Hybrid from `sparse_pairs` over a table reaching OFFSET + 300."""
    return HybridNoiseModel.fit(*sparse_pairs, gmm, value_range=SPARSE_TABLE_RANGE)


@pytest.fixture(scope="module")
def models(pairs, histogram, gmm, sparse_hybrid):
    poisson_gaussian = PoissonGaussianNoiseModel.fit(*pairs, offset=OFFSET)
    return [histogram, poisson_gaussian, gmm, sparse_hybrid]


def test_gmm_matches_the_true_model_on_poisson_gaussian_data(pairs, gmm):
    signal, observation = (a[:200_000] for a in poisson_gaussian_pairs(200_000, seed=5))
    truth = PoissonGaussianNoiseModel(GAIN, OFFSET, READ_NOISE, (OFFSET, OFFSET + 200))
    assert gmm.nll(signal, observation) == pytest.approx(truth.nll(signal, observation), abs=0.01)


def test_gmm_captures_skewed_noise_that_poisson_gaussian_cannot():
    """Noise = 0.7·N(−3, 1) + 0.3·N(7, 1) (mean zero) at every signal: the mixture finds it."""
    rng = np.random.default_rng(3)
    n = 200_000
    signal = rng.uniform(0, 100, n).astype(np.float32)
    upper = rng.random(n) < 0.3
    noise = np.where(upper, rng.normal(7, 1, n), rng.normal(-3, 1, n)).astype(np.float32)
    observation = signal + noise
    true_nll = -np.mean(
        np.log(0.7 * stats.norm.pdf(noise, -3, 1) + 0.3 * stats.norm.pdf(noise, 7, 1))
    )
    gmm = GaussianMixtureNoiseModel.fit(signal, observation)
    poisson_gaussian = PoissonGaussianNoiseModel.fit(signal, observation)
    assert gmm.nll(signal, observation) == pytest.approx(true_nll, abs=0.02)
    assert poisson_gaussian.nll(signal, observation) > true_nll + 0.3


def test_hybrid_is_never_below_the_documented_floor_of_the_parametric_model(sparse_hybrid, gmm):
    """Dense, sparse and empty rows alike: p_hybrid ≥ FLOOR_RATIO · p_parametric (bin-averaged,
    so allow 5 % for the density varying inside one bin)."""
    rng = np.random.default_rng(4)
    signal = torch.from_numpy(rng.uniform(0, OFFSET + 299, (4000, 1)).astype(np.float32))
    observation = signal + torch.from_numpy(rng.normal(0, 25, (4000, 1)).astype(np.float32))
    log_ratio = sparse_hybrid.log_likelihood(observation, signal) - gmm.log_likelihood(
        observation, signal
    )
    assert float(log_ratio.min()) > np.log(FLOOR_RATIO) - 0.05


def test_hybrid_follows_the_histogram_in_dense_rows_and_the_parametric_model_in_empty_rows(
    sparse_pairs, sparse_hybrid, gmm
):
    table = sparse_hybrid.table
    centres = table.row_centres()
    dense_rows = (centres > OFFSET + 20) & (centres < OFFSET + 90)
    empty_rows = sparse_hybrid.support == 0
    assert dense_rows.sum() > 50 and empty_rows.sum() > 50
    histogram = HistogramNoiseModel.fit(*sparse_pairs, value_range=SPARSE_TABLE_RANGE)
    expected = histogram.table.density * table.width
    hybrid = table.density * table.width
    # Dense rows hold ~4000 pairs each: the blend with 1000 pseudo-pairs stays near the counts.
    assert torch.allclose(hybrid[dense_rows], expected[dense_rows], atol=0.01)
    parametric = bin_probabilities(gmm, table)
    torch.testing.assert_close(hybrid[empty_rows], parametric[empty_rows])


def test_hybrid_far_tails_inside_the_table_stay_finite(sparse_hybrid):
    """Pairs all inside the table (the fast path) but where the parametric probability
    underflows: the table's floor keeps the log-likelihood finite."""
    observation = torch.tensor([[310.0], [1.0]])
    signal = torch.tensor([[5.0, 20.0], [300.0, 310.0]], requires_grad=True)
    log_p = sparse_hybrid.log_likelihood(observation, signal)
    assert torch.isfinite(log_p).all()
    log_p.sum().backward()
    assert torch.isfinite(signal.grad).all()


def test_outside_the_table_the_hybrid_is_the_parametric_model(sparse_hybrid, gmm):
    observation = torch.tensor([[10.0], [400.0], [900.0], [-50.0]])
    signal = torch.tensor([[330.0, 500.0, 1e4]]).expand(4, 3)
    torch.testing.assert_close(
        sparse_hybrid.log_likelihood(observation, signal), gmm.log_likelihood(observation, signal)
    )


def test_coverage_warning_fires_on_a_bright_image_only(sparse_hybrid):
    """Calibrated up to ~OFFSET + 100 (+ a few sparse bright pairs up to OFFSET + 200)."""
    rng = np.random.default_rng(6)
    yy, xx = np.mgrid[:128, :128]
    blob = np.exp(-((yy - 64) ** 2 + (xx - 64) ** 2) / (2 * 15**2))
    in_range = OFFSET + 5 + 150 * blob
    bright = OFFSET + 5 + 400 * blob
    assert coverage_warning(sparse_hybrid, rng.poisson(in_range)) is None
    message = coverage_warning(sparse_hybrid, rng.poisson(bright))
    assert message is not None and "above the noise model's calibrated range" in message


def test_log_likelihood_finite_with_finite_gradients_everywhere(models):
    """Hot-loop shapes: observations (P, 1) against samples (P, K), far outside the range too."""
    observation = torch.tensor([[-1e4], [0.0], [25.0], [120.0], [240.0], [1e5]])
    for model in models:
        signal = torch.tensor([-1e4, -5.0, 20.0, 60.0, 150.0, 221.0, 400.0, 1e5]).repeat(6, 1)
        signal.requires_grad_(True)
        log_p = model.log_likelihood(observation, signal)
        assert log_p.shape == (6, 8) and log_p.dtype == torch.float32
        assert torch.isfinite(log_p).all(), model.kind
        log_p.sum().backward()
        assert torch.isfinite(signal.grad).all(), model.kind


def test_densities_integrate_to_one_over_observations(models):
    """Densities are per ADU: integrating over observations gives 1 for an in-range signal."""
    grid = torch.linspace(-60, 320, 38001)[:, None]
    step = float(grid[1] - grid[0])
    for model in models:
        total = model.log_likelihood(grid, torch.tensor([[120.0]])).exp().sum() * step
        assert float(total) == pytest.approx(1.0, abs=0.01), model.kind


def test_save_load_round_trip_keeps_likelihood_and_metadata(models, histogram, tmp_path):
    histogram.metadata.update(camera="test-camera", frames=50)
    observation = torch.linspace(0, 250, 101)[:, None]
    signal = torch.linspace(0, 250, 7)[None, :]
    for model in models:
        path = save_noise_model(model, tmp_path / f"{model.kind}.pt")
        loaded = load_noise_model(path)
        assert type(loaded) is type(model)
        assert loaded.metadata == model.metadata
        assert loaded.signal_range == model.signal_range
        torch.testing.assert_close(
            loaded.log_likelihood(observation, signal), model.log_likelihood(observation, signal)
        )
        rebuilt = noise_model_from_state(model.state())
        torch.testing.assert_close(
            rebuilt.log_likelihood(observation, signal), model.log_likelihood(observation, signal)
        )
    assert not list(tmp_path.glob(".*.tmp")), "temporary files left behind"


def test_corrupt_or_foreign_file_is_refused_with_a_reason(tmp_path, histogram):
    path = save_noise_model(histogram, tmp_path / "model.pt")
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(UserError, match="not a readable noise-model file"):
        load_noise_model(path)
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(3)}, foreign)
    with pytest.raises(UserError, match="not a pn2v-live noise-model file"):
        load_noise_model(foreign)
    with pytest.raises(UserError, match="no such noise-model file"):
        load_noise_model(tmp_path / "missing.pt")


def test_nll_of_the_true_model_is_the_gaussian_entropy(pairs):
    """Mean NLL of data under its own model equals E[½ log(2πeσ²)] — an independent number."""
    model = PoissonGaussianNoiseModel(GAIN, OFFSET, READ_NOISE, (OFFSET, OFFSET + 200))
    signal, observation = pairs
    expected = np.mean(0.5 * np.log(2 * math.pi * math.e * true_variance(signal)))
    assert model.nll(signal, observation) == pytest.approx(expected, abs=0.01)


def test_gmm_fit_draws_pairs_evenly_across_the_signal_range():
    # 99 % dark background, 1 % bright: a uniform draw of 640 would hold about 6 bright pairs.
    signal = torch.cat([torch.full((99_000,), 5.0), torch.linspace(100, 163, 1000)])
    pick = balanced_pick(signal, 640, 64, torch.Generator().manual_seed(0))
    assert len(pick) == len(set(pick.tolist()))  # no pair twice
    available = np.histogram(signal.numpy(), bins=64, range=(5.0, 163.0))[0]
    drawn = np.histogram(signal[pick].numpy(), bins=64, range=(5.0, 163.0))[0]
    np.testing.assert_array_equal(drawn, np.minimum(available, 640 // 64))
    assert drawn[0] == 10 and drawn[1:].sum() > 200  # vs about 6 bright in a uniform draw


def test_histogram_on_data_with_nan_and_empty_bins_fits_the_finite_pairs_without_index_errors():
    """NaN (a missing frame or pixel) once became a table index far outside the table:
    IndexError at fit or likelihood time. The finite pairs are fitted; NaN observations get the
    floor, a NaN signal NaN; data with nothing finite is refused clearly."""
    from pn2v_live.core.calibration import fit_models

    signal, observation = poisson_gaussian_pairs(40_000, seed=3)
    signal[signal > OFFSET + 120] += 60  # no signal in [140, 200) ADU: empty rows in between
    holed_signal, holed_observation = signal.copy(), observation.copy()
    holed_observation[::50] = np.nan
    holed_signal[7::50] = np.nan
    holed_observation[9::50] = np.inf
    holed = HistogramNoiseModel.fit(holed_signal, holed_observation, bins=64)
    finite = np.isfinite(holed_signal) & np.isfinite(holed_observation)
    clean = HistogramNoiseModel.fit(signal[finite], observation[finite], bins=64)
    torch.testing.assert_close(holed.table.density, clean.table.density)
    assert (clean.table.low, clean.table.high) == (holed.table.low, holed.table.high)
    assert int(holed.support.sum()) == int(finite.sum())
    empty_row = int((170.0 - holed.table.low) / holed.table.width)
    assert holed.support[empty_row] == 0
    log_p = holed.log_likelihood(
        torch.tensor([float("nan"), 170.0, 100.0, 100.0]),
        torch.tensor([100.0, 170.0, 100.0, float("nan")]),
    )
    assert log_p[0] == pytest.approx(math.log(1e-10)) and torch.isfinite(log_p[1:3]).all()
    assert log_p[2] > math.log(0.01) and torch.isnan(log_p[3])
    pairs = [torch.from_numpy(a) for a in (holed_signal, holed_observation)]
    fitted = fit_models(("poisson-gaussian",), *pairs, 64)["poisson-gaussian"]
    kept = PoissonGaussianNoiseModel.fit(signal[finite], observation[finite])
    assert fitted.gain == pytest.approx(kept.gain) and fitted.read_noise == kept.read_noise
    hybrid = HybridNoiseModel.fit(holed_signal, holed_observation, fitted, bins=64)
    assert torch.isfinite(hybrid.log_likelihood(torch.tensor(170.0), torch.tensor(170.0)))
    with pytest.raises(ValueError, match="no finite"):
        HistogramNoiseModel.fit(np.full(10, np.nan), np.ones(10))
