"""Refining the noise model from the stream when its signal goes above the calibrated range.

A Poisson–Gaussian camera with known gain, offset and read noise; a histogram noise model
calibrated on dim signal only (100–220 ADU, as `pn2v-live calibrate --kind histogram` would make
it: it clamps above its range); frames whose signal reaches 900 ADU.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch
from prometheus_client import REGISTRY
from scipy import ndimage
from test_trainer_stage import SETTINGS

from pn2v_live.core.context import window
from pn2v_live.core.model import new_denoiser
from pn2v_live.core.noise import (
    HistogramNoiseModel,
    PoissonGaussianNoiseModel,
    RefinedNoiseModel,
    as_pairs,
)
from pn2v_live.core.noise.refinement import (
    RefinementRefused,
    noise_variance,
    other_frames_mean,
    refine_noise_model,
)
from pn2v_live.core.registration import Registration
from pn2v_live.core.synthetic import Camera
from pn2v_live.pipeline import inference
from pn2v_live.pipeline.noise_refinement import WINDOW, NoiseRefiner, RefinementSettings
from pn2v_live.pipeline.trainer import Trainer
from pn2v_live.service.bench.quality import calibrated_models, load_field
from pn2v_live.service.config import load_config
from pn2v_live.service.daemon import Daemon
from pn2v_live.service.notify import SystemdNotifier
from pn2v_live.storage.checkpoints import save_denoiser
from pn2v_live.storage.noise_model_file import load_noise_model, save_noise_model
from pn2v_live.storage.noise_model_versions import NoiseModelVersions
from pn2v_live.storage.registry import ModelRegistry, content_id
from pn2v_live.storage.store import Store

CAMERA = Camera(gain=2.0, offset=100.0, read_noise=3.0)
TRUE = PoissonGaussianNoiseModel(CAMERA.gain, CAMERA.offset, CAMERA.read_noise, (100, 900))
DIM, BRIGHT = (100.0, 220.0), (100.0, 900.0)
SHAPE = (64, 96)


def ramp(low: float, high: float, shape=SHAPE) -> np.ndarray:
    """A clean image whose signal runs evenly (every value a different one) from low to high."""
    return np.linspace(low, high, shape[0] * shape[1], dtype=np.float32).reshape(shape)


def exposures(clean: np.ndarray, frames: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.stack([CAMERA.expose(clean, rng) for _ in range(frames)])


def estimate(clean: np.ndarray, frames: np.ndarray, error: float, seed: int) -> np.ndarray:
    """Signal estimates like a denoiser's: the clean signal off by `error` noise std devs."""
    sigma = TRUE.variance(torch.from_numpy(clean)).sqrt().numpy()
    noise = np.random.default_rng(seed).standard_normal(frames.shape).astype(np.float32)
    return clean + error * sigma * noise


@pytest.fixture(scope="module")
def calibrated() -> HistogramNoiseModel:
    """The dim calibration: a static scene's known signal against 16 noisy frames."""
    clean = ramp(*DIM)
    model = HistogramNoiseModel.fit(clean, exposures(clean, 16, seed=1))
    model.metadata.update(offset=CAMERA.offset, camera="test")
    return model


@pytest.fixture(scope="module")
def bright_pairs():
    """(estimates, raw frames) of 8 frames up to 900 ADU; the estimates are off by 0.2 σ."""
    clean = ramp(*BRIGHT)
    frames = exposures(clean, 8, seed=2)
    return estimate(clean, frames, 0.2, seed=3), frames


@pytest.fixture(scope="module")
def refined(calibrated, bright_pairs) -> RefinedNoiseModel:
    signal, frames = bright_pairs
    return refine_noise_model(calibrated, signal, frames, refinement={"parent": "p", "root": "r"})


def test_refined_model_covers_the_bright_signal_like_the_camera(calibrated, refined, tmp_path):
    version = NoiseModelVersions(tmp_path / "noise-models").save(refined)
    assert content_id(version.path) == version.id
    model = load_noise_model(version.path)  # what a restart reads back
    assert model.kind == "refined" and model.signal_range[1] >= 880
    record = model.metadata["refinement"]
    assert (record["parent"], record["root"]) == ("p", "r")
    assert record["previous_signal_range"] == [100.0, 220.0]
    assert record["pairs_above"] > 10_000 and record["pairs"] > record["pairs_above"]
    held_out = record["held_out_nll_above"]  # pairs kept back from the fit, above 220 ADU
    assert held_out["after"] < held_out["before"] - 5
    assert model.metadata["camera"] == "test"  # the calibration's metadata carries over

    for signal in (300.0, 500.0, 800.0):
        true_variance = float(TRUE.variance(torch.tensor(signal)))
        assert noise_variance(model, signal) == pytest.approx(true_variance, rel=0.2)
        assert noise_variance(calibrated, signal) > 5 * true_variance  # clamped: far off
    # Fresh camera observations at bright signal: as likely under the refined model as under the
    # camera's own noise law (and far more than under the calibration alone).
    rng = np.random.default_rng(4)
    clean = np.full(20_000, 700.0, np.float32)
    observed = CAMERA.expose(clean, rng)
    assert model.nll(clean, observed) == pytest.approx(TRUE.nll(clean, observed), abs=0.03)
    assert calibrated.nll(clean, observed) > TRUE.nll(clean, observed) + 5


def test_refined_model_is_the_calibration_below_the_join_and_smooth_across_it(calibrated, refined):
    low, high = refined.join
    assert DIM[0] < low < high == DIM[1]
    x = torch.arange(60.0, 300.0)
    below = torch.full_like(x, low - 5)
    assert torch.equal(refined.log_likelihood(x, below), calibrated.log_likelihood(x, below))
    # The variance moves smoothly from the calibration's to the stream fit's across the join.
    levels = np.linspace(low - 10, high + 10, 9)
    variances = np.array([noise_variance(refined, float(s)) for s in levels])
    steps = np.diff(variances)
    assert np.all(np.abs(steps) < 0.15 * variances[1:])
    # Finite and differentiable in the signal everywhere, also where the parts blend.
    signal = torch.linspace(90.0, 1000.0, 500, requires_grad=True)
    log_p = refined.log_likelihood(torch.linspace(80.0, 1050.0, 500), signal)
    log_p.sum().backward()
    assert torch.isfinite(log_p).all() and torch.isfinite(signal.grad).all()


def test_refusals_say_why(calibrated, bright_pairs):
    signal, frames = bright_pairs
    with pytest.raises(RefinementRefused, match="needed"):
        refine_noise_model(calibrated, signal, frames, min_pairs=10**7)
    # Twins that still hold the noise (a model not trained yet) would make a far too narrow model.
    with pytest.raises(RefinementRefused, match="calibrated noise variance"):
        refine_noise_model(calibrated, frames.astype(np.float32), frames)
    # No pairs where the stream and the calibration meet: nothing to join the two with.
    bright_only = signal > 300
    with pytest.raises(RefinementRefused, match="overlap"):
        refine_noise_model(calibrated, signal[bright_only], frames[bright_only])
    # A calibration that extrapolates the camera's law already: nothing to gain, nothing changes.
    extrapolating = PoissonGaussianNoiseModel(CAMERA.gain, CAMERA.offset, CAMERA.read_noise, DIM)
    with pytest.raises(RefinementRefused, match="already explains"):
        refine_noise_model(extrapolating, signal, frames)


def fake_refinement(parent: PoissonGaussianNoiseModel, root: str, generation: int, top: float):
    stream = PoissonGaussianNoiseModel(2.0, 100.0, 3.0, (200.0, top))
    metadata = {"refinement": {"root": root, "generation": generation, "parent": "x"}}
    return RefinedNoiseModel(parent, stream, (180.0, 220.0), (100.0, top), metadata)


def test_newest_version_of_the_same_calibration_wins_and_damaged_ones_are_skipped(tmp_path):
    versions = NoiseModelVersions(tmp_path / "noise-models")
    assert versions.newest("root-a") is None  # no folder yet
    base = PoissonGaussianNoiseModel(2.0, 100.0, 3.0, (100.0, 220.0))
    first = versions.save(fake_refinement(base, "root-a", 1, 500.0))
    second = versions.save(fake_refinement(base, "root-a", 2, 800.0))
    versions.save(fake_refinement(base, "root-b", 3, 900.0))  # another calibration's
    (tmp_path / "noise-models" / "0123456789abcdef.pt").write_bytes(b"no sidecar: ignored")
    version, model = versions.newest("root-a")
    assert version.id == second.id and model.signal_range == (100.0, 800.0)
    second.path.write_bytes(second.path.read_bytes()[:-10])  # damaged on disk
    version, model = versions.newest("root-a")
    assert version.id == first.id and model.signal_range == (100.0, 500.0)


def refinements(outcome: str) -> float:
    return REGISTRY.get_sample_value(
        "pn2v_live_noise_model_refinements_total", {"outcome": outcome}
    )


@pytest.fixture
def store(tmp_path):
    store = Store(tmp_path / "store")
    yield store
    store.close()


def stored(store: Store, name: str, frames: np.ndarray):
    """`frames` stored as the raw frames of a new acquisition `name` (left open)."""
    acquisition = store.create(name, frames.shape[1:], frames.dtype)
    for t, frame in enumerate(frames):
        acquisition.write_raw(t, frame)
    return acquisition


def test_signal_estimate_is_the_mean_of_the_frames_that_see_the_pixel():
    window = np.arange(6 * 2 * 3, dtype=np.float32).reshape(6, 2, 3)
    window[0, 0, 0] = window[4, 0, 0] = np.nan  # pixel (0, 0): 3 other frames see it
    window[:, 1, 2] = np.nan  # pixel (1, 2): none
    estimate = other_frames_mean(window, centre=2)
    others = np.delete(window, 2, axis=0)
    assert np.isnan(estimate[0, 0]) and np.isnan(estimate[1, 2])  # fewer than 4
    np.testing.assert_allclose(estimate[0, 1], others[:, 0, 1].mean())
    np.testing.assert_allclose(estimate[1, 1], others[:, 1, 1].mean())


def test_refiner_stage_stores_a_version_and_hands_it_to_the_trainer(store, calibrated, tmp_path):
    """14 frames of a static bright scene: frames 2–11 have 4 or more other frames in their
    window (8 before, 2 after) and their 2 later frames stored."""
    acquisition = stored(store, "bright", exposures(ramp(*BRIGHT), 14, seed=5))
    registry = ModelRegistry(tmp_path / "store" / "models")
    idle = threading.Event()
    idle.set()
    trainer = Trainer(
        store, registry, calibrated, "calibrated-id", SETTINGS, torch.device("cpu"), idle
    )
    handed = []
    refiner = NoiseRefiner(
        store,
        NoiseModelVersions(tmp_path / "store" / "noise-models"),
        calibrated,
        "calibrated-id",
        "calibrated-id",
        RefinementSettings(10, 0, min_pairs=5000, gather_seconds=0, gather_share=1.0),
        [trainer.use_noise_model, lambda model, model_id: handed.append(model_id)],
    )
    before = refinements("refined")
    for _ in range(9):
        assert refiner.work() is True  # one frame gathered per pass, newest first
    assert refiner.refinements == 0  # 9 frames: the rate limit wants 10
    assert [t for _, t in refiner._pairs] == list(range(11, 2, -1))
    refiner.work()
    assert refinements("refined") == before + 1 and refiner.refinements == 1
    (version,) = NoiseModelVersions(tmp_path / "store" / "noise-models").versions("calibrated-id")
    assert handed == [version.id] == [refiner.model_id]
    assert version.refinement["parent"] == "calibrated-id" and version.refinement["frames"] == 10
    assert version.refinement["acquisitions"] == ["bright"]
    status = refiner.status()
    assert status["id"] == version.id and status["refined_from"] == "calibrated-id"
    assert status["signal_range"][1] > 850 and status["last_refinement"]["outcome"] == "refined"
    assert REGISTRY.get_sample_value("pn2v_live_noise_model_signal_max") > 850
    refined = load_noise_model(version.path)
    for signal in (300.0, 500.0, 800.0):  # the camera's noise, measured without any model
        true_variance = float(TRUE.variance(torch.tensor(signal)))
        assert noise_variance(refined, signal) == pytest.approx(true_variance, rel=0.2)

    # Frames 0 and 1 see too few other frames; the last two, once the acquisition is closed,
    # lie inside the refined range: nothing more is gathered.
    acquisition.close()
    for _ in range(4):
        refiner.work()
    assert not refiner._pairs and refiner.refinements == 1

    # The trainer's next round trains with the refined model; its model records the version.
    assert trainer.work() is True
    assert trainer.noise_model.kind == "refined"
    assert registry.current().noise_model_id == version.id


def test_refusals_are_logged_counted_and_back_off(store, calibrated, caplog):
    """A lamp that flickers by ±30 % from frame to frame: the mean of the other frames is no
    estimate of a frame's signal."""
    clean = ramp(*BRIGHT)
    frames = np.stack([exposures(clean * (0.7 if t % 2 else 1.3), 1, seed=t)[0] for t in range(10)])
    stored(store, "flicker", frames)
    versions = NoiseModelVersions(store.root / "noise-models")
    settings = RefinementSettings(2, 0, min_pairs=1000, gather_seconds=0, gather_share=1.0)
    refiner = NoiseRefiner(store, versions, calibrated, "calibrated-id", "calibrated-id", settings)
    before = refinements("refused")
    for _ in range(2):
        refiner.work()
    assert refinements("refused") == before + 1
    assert "not refined" in caplog.text and "changes too much between frames" in caplog.text
    assert refiner.status()["last_refinement"]["outcome"] == "refused"
    assert refiner.model_id == "calibrated-id" and versions.versions() == []
    for _ in range(2):  # after a refusal the next attempt waits for twice the frames
        refiner.work()
    assert refinements("refused") == before + 1


def test_gathering_pauses_in_proportion_to_its_cost(store, calibrated):
    """With `gather_share` a quarter of one core, a gather of s seconds is followed by 3 s more
    without one, however small `gather_seconds` (large frames cost seconds to gather)."""
    stored(store, "bright", exposures(ramp(*BRIGHT), 12, seed=1))
    versions = NoiseModelVersions(store.root / "noise-models")
    settings = RefinementSettings(100, 0, gather_seconds=0, gather_share=0.25)
    refiner = NoiseRefiner(store, versions, calibrated, "calibrated-id", "calibrated-id", settings)
    started = time.monotonic()
    assert refiner.work() is True
    spent = time.monotonic() - started
    assert refiner._looked_at["bright"] == {9}  # frames 10 and 11 are the window's after
    assert refiner.work() is False and refiner._looked_at["bright"] == {9}  # pausing
    time.sleep(4 * spent)
    assert refiner.work() is True and refiner._looked_at["bright"] == {8, 9}


def test_frames_estimate_the_noise_of_a_dim_calibration_s_bright_signal_on_real_data(data_dir):
    """fov01's pairs below 60 ADU calibrate a histogram model, blind above that. Pairs of fov04
    (a 256² crop, its 11-frame registered windows) refine it to the noise of fov04's bright
    signal as the full calibration of fov01 and fov02 knows it, with no model trained."""
    fov01, _ = load_field(data_dir, "fov01")
    signal, observation = as_pairs(fov01.mean(0), fov01)
    dim = signal < 60
    calibration = HistogramNoiseModel.fit(signal[dim], observation[dim])
    full = calibrated_models(data_dir, kinds=("hybrid",))["hybrid"]
    fov04, _ = load_field(data_dir, "fov04")
    crop = fov04[:, 128:384, 128:384].astype(np.float32)
    estimates, raws = [], []
    registration = Registration()
    for t in range(8, 48, 4):
        windowed = window(list(crop), t, WINDOW, registration=registration)
        estimates.append(other_frames_mean(windowed, WINDOW.before))
        raws.append(crop[t])
    refined = refine_noise_model(calibration, np.stack(estimates), np.stack(raws), min_pairs=2000)
    # Scored on fov04's whole field against its 50-frame mean, above the calibrated range.
    truth, frames = as_pairs(fov04.mean(0), fov04)
    bright = truth > 70
    nll = {m: model.nll(truth[bright], frames[bright]) for m, model in
           {"dim": calibration, "refined": refined, "full": full}.items()}  # fmt: skip
    assert nll["refined"] < nll["full"] + 0.05 < nll["dim"] - 1.0, nll


def stand_in_denoiser(denoiser, noise_model, raw, *args):
    """Inference's per-frame task with a denoiser as good as a trained one on these smooth
    ramps (a Gaussian blur), so that the daemon's twins can be measured from at once."""
    (frame,) = raw  # the window of a single-frame model: just frame t
    return ndimage.gaussian_filter(frame.astype(np.float32), 2.0)


@pytest.fixture
def daemon_config(tmp_path, calibrated, monkeypatch):
    """Store, inference, trainer and refiner only (no sockets, no sources); an initial model so
    inference starts at once (its MMSE replaced by `stand_in_denoiser`), no training rounds."""
    monkeypatch.setattr(inference, "denoise_frame", stand_in_denoiser)
    save_noise_model(calibrated, tmp_path / "calibrated.pt")
    save_denoiser(new_denoiser("pn2v", 500.0, 200.0, k=4, depth=2, features=8), tmp_path / "m.pt")
    sockets = ("ingest.zmq.bind", "metrics.bind", "viewer.bind", "publish.bind")

    def config(*settings: str):
        return load_config(
            None,
            [
                f'store.root="{tmp_path / "store"}"',
                f'noise_model.path="{tmp_path / "calibrated.pt"}"',
                f'model.initial="{tmp_path / "m.pt"}"',
                *(f'{key}=""' for key in sockets),
                "trainer.device=cpu",
                "inference.device=cpu",
                "inference.compile=false",
                "trainer.every_frames=1000000",
                "trainer.every_seconds=1000000",
                "noise_model.refine_every_frames=4",
                "noise_model.refine_every_seconds=0",
                "noise_model.refine_min_pairs=5000",
                *settings,
            ],
        )

    return config


def run_daemon(config, frames: np.ndarray, until, name: str = "bright") -> dict:
    """Start a daemon, store `frames` as acquisition `name`, wait until `until(daemon)` (or all
    frames are denoised when None), and return its status; the daemon is closed after."""
    daemon = Daemon(config, SystemdNotifier(environ={}))
    try:
        daemon.start()
        acquisition = daemon.store.create(name, frames.shape[1:], frames.dtype)
        for t, frame in enumerate(frames):
            acquisition.write_raw(t, frame)
        deadline = time.monotonic() + 120
        done = until or (lambda d: all(acquisition.denoised_version(t) for t in range(len(frames))))
        while not done(daemon):
            assert time.monotonic() < deadline, daemon.status()["noise_model"]
            time.sleep(0.1)
        return {
            **daemon.status(),
            "inference_noise_model": daemon.inference.noise_model,
            "trainer_noise_model_id": daemon.trainer.noise_model_id,
        }
    finally:
        daemon.close()


def test_daemon_refines_switches_and_resumes_the_refined_version(daemon_config, tmp_path):
    calibrated_id = content_id(tmp_path / "calibrated.pt")
    before = refinements("refined")
    frames = exposures(ramp(*BRIGHT), 8, seed=7)

    def switched(daemon) -> bool:
        return (
            daemon.trainer.noise_model_id != calibrated_id
            and daemon.inference.noise_model.kind == "refined"
        )

    status = run_daemon(daemon_config(), frames, switched)
    assert refinements("refined") == before + 1
    noise = status["noise_model"]
    assert noise["refine"] and noise["refinements"] == 1 and noise["refined_from"] == calibrated_id
    assert noise["signal_range"][1] > 850 and noise["last_refinement"]["frames"] >= 4
    (version,) = NoiseModelVersions(tmp_path / "store" / "noise-models").versions(calibrated_id)
    assert noise["id"] == version.id == status["trainer_noise_model_id"]
    assert status["inference_noise_model"].signal_range[1] > 850

    # A restart goes on with the refined version of the configured calibration ...
    status = run_daemon(daemon_config(), frames[:1], None, name="again")
    assert status["noise_model"]["id"] == version.id == status["trainer_noise_model_id"]
    assert status["noise_model"]["refinements"] == 0  # its range covers the frames already
    # ... but not with another calibration, nor with refinement switched off.
    other = tmp_path / "other.pt"
    save_noise_model(PoissonGaussianNoiseModel(2.0, 100.0, 3.0, (100.0, 220.0)), other)
    status = run_daemon(
        daemon_config(f'noise_model.path="{other}"', "noise_model.refine=false"),
        frames[:1],
        None,
        name="other",
    )
    assert status["noise_model"]["id"] == content_id(other) == status["trainer_noise_model_id"]
    status = run_daemon(daemon_config("noise_model.refine=false"), frames[:1], None, name="off")
    assert status["noise_model"]["id"] == calibrated_id


def test_with_refine_off_nothing_changes(daemon_config, tmp_path):
    calibrated_id = content_id(tmp_path / "calibrated.pt")
    before = refinements("refined"), refinements("refused")
    frames = exposures(ramp(*BRIGHT), 8, seed=8)
    status = run_daemon(daemon_config("noise_model.refine=false"), frames, None)
    noise = status["noise_model"]
    assert noise["refine"] is False and noise["refinements"] == 0
    assert noise["id"] == calibrated_id == status["trainer_noise_model_id"]
    assert status["inference_noise_model"].kind == "histogram"
    assert (refinements("refined"), refinements("refused")) == before
    assert not (tmp_path / "store" / "noise-models").exists()
