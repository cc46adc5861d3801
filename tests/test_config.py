"""The daemon's TOML config: defaults, overrides, path resolution and refusals with key + reason."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from pn2v_live.errors import UserError
from pn2v_live.service.config import load_config

EXAMPLE = Path(__file__).resolve().parent.parent / "service" / "pn2v-live.toml"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "pn2v-live.toml"
    path.write_text(text)
    return path


def test_defaults_listen_on_localhost_only():
    config = load_config(None)
    assert config.metrics.bind.startswith("127.0.0.1:")
    assert config.viewer.bind.startswith("127.0.0.1:")
    assert config.ingest.zmq.bind.startswith("tcp://127.0.0.1:")
    assert config.publish.bind.startswith("tcp://127.0.0.1:")
    assert config.inference.scheduler == "local"


def test_file_values_and_relative_paths(tmp_path):
    path = write(
        tmp_path,
        """
[store]
root = "store"
zarr_format = 3
[ingest.folder]
paths = ["incoming", "/abs/share"]
polling = true
[noise_model]
path = "calib/nm.pt"
[trainer]
steps_per_round = 7
k = 64
[inference]
scheduler = "tcp://10.0.0.5:8786"
tile = 256
""",
    )
    config = load_config(path)
    assert config.store.root == tmp_path / "store"
    assert config.store.zarr_format == 3
    assert config.ingest.folder.paths == [tmp_path / "incoming", Path("/abs/share")]
    assert config.ingest.folder.polling is True
    assert config.noise_model.path == tmp_path / "calib" / "nm.pt"
    assert (config.trainer.steps_per_round, config.trainer.k) == (7, 64)
    assert config.inference.scheduler == "tcp://10.0.0.5:8786"
    assert config.inference.tile == 256


def test_overrides_win_over_the_file(tmp_path):
    path = write(tmp_path, "[trainer]\nsteps_per_round = 7\n")
    config = load_config(
        path,
        [
            "trainer.steps_per_round=50",
            "inference.scheduler=tcp://gpu-box:8786",
            'ingest.folder.paths=["a", "b"]',
            "metrics.bind=",
        ],
    )
    assert config.trainer.steps_per_round == 50
    assert config.inference.scheduler == "tcp://gpu-box:8786"
    assert config.ingest.folder.paths == [tmp_path / "a", tmp_path / "b"]
    assert config.metrics.bind == ""


def test_port_zero_and_zmq_wildcard_ask_the_system_for_a_free_port():
    config = load_config(None, ['viewer.bind="127.0.0.1:0"', 'publish.bind="tcp://127.0.0.1:*"'])
    assert (config.viewer.bind, config.publish.bind) == ("127.0.0.1:0", "tcp://127.0.0.1:*")


def test_keep_versions_default_and_value_survive_path_resolution(tmp_path):
    assert load_config(None).model.keep_versions == 10
    path = write(tmp_path, '[model]\ninitial = "start.pt"\nkeep_versions = 3\n')
    config = load_config(path)
    assert (config.model.initial, config.model.keep_versions) == (tmp_path / "start.pt", 3)


@pytest.mark.parametrize(
    ("text", "overrides", "expected"),
    [
        ("[trainer]\nsteps_per_rnd = 5\n", [], "trainer.steps_per_rnd: unknown key"),
        ("[trainr]\n", [], "trainr: unknown key"),
        ("[trainer]\nsteps_per_round = -1\n", [], "trainer.steps_per_round: Input should be"),
        ("[trainer]\npatch_size = 30\n", [], "trainer.patch_size: Input should be a multiple of 8"),
        ("[trainer]\ndevice = 'gpu'\n", [], "trainer.device: expected auto, cpu, cuda"),
        ("[metrics]\nbind = '9464'\n", [], "metrics.bind: expected host:port"),
        ("[viewer]\nbind = 'localhost:99999'\n", [], "viewer.bind: expected host:port"),
        ("[publish]\nbind = 'http://x'\n", [], "publish.bind: expected tcp://"),
        ("[inference]\nscheduler = 'cluster'\n", [], "inference.scheduler: expected"),
        ("[inference]\nprecision = 'float16'\n", [], "inference.precision: Input should be 'auto'"),
        ("", ["trainer.precision=fp32"], "trainer.precision: Input should be 'auto'"),
        ("[store]\nzarr_format = 4\n", [], "store.zarr_format: expected 2 (OME-NGFF 0.4) or 3"),
        ("[trainer]\ncontext = 'two'\n", [], "trainer.context: context must look like A:B"),
        ("", ["trainer.context=-1:0"], "trainer.context: context must look like A:B"),
        ("[ingest.folder]\npattern = '(.*'\n", [], "ingest.folder.pattern: acquisition pattern"),
        ("[ingest.folder]\npattern = '.*'\n", [], "needs a group named acquisition"),
        ("", ["trainer.every_frames=0"], "trainer.every_frames: Input should be greater than 0"),
        ("[model]\nkeep_versions = 0\n", [], "model.keep_versions: Input should be greater than"),
        (
            "[trainer]\nsteps_per_round = 5\n",
            ["trainer.steps_per_round.x=1"],
            "steps_per_round is a value, not a section",
        ),
        ("", ["steps_per_round"], "expected KEY=VALUE"),
        ("[store\n", [], "not valid TOML"),
    ],
)
def test_bad_config_names_key_and_reason(tmp_path, text, overrides, expected):
    path = write(tmp_path, text)
    with pytest.raises(UserError) as caught:
        load_config(path, overrides)
    message = str(caught.value)
    assert expected in message
    assert "\n" not in message


def test_every_problem_is_reported_at_once(tmp_path):
    path = write(tmp_path, "[trainer]\nbatch_size = 0\nk = 1\n")
    with pytest.raises(UserError) as caught:
        load_config(path)
    assert "trainer.batch_size" in str(caught.value)
    assert "trainer.k" in str(caught.value)


def test_missing_file_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="config file not found"):
        load_config(tmp_path / "nope.toml")


def test_shipped_example_config_is_valid():
    config = load_config(EXAMPLE)
    assert config.inference.scheduler == "local"
    assert config.store.root.is_absolute()


# Number keys: (key, TOML value, what the one line must say). Strict types, finite, sane ranges.
BAD_NUMBERS = [
    ("trainer.learning_rate", "inf", "Input should be a finite number, not inf or nan (got inf)"),
    ("trainer.learning_rate", "nan", "Input should be a finite number, not inf or nan (got nan)"),
    ("trainer.every_seconds", "-inf", "Input should be a finite number"),
    ("trainer.training_share", "nan", "Input should be a finite number"),
    ("ingest.folder.stable_seconds", "inf", "Input should be a finite number"),
    ("inference.backfill_hours", "inf", "Input should be a finite number"),
    ("noise_model.refine_every_seconds", "nan", "Input should be a finite number"),
    ("trainer.min_gain_db", "nan", "expected a number of dB within ±100, or -inf"),
    ("trainer.min_gain_db", "inf", "expected a number of dB within ±100, or -inf"),
    ("trainer.every_frames", "true", "Input should be a number, not true"),
    ("trainer.learning_rate", "false", "Input should be a number, not false"),
    ("trainer.min_gain_db", "true", "Input should be a number, not true"),
    ("inference.tile", "true", "Input should be a number, not true"),
    ("inference.max_in_flight", "true", "Input should be a number, not true"),
    ("viewer.max_streams", "true", "Input should be a number, not true"),
    ("store.zarr_format", "true", "Input should be a number, not true"),
    ("trainer.batch_size", "1e8", "valid integer (a whole number: no decimal point, no exponent)"),
    ("trainer.batch_size", "16.0", "Input should be a valid integer"),
    ("trainer.k", "'800'", "Input should be a valid integer (a whole number: no decimal point, no"),
    ("trainer.k", "'800'", "no exponent) (got '800')"),
    (
        "trainer.batch_size",
        "100000000",
        "Input should be less than or equal to 4096 (got 100000000)",
    ),
    ("trainer.k", "1000000", "Input should be less than or equal to 4096"),
    ("trainer.patch_size", "1048576", "Input should be less than or equal to 16384"),
    ("trainer.steps_per_round", "1000000000000", "Input should be less than or equal to 1000000"),
    ("trainer.every_frames", "10000000000", "Input should be less than or equal to 1000000000"),
    ("trainer.every_seconds", "1e12", "Input should be less than or equal to 31622400"),
    ("trainer.learning_rate", "10", "Input should be less than or equal to 1"),
    ("trainer.min_gain_db", "1e6", "expected a number of dB within ±100"),
    ("inference.tile", "1000000", "Input should be less than or equal to 16384"),
    ("inference.max_in_flight", "100000", "Input should be less than or equal to 1024"),
    ("inference.backfill_hours", "1e9", "Input should be less than or equal to 8784"),
    ("model.keep_versions", "1e3", "Input should be a valid integer"),
    ("noise_model.refine_min_pairs", "1e20", "Input should be a valid integer"),
    ("ingest.folder.stable_seconds", "86400", "Input should be less than or equal to 3600"),
    ("inference.compile", "1", "Input should be true or false (got 1)"),
    ("ingest.folder.polling", "'yes'", "Input should be true or false"),
]


@pytest.mark.parametrize(("key", "value", "reason"), BAD_NUMBERS)
def test_numbers_are_strict_finite_and_bounded(tmp_path, key, value, reason):
    section, leaf = key.rsplit(".", 1)
    for path, overrides in (
        (write(tmp_path, f"[{section}]\n{leaf} = {value}\n"), []),  # in the file
        (None, [f"{key}={value}"]),  # as --set
    ):
        with pytest.raises(UserError) as caught:
            load_config(path, overrides)
        message = str(caught.value)
        assert f": {key}: " in message and reason in message
        assert "\n" not in message and "; " not in message, "one problem, one line"


def test_numbers_that_make_sense_are_still_taken():
    config = load_config(
        None,
        [
            "trainer.every_seconds=1",  # an integer for a number key
            "trainer.min_gain_db=-inf",  # no gain threshold: every better-validating model
            "trainer.min_gain_db=-100",
            "trainer.learning_rate=1e-3",
            "trainer.first_model_frames=1000000",
            "trainer.k=4096",
            "trainer.patch_size=16384",
            "inference.tile=32",
            "inference.backfill_hours=0",
            "noise_model.refine_every_seconds=0",
            "store.zarr_format=3",
            "inference.compile=false",
        ],
    )
    assert config.trainer.every_seconds == 1.0 and isinstance(config.trainer.every_seconds, float)
    assert config.trainer.min_gain_db == -100.0
    assert (config.trainer.k, config.inference.tile, config.store.zarr_format) == (4096, 32, 3)
    assert load_config(None, ["trainer.min_gain_db=-inf"]).trainer.min_gain_db == float("-inf")


@pytest.mark.parametrize(
    ("setting", "expected"),
    [
        ("[trainer]\nlearning_rate = inf", "trainer.learning_rate: Input should be a finite"),
        ("[trainer]\nevery_frames = true", "trainer.every_frames: Input should be a number, not"),
        ("[trainer]\nbatch_size = 1e8", "trainer.batch_size: Input should be a valid integer"),
    ],
)
def test_serve_refuses_a_bad_number_with_one_error_line_and_exit_code_2(
    tmp_path, setting, expected
):
    """The real CLI: nothing starts, one `error:` line on stderr naming key and reason."""
    config = write(tmp_path, setting + "\n")
    result = subprocess.run(
        [Path(sys.executable).with_name("pn2v-live"), "serve", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert result.returncode == 2, result.stderr
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert expected in lines[0]
    assert not (tmp_path / "pn2v-data").exists(), "nothing may start before the config is valid"


@pytest.mark.parametrize("value", ["0", "-1", "true", "1e3", "512.0", "'512'", "65537", "inf"])
def test_the_receive_queue_bound_is_a_sane_whole_number_of_mib(value):
    with pytest.raises(UserError) as caught:
        load_config(None, [f"ingest.zmq.queue_mib={value}"])
    assert "ingest.zmq.queue_mib: " in str(caught.value) and "\n" not in str(caught.value)
    assert load_config(None).ingest.zmq.queue_mib == 512
    assert load_config(None, ["ingest.zmq.queue_mib=64"]).ingest.zmq.queue_mib == 64
