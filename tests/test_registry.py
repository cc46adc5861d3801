"""Model registry: versions, promotion only on improvement, and survival of SIGKILL mid-write."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pn2v_live.core.model import new_denoiser
from pn2v_live.storage.registry import ModelRegistry, content_id

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def small_denoiser(seed: int):
    torch.manual_seed(seed)
    return new_denoiser("pn2v", mean=10.0, std=3.0, k=4, depth=2, features=8)


def promote(registry, denoiser, loss, baseline=None):
    return registry.promote(
        denoiser,
        validation_loss=loss,
        training_frames=12,
        training_steps=30,
        noise_model_id="abc",
        baseline_loss=baseline,
    )


def same_weights(a, b) -> bool:
    return all(
        torch.equal(x, y)
        for x, y in zip(a.net.state_dict().values(), b.net.state_dict().values(), strict=True)
    )


def test_first_model_is_promoted_and_reloads_bit_identical(tmp_path):
    registry = ModelRegistry(tmp_path / "models")
    assert registry.current() is None
    denoiser = small_denoiser(0)
    info = promote(registry, denoiser, 2.5)
    assert (info.version, info.parent, info.validation_loss) == (1, None, 2.5)
    assert (info.training_frames, info.training_steps, info.noise_model_id) == (12, 30, "abc")
    reloaded, reloaded_info = ModelRegistry(tmp_path / "models").load()
    assert reloaded_info == info
    assert same_weights(reloaded, denoiser)
    assert (reloaded.mean, reloaded.std, reloaded.k) == (10.0, 3.0, 4)


def test_promotion_only_when_validation_loss_improves(tmp_path):
    registry = ModelRegistry(tmp_path)
    promote(registry, small_denoiser(0), 2.5)
    assert promote(registry, small_denoiser(1), 2.5) is None  # equal is not better
    assert promote(registry, small_denoiser(1), 3.0) is None
    assert promote(registry, small_denoiser(1), float("nan")) is None
    assert promote(registry, small_denoiser(1), None) is None
    assert registry.current().version == 1
    better = promote(registry, small_denoiser(2), 2.0)
    assert (better.version, better.parent) == (2, 1)
    assert same_weights(registry.load()[0], small_denoiser(2))
    assert same_weights(registry.load(1)[0], small_denoiser(0))
    assert [v.version for v in registry.versions()] == [1, 2]


def test_baseline_measured_on_the_same_batch_decides(tmp_path):
    registry = ModelRegistry(tmp_path)
    promote(registry, small_denoiser(0), 2.0)
    # The validation set grew: the current model now scores 3.0 on it, the candidate 2.5.
    assert promote(registry, small_denoiser(1), 2.5, baseline=3.0).version == 2
    assert promote(registry, small_denoiser(2), 2.9, baseline=2.8) is None
    # The current model cannot be scored (NaN): a finite candidate replaces it.
    assert promote(registry, small_denoiser(3), 2.9, baseline=float("nan")).version == 3


def test_initial_model_without_loss_is_only_accepted_first(tmp_path):
    registry = ModelRegistry(tmp_path)
    info = registry.promote(
        small_denoiser(0),
        validation_loss=None,
        training_frames=0,
        training_steps=0,
        noise_model_id=None,
        source="/models/start.pt",
    )
    assert (info.version, info.source, info.validation_loss) == (1, "/models/start.pt", None)
    # Without a recorded loss, any measured finite loss of a candidate counts as better only
    # when compared against the current model's loss on the same batch.
    assert promote(registry, small_denoiser(1), 4.0, baseline=5.0).version == 2


def test_content_id_follows_file_content(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.write_bytes(b"noise model 1")
    b.write_bytes(b"noise model 1")
    assert content_id(a) == content_id(b)
    b.write_bytes(b"noise model 2")
    assert content_id(a) != content_id(b)
    assert len(content_id(a)) == 16


SUFFIXES = (".json", ".pt")


def files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_promotion_keeps_only_the_newest_versions(tmp_path):
    registry = ModelRegistry(tmp_path, keep_versions=2)
    for seed, loss in enumerate([5.0, 4.0, 3.0, 2.0, 1.0]):
        promote(registry, small_denoiser(seed), loss)
    assert files(tmp_path) == ["current", "v0004.json", "v0004.pt", "v0005.json", "v0005.pt"]
    reopened = ModelRegistry(tmp_path, keep_versions=2)
    denoiser, info = reopened.load()
    assert info.version == 5 and same_weights(denoiser, small_denoiser(4))
    assert [v.version for v in reopened.versions()] == [4, 5]
    newest = promote(reopened, small_denoiser(5), 0.5)
    assert (newest.version, newest.parent) == (6, 5)
    assert files(tmp_path) == ["current", "v0005.json", "v0005.pt", "v0006.json", "v0006.pt"]


def test_keep_one_never_reuses_a_deleted_number(tmp_path):
    registry = ModelRegistry(tmp_path, keep_versions=1)
    for seed, loss in enumerate([3.0, 2.0, 1.0]):
        assert promote(registry, small_denoiser(seed), loss).version == seed + 1
        assert files(tmp_path) == ["current", f"v{seed + 1:04d}.json", f"v{seed + 1:04d}.pt"]
    assert ModelRegistry(tmp_path, keep_versions=1).load()[1].version == 3


def test_a_half_deleted_version_is_invisible_and_deleted_by_the_next_promotion(tmp_path):
    registry = ModelRegistry(tmp_path)  # keeps everything
    for seed, loss in enumerate([3.0, 2.0, 1.0]):
        promote(registry, small_denoiser(seed), loss)
    (tmp_path / "v0001.json").unlink()  # a crash between deleting v1's metadata and checkpoint
    reopened = ModelRegistry(tmp_path, keep_versions=2)
    assert [v.version for v in reopened.versions()] == [2, 3]
    assert reopened.load()[1].version == 3
    assert promote(reopened, small_denoiser(3), 0.5).version == 4
    assert files(tmp_path) == ["current", "v0003.json", "v0003.pt", "v0004.json", "v0004.pt"]


def test_keep_versions_must_be_positive(tmp_path):
    with pytest.raises(ValueError, match="keep_versions"):
        ModelRegistry(tmp_path, keep_versions=0)


PROMOTE_FOREVER = """
import sys, torch
from pn2v_live.core.model import new_denoiser
from pn2v_live.storage.registry import ModelRegistry
registry = ModelRegistry(sys.argv[1], keep_versions=int(sys.argv[2]) or None)
while True:
    current = registry.current()
    loss = 1e6 if current is None else current.validation_loss * 0.99
    d = new_denoiser("pn2v", mean=loss, std=3.0, k=4, depth=2, features=16)
    info = registry.promote(d, validation_loss=loss, training_frames=1, training_steps=1,
                            noise_model_id=None)
    print(info.version, flush=True)
"""


@pytest.mark.parametrize("keep", [None, 2])
def test_sigkill_during_promotion_leaves_a_loadable_current_model(tmp_path, keep):
    """Also while pruning (keep = 2): killed mid-deletion, the registry still loads and lists."""
    folder = tmp_path / "models"
    for delay in (0.9, 1.3, 1.7):
        process = subprocess.Popen(
            [sys.executable, "-c", PROMOTE_FOREVER, str(folder), str(keep or 0)],
            cwd=PROJECT_ROOT,
            stdout=subprocess.PIPE,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
        first = process.stdout.readline()  # at least one promotion finished
        assert first.strip().isdigit()
        time.sleep(delay)
        process.send_signal(signal.SIGKILL)
        process.wait()
        registry = ModelRegistry(folder, keep_versions=keep)
        assert not list(folder.glob(".*")), "temporary files of the killed writer are cleaned"
        denoiser, info = registry.load()
        # The checkpoint behind the pointer is the one its metadata describes, and it is the
        # newest complete version or (killed between metadata and pointer) the one before.
        assert denoiser.mean == info.validation_loss
        assert info.version >= max(v.version for v in registry.versions()) - 1
    # Later promotions never reuse a number, even one whose files were left half-written.
    used = {int(p.name[1:].split(".")[0]) for p in folder.glob("v[0-9]*")}
    newest = promote(registry, small_denoiser(5), 0.5)
    assert newest.version > max(used)
    assert registry.load()[1] == newest
    if keep is not None:  # whatever a killed pruning left behind is gone now
        versions = [v.version for v in registry.versions()]
        assert len(versions) == 2 and versions[-1] == newest.version
        assert files(folder) == ["current", *(f"v{n:04d}{s}" for n in versions for s in SUFFIXES)]
