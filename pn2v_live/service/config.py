"""The daemon's configuration: one TOML file, validated with pydantic, overridable key by key.

Every section refuses unknown keys. Numbers are strict and bounded: an integer key takes only an
integer (not `true`, not `1e8`), a number key only a finite number (not `inf` or `nan`; integers
are fine), each within a range that makes sense for it (up to `MAX_*` below), and a boolean key
only `true` or `false`. Relative paths are resolved against the config file's folder.
An empty `bind` turns that listener off. Overrides use dotted keys with TOML values, e.g.
`trainer.steps_per_round=50` or `ingest.folder.paths=["/data/scope1"]`; a value that is not
valid TOML is taken as a plain string (`inference.scheduler=tcp://gpu-box:8786`).
"""

from __future__ import annotations

import math
import re
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    AllowInfNan,
    BaseModel,
    ConfigDict,
    Field,
    Strict,
    ValidationError,
    ValidationInfo,
    field_validator,
)

from pn2v_live.core.context import Context
from pn2v_live.errors import UserError
from pn2v_live.pipeline.folder_layout import DEFAULT_PATTERN, compile_pattern
from pn2v_live.service.access import TOKEN_ADVICE, TOKEN_MIN_LENGTH, is_loopback, split_host_port

# Strict numbers: pydantic's lax mode would take true as 1, 1e8 as an integer and "50" as 50;
# these take an integer only (Int), a finite int or float only (Number), true/false only (Bool).
Int = Annotated[int, Strict()]
Number = Annotated[float, Strict(), AllowInfNan(False)]
Bool = Annotated[bool, Strict()]

# Upper bounds: far beyond any real use, low enough that a typo (an extra zero or three, a
# value in the wrong unit) is refused at start instead of exhausting memory or never happening.
MAX_FRAMES = 1_000_000_000  # frame counts (every_frames, first_model_frames, ...)
MAX_STEPS = 1_000_000  # optimiser steps per round
MAX_SECONDS = 366 * 24 * 3600.0  # periods: a year (1e6 s is a fair way to say "not by time")
MAX_SIDE = 16_384  # pixels: training patch and inference tile sides
MAX_BATCH = 4096  # patches per training step
MAX_K = 4096  # prior samples per pixel (the paper uses 800)
MAX_IN_FLIGHT = 1024  # frames denoised at once
MAX_VERSIONS = 1_000_000  # model versions kept
MAX_PAIRS = 10_000_000_000  # (signal estimate, raw) pixel pairs a noise-model refinement needs
MAX_BACKFILL_HOURS = 24 * 366.0  # a year
MAX_GAIN_DB = 100.0  # |trainer.min_gain_db|


def _check_zarr_format(value: int) -> int:
    if value in (2, 3):
        return value
    raise ValueError("expected 2 (OME-NGFF 0.4) or 3 (OME-NGFF 0.5)")


def _check_gain_db(value: float) -> float:
    """A gain in dB within ±MAX_GAIN_DB, or -inf (promote any model with a lower loss)."""
    if value == -math.inf or abs(value) <= MAX_GAIN_DB:
        return value
    raise ValueError(
        f"expected a number of dB within ±{MAX_GAIN_DB:g}, or -inf to promote every model "
        "that validates better"
    )


def _check_device(value: str) -> str:
    """Accept auto, cpu, cuda, cuda:N or mps."""
    if re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", value):
        return value
    raise ValueError("expected auto, cpu, cuda, cuda:N or mps")


Device = Annotated[str, AfterValidator(_check_device)]
# U-Net body precision: "auto" is bfloat16 where the device computes it natively (GPU, AMX CPU).
Precision = Literal["auto", "float32", "bfloat16"]


def _check_host_port(value: str) -> str:
    """Accept "" (off) or "host:port" with an ASCII-decimal port in 0..65535 (0: any free port)."""
    if value == "" or split_host_port(value) is not None:
        return value
    raise ValueError('expected host:port such as 127.0.0.1:9464 (or "" for off)')


def _listener_token(section: str) -> Callable[[str, ValidationInfo], str]:
    """The check of `section.token`: required (and long enough) when its bind is beyond
    loopback."""

    def check(value: str, info: ValidationInfo) -> str:
        bind = info.data.get("bind")  # absent when bind itself was refused
        parsed = split_host_port(bind) if bind else None
        if parsed is not None and not is_loopback(parsed[0]) and not value:
            raise ValueError(
                f"required because {section}.bind {bind} listens beyond loopback (anyone on "
                f"the network could connect); set a long random token, {TOKEN_ADVICE}, or "
                "bind to 127.0.0.1"
            )
        if value and len(value) < TOKEN_MIN_LENGTH:
            raise ValueError(f"too short: use at least {TOKEN_MIN_LENGTH} random characters")
        if value and not re.fullmatch(r"[\x21-\x7e]+", value):
            raise ValueError("use printable ASCII without spaces (it goes in headers and cookies)")
        return value

    return check


def _check_host_names(value: list[str]) -> list[str]:
    """Extra names the Host/Origin check accepts: plain host names or IP addresses."""
    for name in value:
        if not re.fullmatch(r"\[?[A-Za-z0-9._:-]+\]?", name):
            raise ValueError(f"{name!r} is not a host name such as scope-pc.lab.example.org")
    return value


def _check_zmq_endpoint(value: str) -> str:
    """Accept "" (off) or a ZeroMQ tcp:// or ipc:// endpoint."""
    if not value or value.startswith(("tcp://", "ipc://")):
        return value
    raise ValueError('expected tcp://host:port or ipc://path (or "" for off)')


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class StoreConfig(Section):
    root: Path = Path("pn2v-data")
    zarr_format: Annotated[Int, AfterValidator(_check_zarr_format)] = 2


class FolderIngestConfig(Section):
    paths: list[Path] = []
    polling: Bool = False
    stable_seconds: Number = Field(2.0, gt=0, le=3600)
    pattern: str = DEFAULT_PATTERN  # file path inside a watched folder → acquisition name

    @field_validator("pattern")
    @classmethod
    def _pattern(cls, value: str) -> str:
        try:
            compile_pattern(value)
        except UserError as error:
            raise ValueError(str(error)) from None
        return value


class ZmqIngestConfig(Section):
    bind: str = "tcp://127.0.0.1:5555"
    status_bind: str | None = None  # REP socket for "what is stored?"; default: bind's port + 1
    # Received frames held in memory before the receiver holds senders back (up to 64 GiB).
    queue_mib: int = Field(512, ge=1, le=65_536, strict=True)
    _check = field_validator("bind", "status_bind")(_check_zmq_endpoint)


class IngestConfig(Section):
    folder: FolderIngestConfig = FolderIngestConfig()
    zmq: ZmqIngestConfig = ZmqIngestConfig()


class NoiseModelConfig(Section):
    path: Path = Path("noise-model.pt")
    refine: Bool = True  # refine it from the stream when the signal goes above its range
    # at most one refinement per this many frames ... and per this many seconds
    refine_every_frames: Int = Field(16, gt=0, le=MAX_FRAMES)
    refine_every_seconds: Number = Field(300.0, ge=0, le=MAX_SECONDS)
    # (signal estimate, raw) pairs above the range needed
    refine_min_pairs: Int = Field(10_000, ge=1000, le=MAX_PAIRS)


class CameraConfig(Section):
    # sCMOS per-pixel offset/gain/read-noise maps (`calibrate --dark ... --maps-output`); none:
    # those stored in the noise model, if any
    maps: Path | None = None
    # [row, column] on the sensor of pixel [0, 0] of frames whose source does not say (a crop)
    sensor_origin: tuple[Annotated[Int, Field(ge=0, le=MAX_SIDE)], ...] = (0, 0)

    @field_validator("sensor_origin")
    @classmethod
    def _origin(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        if len(value) != 2:
            raise ValueError("expected [row, column], e.g. [0, 512]")
        return value


class ModelConfig(Section):
    initial: Path | None = None
    keep_versions: Int = Field(10, ge=1, le=MAX_VERSIONS)  # newest versions a promotion keeps


class TrainerConfig(Section):
    device: Device = "auto"
    every_frames: Int = Field(50, gt=0, le=MAX_FRAMES)
    every_seconds: Number = Field(600.0, gt=0, le=MAX_SECONDS)
    steps_per_round: Int = Field(100, gt=0, le=MAX_STEPS)
    patch_size: Int = Field(64, ge=16, le=MAX_SIDE, multiple_of=8)
    batch_size: Int = Field(16, gt=0, le=MAX_BATCH)
    k: Int = Field(800, gt=1, le=MAX_K)
    learning_rate: Number = Field(4e-4, gt=0, le=1)
    precision: Precision = "auto"
    context: str = "auto"  # frames "before:after" each frame the network sees, or "auto"
    first_model_frames: Int = Field(16, gt=0, le=MAX_FRAMES)  # before the first model trains
    first_model_steps: Int = Field(300, gt=0, le=MAX_STEPS)  # per round making the first model
    # promote only models estimated at least this much above raw (-inf: no such threshold)
    min_gain_db: Annotated[float, Strict(), AfterValidator(_check_gain_db)] = 1.0
    training_share: Number = Field(0.5, ge=0, le=1)  # of wall time, while inference is behind

    @field_validator("context")
    @classmethod
    def _context(cls, value: str) -> str:
        if value != "auto":
            Context.parse(value)  # ValueError names the expected form
        return value


class InferenceConfig(Section):
    scheduler: str = "local"
    max_in_flight: Int | None = Field(None, gt=0, le=MAX_IN_FLIGHT)
    device: Device = "auto"
    tile: Int | None = Field(None, ge=32, le=MAX_SIDE)
    compile: Bool = True
    precision: Precision = "auto"
    backfill_hours: Number = Field(12.0, ge=0, le=MAX_BACKFILL_HOURS)

    @field_validator("scheduler")
    @classmethod
    def _scheduler(cls, value: str) -> str:
        if value == "local" or value.startswith(("tcp://", "tls://", "inproc://")):
            return value
        raise ValueError('expected "local" or a dask scheduler address tcp://host:port')


class MetricsConfig(Section):
    bind: str = "127.0.0.1:9464"
    # Required beyond loopback (checked also when left out): Prometheus sends it as a bearer token.
    token: str = Field("", validate_default=True)
    allowed_hosts: list[str] = []  # names besides localhost/this machine a Host may carry
    _check = field_validator("bind")(_check_host_port)
    _check_token = field_validator("token")(_listener_token("metrics"))
    _check_hosts = field_validator("allowed_hosts")(_check_host_names)


class ViewerConfig(Section):
    bind: str = "127.0.0.1:8080"
    # Required beyond loopback (checked also when left out): header, cookie or ?token= once.
    token: str = Field("", validate_default=True)
    allowed_hosts: list[str] = []  # names besides localhost/this machine a Host may carry
    max_streams: Int = Field(64, ge=1, le=10_000)  # live views (event streams) at once
    max_connections: Int = Field(256, ge=2, le=100_000)  # HTTP connections at once
    _check = field_validator("bind")(_check_host_port)
    _check_token = field_validator("token")(_listener_token("viewer"))
    _check_hosts = field_validator("allowed_hosts")(_check_host_names)

    @field_validator("max_connections")
    @classmethod
    def _room_beside_streams(cls, value: int, info: ValidationInfo) -> int:
        streams = info.data.get("max_streams")
        if streams is not None and value <= streams:
            raise ValueError(
                f"must exceed max_streams ({streams}): pages and images need connections "
                "beside the event streams"
            )
        return value


class PublishConfig(Section):
    bind: str = "tcp://127.0.0.1:5557"
    _check = field_validator("bind")(_check_zmq_endpoint)


class Config(Section):
    store: StoreConfig = StoreConfig()
    ingest: IngestConfig = IngestConfig()
    noise_model: NoiseModelConfig = NoiseModelConfig()
    camera: CameraConfig = CameraConfig()
    model: ModelConfig = ModelConfig()
    trainer: TrainerConfig = TrainerConfig()
    inference: InferenceConfig = InferenceConfig()
    metrics: MetricsConfig = MetricsConfig()
    viewer: ViewerConfig = ViewerConfig()
    publish: PublishConfig = PublishConfig()


def load_config(path: Path | None, overrides: list[str] = ()) -> Config:
    """Read the TOML file at `path` (None: defaults only), apply `key=value` overrides, validate.

    Raises UserError naming the file, the dotted key and the reason for anything invalid.
    """
    raw: dict[str, Any] = {}
    base = Path.cwd()
    where = "config"
    if path is not None:
        where = str(path)
        if not path.is_file():
            raise UserError(f"{path}: config file not found")
        try:
            raw = tomllib.loads(path.read_text())
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
            raise UserError(f"{path}: not valid TOML ({error})") from error
        base = path.resolve().parent
    for override in overrides:
        _apply_override(raw, override)
    try:
        config = Config.model_validate(raw)
    except ValidationError as error:
        raise UserError(f"{where}: {_describe(error)}") from error
    return _resolve_paths(config, base)


def _apply_override(raw: dict[str, Any], override: str) -> None:
    """Set `raw[a][b][c] = value` for an override "a.b.c=value" (value parsed as TOML)."""
    key, sep, text = override.partition("=")
    if not sep or not key.strip():
        raise UserError(
            f"--set {override!r}: expected KEY=VALUE such as trainer.steps_per_round=50"
        )
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        value = text
    *parents, leaf = key.strip().split(".")
    node = raw
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise UserError(f"--set {override!r}: {part} is a value, not a section")
        node = child
    node[leaf] = value


# Pydantic's type errors, with what a TOML editor needs to know added.
_TYPE_REASONS = {
    "int_type": "Input should be a valid integer (a whole number: no decimal point, no exponent)",
    "bool_type": "Input should be true or false",
    "finite_number": "Input should be a finite number, not inf or nan",
}


def _describe(error: ValidationError) -> str:
    """One line: "key.path: reason (got value)" for each problem, joined by "; "."""
    parts = []
    for problem in error.errors():
        key = ".".join(str(p) for p in problem["loc"])
        reason = problem["msg"].removeprefix("Value error, ")
        reason = _TYPE_REASONS.get(problem["type"], reason)
        value = problem.get("input")
        if problem["type"] == "extra_forbidden":
            reason = "unknown key (check the spelling; see docs/configuration.md)"
        elif problem["type"] in ("int_type", "float_type") and isinstance(value, bool):
            reason = f"Input should be a number, not {str(value).lower()}"
        elif problem["type"] != "missing" and "input" in problem:
            reason += f" (got {value!r})"
        parts.append(f"{key}: {reason}")
    return "; ".join(parts)


def _resolve_paths(config: Config, base: Path) -> Config:
    """Return `config` with every relative path made absolute against `base`."""

    def resolve(path: Path) -> Path:
        return path if path.is_absolute() else base / path

    initial = None if config.model.initial is None else resolve(config.model.initial)
    maps = None if config.camera.maps is None else resolve(config.camera.maps)
    return config.model_copy(
        update={
            "store": config.store.model_copy(update={"root": resolve(config.store.root)}),
            "ingest": config.ingest.model_copy(
                update={
                    "folder": config.ingest.folder.model_copy(
                        update={"paths": [resolve(p) for p in config.ingest.folder.paths]}
                    )
                }
            ),
            "noise_model": config.noise_model.model_copy(
                update={"path": resolve(config.noise_model.path)}
            ),
            "model": config.model.model_copy(update={"initial": initial}),
            "camera": config.camera.model_copy(update={"maps": maps}),
        }
    )
