"""The compute device: which one a setting means, what it is, and a warning when a GPU sits idle.

`resolve_device` turns a setting ("auto", "cpu", "cuda", "cuda:N", "mps") into a torch device:
"auto" is CUDA when this torch build can use a GPU, else the CPU. When "auto" falls back to the
CPU although the machine has an NVIDIA GPU (a CPU-only torch wheel, or a CUDA build the driver
cannot run), it logs a WARNING that says so and how to fix it (`unusable_gpu_warning`): the
README's plain `pip install` gives a CPU-only torch on many machines, and everything then just
runs many times slower without a word.

`describe_device` is the one line every log, systemd status, metric, viewer header and CLI
command shows: "cuda:0 (NVIDIA H200), bfloat16" or "CPU, 2 threads, float32"; `torch_build`
says which torch: "torch 2.5.1+cu124, CUDA 12.4" or "torch 2.5.1+cpu, CPU-only build".

The probes for an NVIDIA GPU (`NVIDIA_PROBES`, `nvidia-smi` on PATH) are parameters, so tests
point them at a fake /proc-like folder instead of pretending torch is something it is not.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Iterable
from pathlib import Path

import torch

from pn2v_live.core.model import native_bf16
from pn2v_live.errors import UserError

log = logging.getLogger("pn2v_live.device")

# Any of these existing means an NVIDIA driver is loaded on this machine.
NVIDIA_PROBES: tuple[Path, ...] = (Path("/proc/driver/nvidia/version"), Path("/dev/nvidia0"))
CUDA_WHEELS = "https://download.pytorch.org/whl/cu126"  # a CUDA 12 build of torch
OLD_CUDA_WHEELS = "https://download.pytorch.org/whl/cu118"  # for older drivers


def resolve_device(
    name: str,
    setting: str = "--device",
    probes: Iterable[Path] = NVIDIA_PROBES,
    search_path: str | None = None,
) -> torch.device:
    """The torch device for `name` ("auto", "cpu", "cuda", "cuda:N" or "mps").

    "auto" is CUDA when torch can use a GPU, else the CPU, with a WARNING when an NVIDIA GPU is
    present but unusable (see `unusable_gpu_warning`; `probes` and `search_path` go there). A
    device that is not on this machine is a UserError naming `setting` (a config key such as
    "inference.device", or a CLI option such as "--device")."""
    said = f"{setting} = {name!r}" if not setting.startswith("-") else f"{setting} {name}"
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        warning = unusable_gpu_warning(probes, search_path)
        if warning:
            log.warning("%s", warning)
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(
            f'{said}: not a device; use "auto", "cpu", "cuda", "cuda:N" or "mps"'
        ) from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            hint = unusable_gpu_warning(probes, search_path)
            raise UserError(
                f"{said} but no CUDA GPU is visible; "
                + (f"{hint}" if hint else 'use "auto" or "cpu"')
            )
        if (device.index or 0) >= count:
            raise UserError(
                f"{said} but only {count} CUDA GPU(s) are visible, cuda:0 to "
                f'cuda:{count - 1}; use one of them, "cuda" or "auto"'
            )
    elif device.type == "mps":
        if not torch.backends.mps.is_available():
            raise UserError(f'{said} but MPS is not available here; use "auto" or "cpu"')
    elif device.type != "cpu":
        raise UserError(f'{said}: not supported; use "auto", "cpu", "cuda", "cuda:N" or "mps"')
    return device


def nvidia_gpu_evidence(
    probes: Iterable[Path] = NVIDIA_PROBES, search_path: str | None = None
) -> str | None:
    """The first sign of an NVIDIA GPU on this machine: a probe path that exists, or
    `nvidia-smi` on `search_path` (default: $PATH; "" searches nowhere); None when none."""
    for probe in probes:
        if Path(probe).exists():
            return str(probe)
    return shutil.which("nvidia-smi", path=search_path)


def unusable_gpu_warning(
    probes: Iterable[Path] = NVIDIA_PROBES, search_path: str | None = None
) -> str | None:
    """What to tell the user when this machine has an NVIDIA GPU that torch cannot use (None
    when torch can use a GPU, or when there is none)."""
    if torch.cuda.is_available():
        return None
    evidence = nvidia_gpu_evidence(probes, search_path)
    if evidence is None:
        return None
    return gpu_advice(evidence, torch.__version__, torch.version.cuda)


def gpu_advice(evidence: str, torch_version: str, cuda_build: str | None) -> str:
    """The warning for an NVIDIA GPU (seen at `evidence`) that torch `torch_version`, built for
    CUDA `cuda_build` (None: a CPU-only build), cannot use."""
    if cuda_build is None:
        return (
            f"an NVIDIA GPU is present ({evidence}) but torch {torch_version} is a CPU-only "
            "build, so everything runs on the CPU, many times slower; install a CUDA build of "
            f"torch in this environment: pip install torch --index-url {CUDA_WHEELS} (or the "
            "cu12x at most the 'CUDA Version' that nvidia-smi shows)"
        )
    return (
        f"an NVIDIA GPU is present ({evidence}) but torch {torch_version}, built for CUDA "
        f"{cuda_build}, cannot use it (torch.cuda.is_available() is False), so everything runs "
        f"on the CPU, many times slower; check that the NVIDIA driver supports CUDA {cuda_build} "
        "(nvidia-smi shows the highest 'CUDA Version' it supports) and that CUDA_VISIBLE_DEVICES "
        "does not hide the GPU, or install a torch built for an older CUDA: pip install torch "
        f"--index-url {OLD_CUDA_WHEELS}"
    )


def precision_name(device: torch.device, bf16: bool | None = None) -> str:
    """ "bfloat16" or "float32": what the U-Net body runs in on `device` for a `bf16` setting
    (None: where the device computes it natively, see `core.model.native_bf16`)."""
    return "bfloat16" if (native_bf16(device) if bf16 is None else bf16) else "float32"


def device_name(device: torch.device) -> str:
    """ "cuda:0 (NVIDIA H200)", "CPU, 2 threads" or "mps (Apple GPU)"."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return f"cuda:{index} ({torch.cuda.get_device_name(index)})"
    if device.type == "cpu":
        threads = torch.get_num_threads()
        return f"CPU, {threads} thread{'s' if threads != 1 else ''}"
    if device.type == "mps":
        return "mps (Apple GPU)"
    return str(device)


def describe_device(device: torch.device, bf16: bool | None = None) -> str:
    """ "cuda:0 (NVIDIA H200), bfloat16" or "CPU, 2 threads, float32": the device and the
    precision of the U-Net body for a `bf16` setting (see `precision_name`)."""
    return f"{device_name(device)}, {precision_name(device, bf16)}"


def torch_build() -> str:
    """ "torch 2.5.1+cu124, CUDA 12.4", "torch 2.5.1, ROCm 6.2" or "torch 2.5.1+cpu,
    CPU-only build"."""
    if torch.version.cuda:
        build = f"CUDA {torch.version.cuda}"
    elif getattr(torch.version, "hip", None):
        build = f"ROCm {torch.version.hip}"
    else:
        build = "CPU-only build"
    return f"torch {torch.__version__}, {build}"
