"""The sCMOS bench (issue 26, acceptance 2): one data set scored over several training draws."""

import json
import sys

import pytest

from pn2v_live.service.bench import scmos


def test_gain_summary():
    assert scmos.gain_summary([0.5, 1.0, 1.5]) == {
        "runs": 3,
        "gain_db_mean": 1.0,
        "gain_db_sd": 0.5,
        "gain_db_min": 0.5,
    }
    assert scmos.gain_summary([0.7])["gain_db_sd"] == 0.0


@pytest.mark.slow  # two calibrations and four tiny trainings: ~30 s of CPU
def test_init_seeds_share_the_data_and_differ_in_training(monkeypatch, capsys):
    monkeypatch.setattr(
        sys,
        "argv",
        ["scmos", "--size", "32", "--frames", "4", "--steps", "2", "--k", "8", "--patch", "32"]
        + ["--scored", "1", "--seed", "0", "--init-seed", "3", "4"],
    )
    scmos.main()
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    runs, summary = lines[:2], lines[2]
    assert [r["settings"]["init_seed"] for r in runs] == [3, 4]
    assert {r["settings"]["seed"] for r in runs} == {0}
    # the same raw frames: the same raw PSNR; other networks: other denoised images
    assert runs[0]["with_maps"]["raw_psnr_db"] == runs[1]["with_maps"]["raw_psnr_db"]
    assert runs[0]["with_maps"]["psnr_db"] != runs[1]["with_maps"]["psnr_db"]
    assert all(0 < r["with_maps"]["prior_spread"] <= 2 for r in runs)
    assert summary["runs"] == 2
    assert summary["gain_db_min"] == pytest.approx(min(r["gain_db"] for r in runs), abs=2e-3)


def test_training_seed_defaults_to_the_data_seed():
    from argparse import Namespace

    assert scmos.training_seed(Namespace(seed=5)) == 5
    assert scmos.training_seed(Namespace(seed=5, init_seed=None)) == 5
    assert scmos.training_seed(Namespace(seed=5, init_seed=2)) == 2
