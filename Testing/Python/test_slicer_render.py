"""Offscreen (EGL) render of a slice view with the module's lesion segmentation over the CT.

Slicer's own slice pipeline (slice logic layer blending + the segmentations displayable manager)
renders the nodes the Logic created; the PNG must show lesion-coloured pixels where the lesion is,
and none once the segmentation is hidden.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "Slicer"))
from slicer_harness.fixtures import *  # noqa: E402,F401,F403 - pytest fixtures
from slicer_harness.fixtures import addCtVolume  # noqa: E402

pytestmark = pytest.mark.slicer

SHAPE_KJI = (24, 96, 128)
LESION_BOX = [30, 50, 40, 60, 8, 16]  # i0, i1, j0, j1, k0, k1
LUNGS_BOX = [12, 116, 16, 80, 2, 22]


def lesionPixels(rgb: np.ndarray) -> np.ndarray:
    """Pixels in the lesion colour (warm red fill over a grey CT): red well above green and blue."""
    r, g, b = (rgb[..., c].astype(int) for c in range(3))
    return (r > 120) & (r - g > 60) & (r - b > 60)


def test_slice_view_shows_the_lesion_segmentation(harness, logic, fakeCli, fakeModels, tmp_path):
    from slicer_harness.render import SliceViewRenderer
    from CovidGANSegModuleLib import display, volumeio

    fakeCli.set(lesion_box=LESION_BOX, lungs_box=LUNGS_BOX)
    ijkToRas = np.array([[-1.5, 0, 0, 90.0], [0, -1.5, 0, 70.0], [0, 0, 5.0, -60.0], [0, 0, 0, 1]])
    ct = addCtVolume(SHAPE_KJI, ijkToRas)
    display.styleCtVolume(ct)
    result = logic.segmentLesions(ct, fakeModels["gan"], fakeModels["seg"], "cpu", show=False)
    seg = result["segmentation"]

    renderer = SliceViewRenderer(harness, "Red", size=(384, 384))
    try:
        renderer.show(background=ct)
        renderer.alignTo(ct)
        centreIjk = np.array([(LESION_BOX[0] + LESION_BOX[1] - 1) / 2, (LESION_BOX[2] + LESION_BOX[3] - 1) / 2, 12, 1.0])
        centreRas = (volumeio.ijkToRasArray(ct) @ centreIjk)[:3]
        renderer.jumpTo(centreRas)
        png = tmp_path / "slice.png"
        rgb = renderer.savePNG(png)
        assert png.is_file() and png.stat().st_size > 1000
        lesion = lesionPixels(rgb)
        # 20 x 20 voxels of 1.5 mm in a ~1.06 mm/pixel view: ~800 pixels, minus the outline
        assert lesion.sum() > 300, f"only {lesion.sum()} lesion-coloured pixels"
        x, y = renderer.rasToPixel(centreRas)
        rows, cols = np.nonzero(lesion)
        assert abs(cols.mean() - x) < 6 and abs(rows.mean() - y) < 6, "the lesion is drawn where it is in the CT"
        # grey CT elsewhere: the background is not tinted
        grey = rgb[5:40, 5:40].astype(int)
        assert np.abs(grey[..., 0] - grey[..., 1]).max() <= 2
        # hide the segmentation: the lesion colour disappears
        seg.GetDisplayNode().SetVisibility(False)
        assert lesionPixels(renderer.render()).sum() == 0
    finally:
        renderer.close()
