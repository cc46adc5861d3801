"""Physical sizes of an image's axes (pixel size, z step, frame interval) and their OME-NGFF form.

OME-NGFF keeps them as a `scale` coordinate transformation (one factor per axis t, c, z, y, x)
and a `unit` per axis: seconds for t, micrometres for z, y and x. An unknown size is a factor of
1 without a unit (pixels, frames).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Real

TIME_UNIT = "second"
SPACE_UNIT = "micrometer"


@dataclass(frozen=True)
class Physical:
    """Pixel size (y, x) and z step in µm, frame interval in s; None where unknown.

    Raises ValueError for a size that is not a positive finite number.
    """

    pixel_size_um: tuple[float, float] | None = None
    z_step_um: float | None = None
    interval_s: float | None = None

    def __post_init__(self) -> None:
        if self.pixel_size_um is not None:
            sizes = tuple(self.pixel_size_um)
            if len(sizes) != 2:
                raise ValueError(f"pixel size must be [y, x] in µm, got {list(sizes)}")
            object.__setattr__(
                self, "pixel_size_um", tuple(_positive("pixel size", v) for v in sizes)
            )
        if self.z_step_um is not None:
            object.__setattr__(self, "z_step_um", _positive("z step", self.z_step_um))
        if self.interval_s is not None:
            object.__setattr__(self, "interval_s", _positive("frame interval", self.interval_s))

    @property
    def known(self) -> bool:
        """Whether any size is known."""
        return (self.pixel_size_um, self.z_step_um, self.interval_s) != (None, None, None)

    def ngff_axes(self) -> list[dict[str, str]]:
        """OME-NGFF axes t, c, z, y, x, with units where the size is known."""
        units = {
            "t": TIME_UNIT if self.interval_s is not None else None,
            "z": SPACE_UNIT if self.z_step_um is not None else None,
            "y": SPACE_UNIT if self.pixel_size_um is not None else None,
            "x": SPACE_UNIT if self.pixel_size_um is not None else None,
        }
        types = {"t": "time", "c": "channel", "z": "space", "y": "space", "x": "space"}
        axes = [{"name": name, "type": kind} for name, kind in types.items()]
        return [
            axis | ({"unit": units[axis["name"]]} if units.get(axis["name"]) else {})
            for axis in axes
        ]

    def ngff_scale(self) -> list[float]:
        """The OME-NGFF scale of axes t, c, z, y, x (1 where unknown)."""
        y, x = self.pixel_size_um or (1.0, 1.0)
        return [self.interval_s or 1.0, 1.0, self.z_step_um or 1.0, y, x]

    @classmethod
    def from_ngff(cls, axes: list[dict], scale: list[float]) -> Physical:
        """The sizes an OME-NGFF image's axes and scale give (as written by `ngff_axes` and
        `ngff_scale`): those of axes with a unit."""
        sized = {
            axis["name"]: float(factor)
            for axis, factor in zip(axes, scale, strict=True)
            if axis.get("unit") in (TIME_UNIT, SPACE_UNIT)
        }
        pixel = (sized["y"], sized["x"]) if {"y", "x"} <= sized.keys() else None
        return cls(pixel, sized.get("z"), sized.get("t"))

    def as_dict(self) -> dict[str, object]:
        """The known sizes as JSON: pixel_size_um [y, x], z_step_um, interval_s."""
        values = {
            "pixel_size_um": list(self.pixel_size_um) if self.pixel_size_um else None,
            "z_step_um": self.z_step_um,
            "interval_s": self.interval_s,
        }
        return {key: value for key, value in values.items() if value is not None}


def _positive(what: str, value: object) -> float:
    """`value` as a float when it is a positive finite number (not a bool), else ValueError."""
    if isinstance(value, bool) or not isinstance(value, Real):
        raise ValueError(f"{what} must be a number, got {value!r}")
    number = float(value) if -1e308 < value < 1e308 else math.inf  # huge integers: no overflow
    if not (math.isfinite(number) and number > 0):
        raise ValueError(f"{what} must be a positive finite number, got {value!r}")
    return number
