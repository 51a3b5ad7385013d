"""Tissue labels of a phantom's label map (:attr:`Phantom.labels`)."""

from __future__ import annotations

LABELS = {
    "air": 0, "fat": 1, "muscle": 2, "bone": 3, "lung": 4, "vessel": 5, "airway": 6,
    "soft_tissue": 7, "table": 8, "cartilage": 9, "organ": 10,
}
