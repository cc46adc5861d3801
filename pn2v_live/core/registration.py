"""Registration of frames: the shift between two frames of a scene, and a frame moved by it.

A temporal window is registered before the network sees it (`context.window`): every other
frame of the window is moved by its integer shift against frame t, so a drifting sample looks
static to the network and to the residual prior offset, and the pixels a moved frame does not
cover become missing (NaN). Frame t's pixels enter only through that one global integer shift,
estimated from all of its pixels, so the blind spot holds.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Hashable

import numpy as np

MIN_CORRELATION = 0.2  # peak correlation needed to measure a shift at all (else: none)
WHITENING = 0.5  # registration's power of the cross-power spectrum's magnitude taken out
CACHED_SHIFTS = 65536  # frame pairs whose shift `Shifts` remembers


def shift_between(frame: np.ndarray, reference: np.ndarray) -> tuple[float, float] | None:
    """(dy, dx) px by which `frame` (Y, X) is displaced against `reference` (Y, X): the
    `correlation_peak`, refined to sub-pixel by a parabola through its neighbours; None when
    there is nothing to register on."""
    found = correlation_peak(frame, reference)
    if found is None:
        return None
    correlation, peak = found
    shift = []
    for axis, p in enumerate(peak):
        n = correlation.shape[axis]
        before, at, after = (
            correlation[tuple((p + d) % n if a == axis else q for a, q in enumerate(peak))]
            for d in (-1, 0, 1)
        )
        curvature = before - 2 * at + after
        vertex = 0.5 * (before - after) / curvature if curvature < 0 else 0.0
        shift.append(float(p - n // 2 + vertex))
    return shift[0], shift[1]


def whole_shift(frame: np.ndarray, reference: np.ndarray) -> tuple[int, int]:
    """The whole-pixel (dy, dx) by which `frame` (Y, X) is displaced against `reference`
    (Y, X): the peak of their cross-correlation with the spectrum partly whitened (WHITENING),
    which is sharp where the plain one is broad (smooth, bright structures); (0, 0) when there
    is nothing to register on."""
    found = correlation_peak(frame, reference, WHITENING)
    if found is None:
        return 0, 0
    correlation, (py, px) = found
    return py - correlation.shape[0] // 2, px - correlation.shape[1] // 2


def correlation_peak(
    frame: np.ndarray, reference: np.ndarray, whitening: float = 0.0
) -> tuple[np.ndarray, tuple[int, int]] | None:
    """The (Y, X) FFT cross-correlation of `frame` and `reference` (Y, X each), zero shift at
    the centre, its cross-power spectrum divided by its magnitude to the power `whitening`, and
    the position of its peak; None when the peak of the plain correlation stays below
    MIN_CORRELATION (no structure shared by both frames)."""
    frame = frame - frame.mean(dtype=np.float64)
    reference = reference - reference.mean(dtype=np.float64)
    spectrum = np.fft.rfft2(frame) * np.conj(np.fft.rfft2(reference))
    correlation = np.fft.irfft2(spectrum, s=frame.shape)
    energy = np.sqrt(np.sum(frame**2, dtype=np.float64) * np.sum(reference**2, dtype=np.float64))
    if energy == 0 or not correlation.max() >= MIN_CORRELATION * energy:
        return None
    if whitening:
        spectrum /= np.maximum(np.abs(spectrum), np.finfo(spectrum.real.dtype).tiny) ** whitening
        correlation = np.fft.irfft2(spectrum, s=frame.shape)
    correlation = np.fft.fftshift(correlation)
    peak = np.unravel_index(np.argmax(correlation), correlation.shape)
    return correlation, (int(peak[0]), int(peak[1]))


def moved(frame: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """`frame` (Y, X) float moved by (dy, dx) whole pixels (content at (y, x) goes to
    (y + dy, x + dx)); pixels it no longer covers are NaN."""
    result = np.full_like(frame, np.nan)
    height, width = frame.shape
    if abs(dy) >= height or abs(dx) >= width:
        return result
    target = (slice(max(dy, 0), height + min(dy, 0)), slice(max(dx, 0), width + min(dx, 0)))
    source = (slice(max(-dy, 0), height + min(-dy, 0)), slice(max(-dx, 0), width + min(-dx, 0)))
    result[target] = frame[source]
    return result


class Shifts:
    """Integer shifts measured between frames, keyed by (series, n, t), the newest `limit`
    pairs kept; thread-safe, so the stages of one daemon measure each pair once between them."""

    def __init__(self, limit: int = CACHED_SHIFTS) -> None:
        self.limit = limit
        self._shifts: OrderedDict[tuple[Hashable, int, int], tuple[int, int]] = OrderedDict()
        self._lock = threading.Lock()

    def series(self, name: Hashable) -> Registration:
        """The `Registration` of the series `name` (e.g. an acquisition's `identity`), with these
        shifts."""
        return Registration(self, name)

    def get(self, key: tuple[Hashable, int, int]) -> tuple[int, int] | None:
        with self._lock:
            shift = self._shifts.get(key)
            if shift is not None:
                self._shifts.move_to_end(key)
            return shift

    def put(self, key: tuple[Hashable, int, int], shift: tuple[int, int]) -> None:
        with self._lock:
            self._shifts[key] = shift
            while len(self._shifts) > self.limit:
                self._shifts.popitem(last=False)


class Registration:
    """Integer shifts between frames of one series (an acquisition, a file), each pair measured
    once: frames are named by their frame numbers and do not change under them. The shifts are
    kept in `shifts` (new ones by default) under the series' `name`."""

    def __init__(self, shifts: Shifts | None = None, name: Hashable = None) -> None:
        self._shifts = Shifts() if shifts is None else shifts
        self._name = name
        self._origin = 0

    def from_frame(self, first: int) -> Registration:
        """This registration (sharing its measured shifts) for a part of the series whose frame
        0 is frame `first` of the whole."""
        part = Registration(self._shifts, self._name)
        part._origin = self._origin + first
        return part

    def align(self, frame: np.ndarray, n: int, reference: np.ndarray, t: int) -> np.ndarray:
        """Frame `n` (Y, X) moved onto frame `t` (Y, X) by their integer shift (unmoved when
        none can be measured), NaN where it does not reach."""
        key = (self._name, self._origin + n, self._origin + t)
        shift = self._shifts.get(key)
        if shift is None:
            shift = whole_shift(frame, reference)
            self._shifts.put(key, shift)
        dy, dx = shift
        return moved(frame, -dy, -dx) if dy or dx else frame
