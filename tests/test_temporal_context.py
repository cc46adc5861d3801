"""Spatiotemporal PN2V: the blind spot with temporal context, causal windows, live and refined
twins in the inference stage, and the context carried by model files."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pn2v_live.core.context import KEEP_FUTURE, KEEP_PAST, Context, Windows, visible_channels
from pn2v_live.core.context import window as context_window
from pn2v_live.core.context_choice import train_choosing_context
from pn2v_live.core.inference import denoise
from pn2v_live.core.model import new_denoiser
from pn2v_live.core.noise import PoissonGaussianNoiseModel
from pn2v_live.core.patches import sample_patches
from pn2v_live.core.training import Training, total_steps
from pn2v_live.pipeline.inference import InferenceScheduler
from pn2v_live.storage.checkpoints import load_denoiser, save_denoiser
from pn2v_live.storage.registry import ModelRegistry
from pn2v_live.storage.store import Store

NOISE = PoissonGaussianNoiseModel(gain=2.0, offset=10.0, read_noise=3.0, signal_range=(0, 200))


def tiny(context: Context, seed: int = 0):
    torch.manual_seed(seed)
    return new_denoiser("pn2v", mean=100.0, std=50.0, k=4, depth=2, features=8, context=context)


def test_the_masked_pixel_of_frame_t_never_reaches_its_prior_samples_but_frame_t_minus_1_does():
    denoiser = tiny(Context(1, 1))
    training = Training(denoiser, NOISE)
    raw = (100 + 30 * torch.randn(2, 3, 16, 16)).requires_grad_()
    features, (b, y, x), offsets = training.masked_features(raw, torch.Generator().manual_seed(3))
    weight, bias = denoiser.head_in_adu()
    samples = features @ weight.T + bias + offsets[:, None]  # (P, K) prior samples, ADU
    assert denoiser.residual and len(b) >= 8
    for p in range(len(b)):
        (gradient,) = torch.autograd.grad(samples[p].sum(), raw, retain_graph=True)
        own = gradient[b[p], :, y[p], x[p]]  # frames t−1, t, t+1 at the masked pixel
        assert own[1] == 0  # exactly: its own value in frame t never reaches the prior
        assert own[0] != 0 and own[2] != 0  # the same place in the other frames does
    # the spatial network is blind at the masked pixel in the same way
    spatial = Training(tiny(Context(0, 0)), NOISE)
    raw1 = raw[:, 1:2].detach().clone().requires_grad_()
    features, (b, y, x), _ = spatial.masked_features(raw1, torch.Generator().manual_seed(3))
    (gradient,) = torch.autograd.grad(features.sum(), raw1)
    assert torch.all(gradient[b, 0, y, x] == 0)
    assert gradient.abs().sum() > 0


class Recording(list):
    """A frame list that records which frames were read."""

    def __init__(self, frames):
        super().__init__(frames)
        self.read = set()

    def __getitem__(self, index):
        self.read.add(index)
        return super().__getitem__(index)


def test_a_causal_window_never_reads_a_later_frame_and_its_twin_ignores_them():
    rng = np.random.default_rng(0)
    stack = rng.integers(20, 200, (6, 16, 24)).astype(np.float32)
    frames = Recording(stack)
    context = Context(2, 2)
    causal = context_window(frames, 3, context, context.causal)
    assert frames.read == {1, 2, 3}
    assert np.isnan(causal[3:]).all() and np.array_equal(causal[:3], stack[1:4])
    # at the start the earlier frames are missing, never replaced by frame t or a later one
    first = context_window(frames, 0, context, context.causal)
    assert np.isnan(first[:2]).all() and np.array_equal(first[2], stack[0])
    assert np.isnan(first[3:]).all()
    # the denoised live twin is exactly the same whatever the later frames hold
    denoiser = tiny(context)
    changed = list(stack.copy())
    changed[4] += 50
    changed[5] = rng.integers(20, 200, (16, 24)).astype(np.float32)
    live = denoise(denoiser, causal, NOISE)["denoised"]
    assert np.array_equal(
        live,
        denoise(denoiser, context_window(changed, 3, context, context.causal), NOISE)["denoised"],
    )
    refined = denoise(denoiser, context_window(stack, 3, context), NOISE)["denoised"]
    refined_changed = denoise(denoiser, context_window(changed, 3, context), NOISE)["denoised"]
    assert not np.array_equal(refined, refined_changed)


def test_training_hides_parts_of_the_window_at_the_documented_rates():
    context = Context(2, 2)
    seen = visible_channels(20000, context, torch.Generator().manual_seed(0))
    assert seen.shape == (20000, 5) and torch.all(seen[:, 2] == 1)  # frame t always seen
    # a side is whole with probability KEEP, else cut to 0 or 1 frames with equal odds
    assert seen[:, 0].mean().item() == pytest.approx(KEEP_PAST, abs=0.015)
    assert seen[:, 1].mean().item() == pytest.approx(KEEP_PAST + (1 - KEEP_PAST) / 2, abs=0.015)
    assert seen[:, 4].mean().item() == pytest.approx(KEEP_FUTURE, abs=0.015)
    assert seen[:, 3].mean().item() == pytest.approx(KEEP_FUTURE + (1 - KEEP_FUTURE) / 2, abs=0.015)
    # seen frames are contiguous around t: a seen frame's neighbour towards t is seen too
    assert torch.all(seen[:, 0] <= seen[:, 1]) and torch.all(seen[:, 4] <= seen[:, 3])


def test_windows_stay_inside_their_series_and_carry_the_ground_truth_last():
    a = np.stack([np.full((8, 8), v, np.float32) for v in (1, 2, 3)])
    b = np.stack([np.full((8, 8), v, np.float32) for v in (10, 20)])
    windows = Windows([a, b], Context(1, 1), truths=[[a[0]] * 3, [b[1]] * 2])
    assert len(windows) == 5
    first_of_b = windows[3]  # frame 0 of b: nothing before it, a's last frame is not its past
    assert first_of_b.shape == (4, 8, 8)
    assert np.isnan(first_of_b[0]).all()
    assert (
        (first_of_b[1] == 10).all() and (first_of_b[2] == 20).all() and (first_of_b[3] == 20).all()
    )
    patches = sample_patches(windows.subset([1]), 3, 8, np.random.default_rng(0))
    assert torch.equal(patches[:, :3].mean(dim=(2, 3)), torch.tensor([[1.0, 2.0, 3.0]] * 3))


def test_model_files_keep_the_context_and_older_files_read_as_single_frame(tmp_path):
    denoiser = tiny(Context(2, 1))
    save_denoiser(denoiser, tmp_path / "m.pt")
    loaded, _ = load_denoiser(tmp_path / "m.pt")
    assert loaded.context == Context(2, 1) and loaded.net.in_channels == 4 and loaded.residual
    state = torch.load(tmp_path / "m.pt", weights_only=True)
    del state["residual"]  # as written before residual windows: the network alone
    torch.save(state, tmp_path / "m.pt")
    assert not load_denoiser(tmp_path / "m.pt")[0].residual
    spatial = tiny(Context(0, 0))
    save_denoiser(spatial, tmp_path / "old.pt")
    state = torch.load(tmp_path / "old.pt", weights_only=True)
    del state["context"]  # as written before temporal context existed
    torch.save(state, tmp_path / "old.pt")
    assert load_denoiser(tmp_path / "old.pt")[0].context == Context(0, 0)


def test_live_twins_see_no_later_frame_and_are_refined_once_those_are_stored(tmp_path):
    store = Store(tmp_path / "store")
    registry = ModelRegistry(tmp_path / "store" / "models")
    acquisition = store.create("cells", (16, 24), "uint16")
    rng = np.random.default_rng(1)
    frames = rng.integers(20, 200, size=(6, 16, 24)).astype(np.uint16)
    for t in range(5):
        acquisition.write_raw(t, frames[t])
    denoiser = tiny(Context(1, 1))
    registry.promote(
        denoiser, validation_loss=1.0, training_frames=1, training_steps=1, noise_model_id=None
    )
    stage = InferenceScheduler(store, registry, NOISE, torch.device("cpu"), max_in_flight=8)
    stored = {t: frames[t] for t in range(5)}

    def expected(t, visible):
        return denoise(denoiser, context_window(stored, t, denoiser.context, visible), NOISE)

    def run_until_idle():
        while stage.work():
            pass

    run_until_idle()
    windows = [str(acquisition.denoised_window(t)) for t in range(5)]
    assert windows == ["1:1", "1:1", "1:1", "1:1", "1:0"]  # frame 4's next frame is not stored
    np.testing.assert_array_equal(
        acquisition.read_denoised(4), expected(4, Context(1, 0))["denoised"]
    )
    np.testing.assert_array_equal(
        acquisition.read_denoised(2), expected(2, Context(1, 1))["denoised"]
    )
    acquisition.write_raw(5, frames[5])
    stored[5] = frames[5]
    assert stage.work() and str(acquisition.denoised_window(5)) == "1:0"  # the new frame first
    assert str(acquisition.denoised_window(4)) == "1:0"
    run_until_idle()  # then the back-fill refines frame 4
    assert str(acquisition.denoised_window(4)) == "1:1"
    np.testing.assert_array_equal(
        acquisition.read_denoised(4), expected(4, Context(1, 1))["denoised"]
    )
    assert str(acquisition.denoised_window(5)) == "1:0"  # nothing after it yet
    acquisition.close()
    run_until_idle()  # closed: no later frame will come, the last frame is refined as it is
    assert str(acquisition.denoised_window(5)) == "1:1"
    store.close()
    reopened = Store(tmp_path / "store").acquisition("cells")  # the windows are in the ledger
    assert [str(reopened.denoised_window(t)) for t in range(6)] == ["1:1"] * 6


def test_a_residual_window_adds_the_mean_of_its_other_present_frames_to_every_sample():
    denoiser = tiny(Context(1, 1))  # temporal windows are residual; data mean 100 ADU
    nan = float("nan")
    window = torch.tensor([[[[110.0, nan], [130, 140]], [[500] * 2] * 2, [[150, 160], [nan, 180]]]])
    # frame t (500) never counts; a missing frame (NaN) or one hidden from the patch neither
    np.testing.assert_allclose(denoiser.prior_offset(window)[0], [[30, 60], [30, 60]])
    seen = torch.tensor([[1.0, 1.0, 0.0]])
    np.testing.assert_allclose(denoiser.prior_offset(window, seen)[0], [[10, 0], [30, 40]])
    with torch.no_grad():
        features = denoiser.net.body(denoiser.normalise(window))
        weight, bias = denoiser.head_in_adu()
        samples = torch.einsum("kf,fhw->khw", weight, features[0]) + bias[:, None, None]
    wider = tiny(Context(1, 1))
    wider.residual = False  # the same network, not residual
    prior = denoise(denoiser, window[0], NOISE, outputs=("prior_mean",))["prior_mean"]
    plain = denoise(wider, window[0], NOISE, outputs=("prior_mean",))["prior_mean"]
    np.testing.assert_allclose(plain, samples.mean(0), rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(prior - plain, [[30, 60], [30, 60]], rtol=1e-4, atol=1e-3)
    assert not tiny(Context(0, 0)).residual  # a single frame has no other frames


def test_the_single_frame_candidate_gets_a_head_start_and_temporal_ones_start_fresh():
    made, logged = [], []

    def make(context: Context):
        made.append(context)
        return tiny(context)

    stack = np.random.default_rng(0).poisson(50, (8, 32, 32)).astype(np.float32)
    candidates = [Context(0, 0), Context(1, 1), Context(2, 1)]
    best, losses = train_choosing_context(
        make, [stack], candidates, NOISE, steps=24, log=logged.append, batch_size=2, patch_size=16
    )
    assert made == candidates  # the single frame first, then each temporal window fresh
    assert set(losses) == {"0:0", "1:1", "2:1"} and len(logged) == 3
    assert str(best.context) == min(losses, key=losses.get)
    # judged after the prior's spread fit, as each candidate would denoise
    fitted = [record.get("fitted_validation_loss") for record in best.history]
    assert losses[str(best.context)] in fitted
    # the winner's pilot (2) and the rest (24 - 6 - 3 · 2), after the single frame's start (6)
    head_start = 6 if best.context == Context(0, 0) else 0
    assert total_steps(best.history) == head_start + 2 + 12
