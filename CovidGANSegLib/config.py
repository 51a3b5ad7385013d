"""Preprocessing parameters (paper section 4.1 and its predecessor), in one place.

Conventions used throughout the library:

* Arrays read from NIfTI are reoriented to the closest canonical orientation (RAS+) and indexed
  ``(x, y, z)``; ``nifti.CTVolume`` keeps what is needed to go back to the file's own grid exactly.
* Model-grid arrays are ``(D, H, W)`` = ``(z, y, x)`` so that torch sees ``(B, C, D, H, W)`` with
  D the slice axis. Sizes and spacings in this config are given ``(x, y, z)`` like the paper
  ("128 x 128 x 32", "2 x 2 x 8 mm"); use the ``*_dhw`` properties for model-grid order.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any


def dataclass_to_dict(obj: Any) -> dict[str, Any]:
    """A config dataclass as JSON-ready data (tuples become lists)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(obj).items()}


def dataclass_from_dict(cls: type, data: dict[str, Any], what: str, *, tuples: bool = True) -> Any:
    """Build config dataclass ``cls`` from JSON data, refusing unknown keys (``ValueError``).

    ``what`` names the keys in the message ("unknown <what>: [...]"); with ``tuples`` lists
    become tuples, as the frozen configs store them.
    """
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise ValueError(f"unknown {what}: {sorted(unknown)} (known: {sorted(names)})")
    return cls(**{k: tuple(v) if tuples and isinstance(v, list) else v for k, v in data.items()})


@dataclass(frozen=True)
class PreprocessConfig:
    """All preprocessing parameters, with the paper's defaults.

    Attributes:
        hu_window: HU clip window mapped linearly to [0, 1].
        target_spacing: resampling spacing in mm, (x, y, z).
        grid: model grid size in voxels, (x, y, z). For mild (small) lesions a 256 x 256 grid
            needs a finer ``target_spacing`` too (e.g. 1.2 mm): at 2 mm an adult lung box of
            about 300 mm fills only 150 of its 256 pixels.
        lung_margin_mm: margin kept around the lung bounding box when cropping.
        min_slices: training volumes with fewer slices are skipped (paper section 3.1).
    """

    hu_window: tuple[float, float] = (-1000.0, 400.0)
    target_spacing: tuple[float, float, float] = (2.0, 2.0, 8.0)
    grid: tuple[int, int, int] = (128, 128, 32)
    lung_margin_mm: float = 10.0
    min_slices: int = 32

    def __post_init__(self) -> None:
        lo, hi = self.hu_window
        if not lo < hi:
            raise ValueError(f"hu_window must be (low, high) with low < high, got {self.hu_window}")
        if len(self.target_spacing) != 3 or min(self.target_spacing) <= 0:
            raise ValueError(f"target_spacing must be three positive mm values, got {self.target_spacing}")
        if len(self.grid) != 3 or min(self.grid) < 4:
            raise ValueError(f"grid must be three sizes of at least 4 voxels, got {self.grid}")
        if self.lung_margin_mm < 0:
            raise ValueError(f"lung_margin_mm must be >= 0, got {self.lung_margin_mm}")
        if self.min_slices < 1:
            raise ValueError(f"min_slices must be >= 1, got {self.min_slices}")

    @property
    def grid_dhw(self) -> tuple[int, int, int]:
        """Model grid as ``(D, H, W)`` = (slices, rows, columns)."""
        x, y, z = self.grid
        return (z, y, x)

    @property
    def spacing_dhw(self) -> tuple[float, float, float]:
        x, y, z = self.target_spacing
        return (z, y, x)

    def to_dict(self) -> dict[str, Any]:
        return dataclass_to_dict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "PreprocessConfig":
        return dataclass_from_dict(cls, data, "preprocessing parameters")

    @classmethod
    def from_json(cls, path: str | Path) -> "PreprocessConfig":
        return cls.from_dict(json.loads(Path(path).read_text()))


DEFAULT_PREPROCESS = PreprocessConfig()
