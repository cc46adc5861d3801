"""The calibration report figure (PNG): what the noise models learned and how well they fit."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from pn2v_live.core.camera import HOT_FACTOR  # noqa: E402
from pn2v_live.core.noise import NoiseModel  # noqa: E402
from pn2v_live.core.noise.histogram import common_range, pair_counts  # noqa: E402
from pn2v_live.core.noise.poisson_gaussian import mean_variance  # noqa: E402

if TYPE_CHECKING:
    from pn2v_live.core.calibration import CalibrationResult
    from pn2v_live.core.camera import CameraMaps

COLOURS = {"hybrid": "tab:red", "histogram": "tab:orange", "gmm": "tab:green"}
COLOURS["poisson-gaussian"] = "tab:blue"


def quantile_curves(
    model: NoiseModel, signals: torch.Tensor, observations: torch.Tensor, levels=(0.025, 0.975)
) -> np.ndarray:
    """Observation quantiles (len(levels), len(signals)) of p(x | s), integrated on a grid."""
    with torch.no_grad():
        density = model.log_likelihood(observations[:, None], signals[None, :]).exp()
    cdf = torch.cumsum(density, 0)
    cdf = cdf / cdf[-1]
    index = torch.stack(
        [torch.searchsorted(cdf.T.contiguous(), torch.full((len(signals), 1), q)) for q in levels]
    )[..., 0]
    return observations[index.clamp(max=len(observations) - 1)].numpy()


def write_report(result: CalibrationResult, path: str | Path, bins: int = 256) -> Path:
    """Four panels: 2-D histogram with each model's 95 % band, mean–variance points with the
    Poisson–Gaussian line, held-out NLL per model, pairs per signal row (coverage)."""
    signal, observation = result.pairs
    summary = result.summary
    low, high = common_range(signal, observation, bins)
    counts = pair_counts(signal, observation, bins, (low, high))
    figure, axes = plt.subplots(2, 2, figsize=(12, 10))
    title = (
        "bootstrapped noise model (N2V predictions as signal)"
        if summary["bootstrapped"]
        else ("noise-model calibration")
    )
    figure.suptitle(
        f"{title} — {summary['camera'] or 'camera not named'}, {summary['date']}\n"
        f"inputs {', '.join(summary['inputs'])}; {summary['frames']} frames fitted, "
        f"{summary['held_out_frames']} held out; chosen: {result.chosen}"
    )

    ax = axes[0, 0]
    ax.imshow(
        np.log1p(counts.T.numpy()),
        origin="lower",
        extent=(low, high, low, high),
        cmap="gray_r",
        aspect="auto",
    )
    signals = torch.linspace(float(signal.min()), min(high, 1.5 * float(signal.max())), 120)
    grid = torch.linspace(low, high, 2048)
    for kind, model in reversed(result.models.items()):  # the default model drawn on top
        band = quantile_curves(model, signals, grid)
        ax.plot(signals, band[0], color=COLOURS[kind], label=f"{kind} 95 % band", lw=1.2)
        ax.plot(signals, band[1], color=COLOURS[kind], lw=1.2)
    ax.axvline(summary["signal_range"][1], color="k", ls=":", label="calibrated maximum")
    ax.set(
        xlabel="signal s (ADU)",
        ylabel="observation x (ADU)",
        title="pairs (log counts) and p(x | s)",
    )
    ax.legend(loc="upper left", fontsize=8)

    ax = axes[0, 1]
    points = mean_variance(signal, observation)
    pg = result.poisson_gaussian
    ax.scatter(points.signal, points.variance, s=12, color="k", label="binned data")
    line = torch.linspace(float(signal.min()), float(signal.max()), 100)
    ax.plot(
        line,
        pg.variance(line),
        color=COLOURS["poisson-gaussian"],
        label=f"gain {pg.gain:.3g}, offset {pg.offset:.3g}, read noise {pg.read_noise:.3g}",
    )
    ax.set(xlabel="signal (ADU)", ylabel="variance (ADU²)", title="mean–variance")
    ax.legend(fontsize=8)

    ax = axes[1, 0]
    kinds = list(summary["held_out_nll"])
    values = [summary["held_out_nll"][k] for k in kinds]
    ax.bar(kinds, values, color=[COLOURS[k] for k in kinds])
    for i, value in enumerate(values):
        ax.text(i, value, f"{value:.4f}", ha="center", va="bottom")
    ax.set_ylim(min(values) - 0.1 * abs(min(values)) - 0.05, max(values) * 1.02 + 0.05)
    ax.set(ylabel="nats per pixel (lower is better)", title="held-out negative log-likelihood")

    ax = axes[1, 1]
    centres = low + (high - low) * (np.arange(bins) + 0.5) / bins
    ax.semilogy(centres, counts.sum(1).clamp(min=0.5).numpy(), color="k")
    ax.axvline(summary["signal_range"][1], color="k", ls=":")
    ax.set(
        xlabel="signal (ADU)",
        ylabel="pairs per signal row",
        title="coverage: rows with few pairs lean on the parametric model",
    )

    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=90)
    plt.close(figure)
    return path


def write_maps_report(maps: CameraMaps, report: str | Path) -> Path:
    """sCMOS camera maps beside `report` as `<stem>.camera.png`: each map (offset, gain,
    read-noise variance, 1–99 % contrast) over its histogram (log counts), hot pixels marked."""
    report = Path(report)
    path = report.with_name(f"{report.stem}.camera.png")
    figure, axes = plt.subplots(2, 3, figsize=(14, 8))
    hot = maps.hot_pixels()
    figure.suptitle(
        f"camera maps {maps.shape[0]}×{maps.shape[1]} at sensor position {maps.origin}; "
        f"{int(hot.sum())} hot pixels ({hot.mean():.2%}); reference offset "
        f"{maps.reference[0]:.2f} ADU, gain {maps.reference[1]:.3g} ADU/e⁻"
    )
    named = [("offset (ADU)", maps.offset), ("gain (ADU/e⁻)", maps.gain)]
    named.append(("read-noise variance (ADU²)", maps.variance))
    for column, (name, values) in enumerate(named):
        low, high = np.percentile(values, [1, 99])
        shown = axes[0, column].imshow(values, cmap="magma", vmin=low, vmax=high)
        figure.colorbar(shown, ax=axes[0, column], shrink=0.8)
        axes[0, column].set_title(name)
        axes[1, column].hist(values.ravel(), bins=200, log=True, color="k")
        axes[1, column].set(xlabel=name, ylabel="pixels")
    threshold = float(np.median(maps.variance)) * HOT_FACTOR
    axes[1, 2].axvline(threshold, color="tab:red", ls=":", label="hot above")
    axes[1, 2].legend()
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=80)
    plt.close(figure)
    return path
