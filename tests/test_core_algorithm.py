"""The algorithm core against closed forms and independent computations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pn2v_live.core.context import Context
from pn2v_live.core.inference import denoise, posterior_summaries
from pn2v_live.core.losses import pn2v_loss
from pn2v_live.core.masking import n2v_mask
from pn2v_live.core.metrics import psnr, psnr_star
from pn2v_live.core.model import new_denoiser
from pn2v_live.core.noise import (
    GaussianMixtureNoiseModel,
    HybridNoiseModel,
    PoissonGaussianNoiseModel,
)
from pn2v_live.core.synthetic import Camera, acquisition
from pn2v_live.core.training import (
    Training,
    best_spread,
    budget_used,
    default_batch_size,
    train,
    training_memory_format,
)
from pn2v_live.service.bench.naive import naive_mmse, naive_pn2v_loss


def gaussian(sigma: float) -> PoissonGaussianNoiseModel:
    """A signal-independent Gaussian p(x|s) = N(x; s, sigma²) (Poisson–Gaussian with gain 0)."""
    return PoissonGaussianNoiseModel(gain=0.0, offset=0.0, read_noise=sigma, signal_range=(0, 1e3))


def camera_model() -> PoissonGaussianNoiseModel:
    return PoissonGaussianNoiseModel(gain=2.0, offset=100.0, read_noise=3.0, signal_range=(0, 1e3))


def test_eq7_loss_equals_direct_numpy_evaluation():
    rng = np.random.default_rng(1)
    samples = rng.uniform(100, 400, size=(50, 64)).astype(np.float32)
    observations = rng.uniform(100, 400, size=50).astype(np.float32)
    gain, offset, read = 2.0, 100.0, 3.0
    variance = gain * np.clip(samples - offset, 0, None) + read**2
    density = np.exp(-0.5 * (observations[:, None] - samples) ** 2 / variance) / np.sqrt(
        2 * np.pi * variance
    )
    expected = -np.mean(np.log(density.astype(np.float64).mean(axis=1)))
    loss = pn2v_loss(torch.from_numpy(samples), torch.from_numpy(observations), camera_model())
    assert float(loss) == pytest.approx(expected, rel=1e-5)


def test_loss_gradient_matches_finite_differences():
    rng = np.random.default_rng(2)
    samples = torch.tensor(rng.uniform(150, 250, size=(6, 5)), dtype=torch.float32)
    observations = torch.tensor(rng.uniform(150, 250, size=6), dtype=torch.float32)
    model = camera_model()
    samples.requires_grad_(True)
    pn2v_loss(samples, observations, model).backward()
    eps = 1e-2
    for index in [(0, 0), (3, 2), (5, 4)]:
        plus, minus = samples.detach().clone(), samples.detach().clone()
        plus[index] += eps
        minus[index] -= eps
        numeric = (
            pn2v_loss(plus.double(), observations.double(), model)
            - pn2v_loss(minus.double(), observations.double(), model)
        ) / (2 * eps)
        assert float(samples.grad[index]) == pytest.approx(float(numeric), rel=2e-2, abs=1e-6)


def test_mmse_equals_closed_form_gaussian_posterior_mean():
    prior_mean, prior_sigma, noise_sigma = 200.0, 20.0, 15.0
    generator = torch.Generator().manual_seed(3)
    pixels, k = 64, 20000
    samples = prior_mean + prior_sigma * torch.randn(pixels, k, generator=generator)
    observations = torch.linspace(150, 260, pixels)
    summary = posterior_summaries(
        samples, observations, gaussian(noise_sigma), ("denoised", "prior_mean", "posterior_std")
    )
    weight = prior_sigma**2 / (prior_sigma**2 + noise_sigma**2)
    expected = prior_mean + weight * (observations - prior_mean)
    expected_std = math.sqrt(prior_sigma**2 * noise_sigma**2 / (prior_sigma**2 + noise_sigma**2))
    # Monte-Carlo error of a self-normalised importance estimate with K = 20000 samples.
    assert torch.allclose(summary["denoised"], expected, atol=0.6)
    assert torch.allclose(summary["prior_mean"], torch.full((pixels,), prior_mean), atol=0.6)
    assert summary["posterior_std"].mean().item() == pytest.approx(expected_std, rel=0.03)


def test_masking_replaces_with_a_true_neighbour_at_target_density():
    height = width = 96
    batch = 4
    patches = torch.arange(batch * height * width, dtype=torch.float32).view(
        batch, 1, height, width
    )
    masked, (b, y, x) = n2v_mask(patches, generator=torch.Generator().manual_seed(4))
    assert b.numel() / (batch * height * width) == pytest.approx(1 / 32, rel=0.05)
    replaced = masked[b, 0, y, x].long()
    source_y = (replaced % (height * width)) // width
    source_x = replaced % width
    assert torch.all(replaced != patches[b, 0, y, x].long())  # never its own value
    assert torch.all((source_y - y).abs() <= 2) and torch.all((source_x - x).abs() <= 2)
    assert torch.all(replaced // (height * width) == b)  # from the same patch
    untouched = torch.ones_like(patches, dtype=torch.bool)
    untouched[b, 0, y, x] = False
    assert torch.equal(masked[untouched], patches[untouched])


def test_tiled_denoising_matches_whole_frame():
    torch.manual_seed(5)
    denoiser = new_denoiser("pn2v", mean=200, std=40, k=32, features=8)
    image = np.random.default_rng(5).normal(200, 40, size=(100, 90)).astype(np.float32)
    outputs = ("denoised", "prior_mean", "posterior_std")
    # float32: with the body in bfloat16, tiles may round a feature differently (see below)
    whole = denoise(denoiser, image, camera_model(), tile=200, outputs=outputs, bf16=False)
    tiled = denoise(
        denoiser, image, camera_model(), tile=32, outputs=outputs, chunk_elements=500, bf16=False
    )
    for name in outputs:
        assert whole[name].shape == image.shape
        np.testing.assert_allclose(tiled[name], whole[name], rtol=1e-4, atol=1e-4 * 200)


def test_fused_mmse_equals_naive_formulation():
    torch.manual_seed(6)
    denoiser = new_denoiser("pn2v", mean=200, std=40, k=64, features=8)
    image = np.random.default_rng(6).normal(200, 40, size=(64, 64)).astype(np.float32)
    fused = denoise(denoiser, image, camera_model(), tile=32, chunk_elements=4096, bf16=False)
    naive = naive_mmse(denoiser, image, camera_model())
    np.testing.assert_allclose(fused["denoised"], naive, rtol=1e-5)


def test_bfloat16_body_moves_the_estimate_by_rounding_only():
    """The body in bfloat16 (the default where the hardware has it) rounds features to 8 bits
    of mantissa; the MMSE estimate then moves by a small fraction of the noise, nowhere more."""
    torch.manual_seed(6)
    denoiser = new_denoiser("pn2v", mean=200, std=40, k=64, features=8)
    image = np.random.default_rng(6).normal(200, 40, size=(64, 64)).astype(np.float32)
    exact = denoise(denoiser, image, camera_model(), bf16=False)["denoised"]
    rounded = denoise(denoiser, image, camera_model(), bf16=True)["denoised"]
    assert not np.array_equal(exact, rounded)  # bfloat16 really ran
    difference = rounded - exact
    assert np.sqrt(np.mean(difference**2)) < 0.01 * 40 and np.abs(difference).max() < 0.1 * 40


def test_masked_pixel_loss_equals_full_head_loss():
    torch.manual_seed(7)
    denoiser = new_denoiser("pn2v", mean=200, std=40, k=64, features=8)
    batch = 200 + 40 * torch.randn(3, 1, 32, 32)
    training = Training(denoiser, camera_model(), bf16=False)
    fused = training.loss(batch, torch.Generator().manual_seed(8))
    naive = naive_pn2v_loss(
        denoiser, batch, camera_model(), 1 / 32, torch.Generator().manual_seed(8)
    )
    assert fused.item() == pytest.approx(naive.item(), rel=1e-5)


def test_training_loss_adds_the_prior_mean_s_noise2void_loss():
    torch.manual_seed(7)
    denoiser = new_denoiser("pn2v", mean=200, std=40, k=64, features=8)
    batch = 200 + 40 * torch.randn(3, 1, 32, 32)
    training = Training(denoiser, camera_model(), bf16=False, mean_weight=0.5)
    with torch.no_grad():
        plain = training.loss(batch, torch.Generator().manual_seed(8))
        both = training.loss(batch, torch.Generator().manual_seed(8), training=True)
        # the same mask, computed independently: the K head outputs' mean at the masked pixels
        features, (b, y, x), _ = training.masked_features(batch, torch.Generator().manual_seed(8))
        head = denoiser.net.head
        samples = (features @ head.weight.flatten(1).T + head.bias) * 40 + 200
        error = ((samples.mean(dim=1) - batch[b, 0, y, x]) / 40).square().mean()
    assert both.item() == pytest.approx(plain.item() + 0.5 * error.item(), rel=1e-5)


def test_best_spread_is_the_maximum_likelihood_width_of_a_gaussian_prior():
    # closed form: signal s ~ N(m, 3²), noise N(0, 2²); prior samples m + 12·z (z quantiles of
    # N(0, 1)). The marginal N(m, (12τ)² + 2²) fits x ~ N(m, 3² + 2²) best at 12τ = 3.
    generator = torch.Generator().manual_seed(3)
    m = 100 + 50 * torch.rand(5000, generator=generator)
    x = m + 3 * torch.randn(5000, generator=generator) + 2 * torch.randn(5000, generator=generator)
    z = torch.special.ndtri((torch.arange(100) + 0.5) / 100)
    samples = m[:, None] + 12 * z[None, :]
    scale = best_spread(samples, x, gaussian(2.0), scales=np.geomspace(0.05, 2, 81))
    assert scale == pytest.approx(0.25, abs=0.01)
    # the coarse-to-fine search lands where trying every factor does
    assert scale == best_spread(samples, x, gaussian(2.0), np.geomspace(0.05, 2, 81), stride=1)
    # already right: kept as it is
    assert best_spread(m[:, None] + 3 * z[None, :], x, gaussian(2.0)) == pytest.approx(1, abs=0.1)


def test_best_spread_evaluates_the_likelihood_a_chunk_of_pixels_at_a_time():
    # The round's held-back pixels at K = 800 make (P, K) temporaries of hundreds of MB: the
    # search sums the loss over `chunk` rows at a time and lands where one chunk of all does.
    generator = torch.Generator().manual_seed(4)
    m = 100 + 50 * torch.rand(1000, generator=generator)
    x = m + 3 * torch.randn(1000, generator=generator)
    samples = m[:, None] + 10 * torch.randn(1000, 64, generator=generator)
    widths = []

    class Recording(PoissonGaussianNoiseModel):
        def log_likelihood(self, observation, signal):
            widths.append(len(signal))
            return super().log_likelihood(observation, signal)

    noise = Recording(gain=0.0, offset=0.0, read_noise=3.0, signal_range=(0, 1e3))
    chunked = best_spread(samples, x, noise, chunk=96)
    assert max(widths) == 96 and min(widths) == 1000 % 96
    assert chunked == best_spread(samples, x, noise, chunk=len(samples))


def test_fitting_the_spread_scales_every_sample_about_the_prior_mean():
    torch.manual_seed(7)
    denoiser = new_denoiser("pn2v", mean=200, std=40, k=64, features=8)
    batch = 200 + 40 * torch.randn(4, 1, 32, 32)
    training = Training(denoiser, camera_model(), bf16=False)
    with torch.no_grad():
        features = denoiser.net.body(denoiser.normalise(batch)).permute(0, 2, 3, 1)
        before = features @ denoiser.head_in_adu()[0].T + denoiser.head_in_adu()[1]
        scale = training.fit_prior_spread(batch)
        after = features @ denoiser.head_in_adu()[0].T + denoiser.head_in_adu()[1]
    mean = before.mean(dim=-1, keepdim=True)
    torch.testing.assert_close(after, mean + scale * (before - mean), rtol=1e-4, atol=1e-3)
    assert scale != 1  # an untrained network's spread is not already the best one


def test_psnr_closed_form_and_affine_invariance():
    truth = np.random.default_rng(9).uniform(0, 255, size=(32, 32))
    noisy = truth + 5.0
    assert psnr(noisy, truth, 255) == pytest.approx(10 * np.log10(255**2 / 25))
    assert psnr_star(2 * truth + 7, truth, 255) > 100  # an affine copy is perfect under PSNR*
    assert psnr_star(noisy, truth, 255) >= psnr(noisy, truth, 255)


def dim_hybrid_model() -> HybridNoiseModel:
    """The default model kind, calibrated on 120–260 ADU: many prior samples fall outside."""
    frames, clean = acquisition(Camera(2.0, 100.0, 3.0), 8, (32, 32), background=120, peak=260)
    parametric = GaussianMixtureNoiseModel.fit(clean, frames, steps=20)
    return HybridNoiseModel.fit(clean, frames, parametric, bins=32)


@pytest.mark.parametrize("noise_model", [camera_model, dim_hybrid_model])
def test_compiled_mmse_equals_eager(noise_model):
    torch.manual_seed(10)
    denoiser = new_denoiser("pn2v", mean=200, std=40, k=16, features=4)
    image = np.random.default_rng(10).normal(200, 40, size=(24, 20)).astype(np.float32)
    outputs = ("denoised", "posterior_std")
    model = noise_model()
    eager = denoise(denoiser, image, model, outputs=outputs, chunk_elements=1600)
    fused = denoise(denoiser, image, model, outputs=outputs, chunk_elements=1600, compiled=True)
    for name in outputs:
        np.testing.assert_allclose(fused[name], eager[name], rtol=1e-4, atol=1e-3)


def test_compiled_mmse_compiles_once_whatever_leaves_the_table():
    """Each frame has a different count of samples outside the hybrid's table; the compiled MMSE
    must stay one graph (no break) and not recompile for each count (it would hit torch's
    recompile limit in the daemon and fall back to the slow path)."""
    from torch._dynamo.utils import counters

    counters.clear()
    torch.manual_seed(11)
    denoiser = new_denoiser("pn2v", mean=200, std=40, k=16, features=4)
    model = dim_hybrid_model()
    rng = np.random.default_rng(11)
    images = [rng.normal(200, 60, size=(24, 20)).astype(np.float32) for _ in range(10)]
    denoise(denoiser, images[0], model, chunk_elements=1600, compiled=True)
    compiled_before = counters["frames"]["total"]
    for image in images[1:]:
        fused = denoise(denoiser, image, model, chunk_elements=1600, compiled=True)
        eager = denoise(denoiser, image, model, chunk_elements=1600)
        np.testing.assert_allclose(fused["denoised"], eager["denoised"], rtol=1e-4, atol=1e-3)
    assert counters["frames"]["total"] - compiled_before <= 2
    assert not counters["graph_break"], list(counters["graph_break"])


def test_compiled_mmse_compiles_each_noise_model_once_for_plain_and_residual_models():
    """The daemon swaps noise models as it refines them, and serves spatial and residual
    temporal models: each noise model gets one kernel, shared by both kinds of model, and
    compiling goes on past torch's recompile limit (8), which would fall back to the slow path."""
    from torch._dynamo.utils import counters

    torch.manual_seed(12)
    plain = new_denoiser("pn2v", mean=200, std=40, k=16, features=4)
    residual = new_denoiser("pn2v", mean=200, std=40, k=16, features=4, context=Context(1, 1))
    window = np.random.default_rng(12).normal(200, 40, size=(3, 24, 20)).astype(np.float32)
    for gain in range(1, 11):
        model = PoissonGaussianNoiseModel(gain, 100.0, 3.0, (0.0, 400.0))
        graphs = counters["stats"]["unique_graphs"]
        fused = denoise(plain, window[1], model, chunk_elements=1600, compiled=True)
        eager = denoise(plain, window[1], model, chunk_elements=1600)
        np.testing.assert_allclose(fused["denoised"], eager["denoised"], rtol=1e-4, atol=1e-3)
        fused = denoise(residual, window, model, chunk_elements=1600, compiled=True)
        eager = denoise(residual, window, model, chunk_elements=1600)
        np.testing.assert_allclose(fused["denoised"], eager["denoised"], rtol=1e-4, atol=1e-3)
        assert counters["stats"]["unique_graphs"] == graphs + 1, f"gain {gain}"


def test_learning_rate_follows_a_cosine_over_the_step_budget():
    frames, _ = acquisition(Camera(2.0, 100.0, 3.0), 4, (32, 32), seed=6)
    torch.manual_seed(0)
    denoiser = new_denoiser("n2v", float(frames.mean()), float(frames.std()), depth=2, features=8)
    history = train(denoiser, list(frames), steps=8, batch_size=2, patch_size=16, lr=1e-3,
                    validate_every=1)  # fmt: skip
    # the rate used for step s (1-based) is lr · ½(1 + cos(π (s − 1) / steps))
    expected = [1e-3 * 0.5 * (1 + math.cos(math.pi * s / 8)) for s in range(8)]
    assert [r["step"] for r in history] == list(range(1, 9))
    np.testing.assert_allclose([r["lr"] for r in history], expected, rtol=1e-12)
    assert {r["batch_size"] for r in history} == {2}


def test_training_on_a_cpu_takes_4_patches_per_step_unless_told():
    frames, _ = acquisition(Camera(2.0, 100.0, 3.0), 4, (32, 32), seed=6)
    denoiser = new_denoiser("n2v", float(frames.mean()), float(frames.std()), depth=2, features=8)
    history = train(denoiser, list(frames), steps=2, patch_size=16, validate_every=1)
    assert [r["batch_size"] for r in history] == [4, 4]
    assert default_batch_size(torch.device("cuda")) == 16


def test_float32_cpu_training_runs_channels_first_and_hands_back_channels_last():
    """The layout changes the speed only: the same steps in both layouts give the same losses
    and weights, and `train` returns the network in the inference layout (channels-last)."""
    batches = [200 + 40 * torch.randn(2, 1, 32, 32, generator=torch.Generator().manual_seed(i))
               for i in range(3)]  # fmt: skip
    trained = {}
    for layout in (torch.contiguous_format, torch.channels_last):
        torch.manual_seed(9)
        denoiser = new_denoiser("pn2v", mean=200, std=40, k=16, features=8)
        training = Training(denoiser, camera_model(), bf16=False)
        conv = denoiser.net.down[0][2].weight
        assert conv.is_contiguous() and not conv.is_contiguous(memory_format=torch.channels_last)
        denoiser.net.use_memory_format(layout)
        assert conv.is_contiguous(memory_format=layout)
        losses = [training.step(batch) for batch in batches]
        trained[layout] = losses, [p.detach().clone() for p in denoiser.net.parameters()]
    (first_losses, first), (last_losses, last) = trained.values()
    np.testing.assert_allclose(first_losses, last_losses, rtol=1e-5)
    # Adam divides each gradient by its running size, so rounding differences between the two
    # layouts' kernels reach the weights of near-zero gradients as a fraction of a step (4e-4)
    for a, b in zip(first, last, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert training_memory_format(torch.device("cpu"), True) == torch.channels_last
    assert training_memory_format(torch.device("cuda"), False) == torch.channels_last

    frames, _ = acquisition(Camera(2.0, 100.0, 3.0), 4, (32, 32), seed=6)
    denoiser = new_denoiser("n2v", float(frames.mean()), float(frames.std()), depth=2, features=8)
    train(denoiser, list(frames), steps=1, patch_size=16, bf16=False)
    assert denoiser.net.memory_format == torch.channels_last
    weight = denoiser.net.down[0][2].weight
    assert weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous()


def test_budget_used_is_the_larger_of_steps_and_wall_time():
    assert budget_used(50, 100, 0.0, None) == 0.5
    assert budget_used(0, None, 90.0, 3.0) == 0.5  # 90 s of 3 minutes
    assert budget_used(10, 100, 120.0, 4.0) == 0.5  # time runs out first
    assert budget_used(100, 100, 1.0, 60.0) == 1.0
