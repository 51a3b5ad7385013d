"""Quantification: volumes, percent of lung involved, MosMed category bands."""

from __future__ import annotations

import numpy as np
import pytest

from CovidGANSegLib.quantify import CT0_MAX_PERCENT, mosmed_category, percent_of_lung, quantify


def test_volumes_and_percent():
    lung = np.zeros((10, 10, 10), bool)
    lung[:, :, :5] = True  # 500 voxels
    lesion = np.zeros_like(lung)
    lesion[:5, :, :1] = True  # 50 voxels in the lung
    lesion[:, :, 9] = True  # 100 voxels outside the lung: not counted
    q = quantify(lesion, lung, (0.5, 0.5, 4.0))  # 1 mm^3 voxels
    assert q["lung_ml"] == pytest.approx(0.5)
    assert q["lesion_ml"] == pytest.approx(0.05)
    assert q["percent_involved"] == pytest.approx(10.0)
    assert q["mosmed_category"] == "CT-1"
    assert not q["lung_mask_empty"]
    # the percent of lung a mask marks (what the benchmarks and the demo report for normal CTs) is the same figure
    assert percent_of_lung(lesion, lung) == pytest.approx(10.0)
    assert percent_of_lung(lesion.astype(np.uint8), lung) == pytest.approx(10.0)
    assert percent_of_lung(lesion, np.zeros_like(lung)) == 0.0
    with pytest.raises(ValueError, match="differ in shape"):
        percent_of_lung(lesion, lung[:, :, :4])


@pytest.mark.parametrize("percent, category", [
    (0.0, "CT-0"), (CT0_MAX_PERCENT / 2, "CT-0"), (CT0_MAX_PERCENT, "CT-1"), (24.99, "CT-1"), (25.0, "CT-2"),
    (49.9, "CT-2"), (50.0, "CT-3"), (74.9, "CT-3"), (75.0, "CT-4"), (100.0, "CT-4"),
])
def test_mosmed_bands(percent, category):
    assert mosmed_category(percent) == category


def test_tiny_involvement_rule_is_configurable_and_errors():
    assert mosmed_category(0.01) == "CT-0"
    assert mosmed_category(0.01, ct0_max_percent=0.0) == "CT-1"
    assert mosmed_category(0.0, ct0_max_percent=0.0) == "CT-0"
    with pytest.raises(ValueError):
        mosmed_category(-1.0)
    with pytest.raises(ValueError):
        mosmed_category(101.0)
    empty = quantify(np.zeros((3, 3, 3)), np.zeros((3, 3, 3)), (1, 1, 1))
    assert empty["lung_mask_empty"] and empty["percent_involved"] == 0.0 and empty["mosmed_category"] == "CT-0"
    with pytest.raises(ValueError):
        quantify(np.zeros((3, 3, 3)), np.zeros((3, 3, 2)), (1, 1, 1))
    with pytest.raises(ValueError):
        quantify(np.zeros((3, 3, 3)), np.zeros((3, 3, 3)), (1, 1, -1))
