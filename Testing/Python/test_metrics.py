"""Standard metrics vs hand-computed confusion matrices, empty cases, HD95, predecessor protocol."""

from __future__ import annotations

import math

import numpy as np
import pytest

from CovidGANSegLib import metrics


def test_confusion_and_metrics_hand_computed():
    truth = np.zeros((4, 5, 3), bool)
    truth[0, :, 0] = True  # 5 voxels
    truth[1, :, 0] = True  # 10 truth voxels
    pred = np.zeros_like(truth)
    pred[0, :, 0] = True  # 5 TP
    pred[1, :1, 0] = True  # 1 more TP
    pred[3, :2, 2] = True  # 2 FP
    tp, fp, fn, tn = metrics.confusion(pred, truth)
    assert (tp, fp, fn, tn) == (6, 2, 4, 60 - 12)
    m = metrics.volume_metrics(pred, truth, spacing=(1.0, 2.0, 3.0))
    assert m["dice"] == pytest.approx(12 / 18)
    assert m["sensitivity"] == pytest.approx(6 / 10)
    assert m["specificity"] == pytest.approx(48 / 50)
    assert m["precision"] == pytest.approx(6 / 8)
    assert m["abs_volume_diff_ml"] == pytest.approx(2 * 6 / 1000)  # |8 - 10| voxels of 6 mm^3
    assert m["truth_ml"] == pytest.approx(0.06)


def test_tiny_two_by_two():
    pred = np.array([[1, 1], [0, 0]])[..., None]
    truth = np.array([[1, 0], [1, 0]])[..., None]
    m = metrics.volume_metrics(pred, truth)
    assert [m[k] for k in ("dice", "sensitivity", "specificity", "precision")] == [0.5, 0.5, 0.5, 0.5]


def test_empty_conventions():
    z = np.zeros((6, 6, 4), bool)
    both = metrics.volume_metrics(z, z)
    assert both["dice"] == 1.0 and both["hd95_mm"] == 0.0 and both["specificity"] == 1.0
    assert math.isnan(both["sensitivity"]) and math.isnan(both["precision"])
    one = z.copy()
    one[2, 2, 2] = True
    missed = metrics.volume_metrics(z, one)
    assert missed["dice"] == 0.0 and math.isnan(missed["hd95_mm"]) and missed["sensitivity"] == 0.0
    assert math.isnan(missed["precision"])
    false_alarm = metrics.volume_metrics(one, z)
    assert false_alarm["dice"] == 0.0 and math.isnan(false_alarm["hd95_mm"]) and false_alarm["precision"] == 0.0
    assert math.isnan(false_alarm["sensitivity"])


def test_hd95_parallel_sheets_known_distance():
    a = np.zeros((20, 20, 12), bool)
    b = np.zeros_like(a)
    a[:, :, 5] = True
    b[:, :, 8] = True
    assert metrics.hd95(a, b, spacing=(1.0, 1.0, 2.5)) == pytest.approx(7.5)
    assert metrics.hd95(a, a, spacing=(1.0, 1.0, 2.5)) == 0.0
    # two single voxels 3 slices apart, 2 mm slices
    p = np.zeros((5, 5, 6), bool)
    t = np.zeros_like(p)
    p[2, 2, 1] = True
    t[2, 2, 4] = True
    assert metrics.hd95(p, t, spacing=(0.7, 0.7, 2.0)) == pytest.approx(6.0)


def _brute_force_hd95(p, t, spacing):
    sp, st = metrics.surface(p), metrics.surface(t)
    a = np.argwhere(sp) * np.asarray(spacing)
    b = np.argwhere(st) * np.asarray(spacing)
    d = np.sqrt(((a[:, None, :] - b[None, :, :]) ** 2).sum(-1))
    return max(np.percentile(d.min(axis=1), 95), np.percentile(d.min(axis=0), 95))


def test_hd95_matches_brute_force_on_balls():
    g = np.indices((24, 24, 12)).astype(float)
    ball = lambda c, r, s: (((g[0] - c[0]) * s[0]) ** 2 + ((g[1] - c[1]) * s[1]) ** 2 + ((g[2] - c[2]) * s[2]) ** 2) <= r * r  # noqa: E731
    spacing = (0.8, 0.8, 2.0)
    t = ball((11, 11, 6), 7.0, spacing)
    p = ball((13, 10, 5), 5.0, spacing) | ball((4, 4, 2), 2.0, spacing)
    assert metrics.hd95(p, t, spacing) == pytest.approx(_brute_force_hd95(p, t, spacing), rel=1e-9)


def test_slice_metrics_rows():
    truth = np.zeros((8, 8, 3), bool)
    truth[2:4, 2:4, 1] = True
    pred = np.zeros_like(truth)
    pred[2:4, 2:5, 1] = True
    pred[0, 0, 2] = True
    rows = metrics.slice_metrics(pred, truth, spacing=(0.5, 0.5, 5.0))
    assert [r["slice"] for r in rows] == [0, 1, 2]
    assert rows[0]["dice"] == 1.0 and math.isnan(rows[0]["sensitivity"])
    assert rows[1]["dice"] == pytest.approx(8 / 10) and rows[1]["truth_px"] == 4 and rows[1]["pred_px"] == 6
    assert rows[1]["abs_area_diff_mm2"] == pytest.approx(2 * 0.25)
    assert rows[2]["dice"] == 0.0 and rows[2]["precision"] == 0.0


def test_predecessor_protocol_selection_and_relative_threshold():
    shape = (200, 200, 3)
    truth = np.zeros(shape, bool)
    lung = np.zeros(shape, bool)
    prob = np.zeros(shape, np.float32)
    # slice 0: 200 truth px in a 1,000 px lung -> scored
    lung[:20, :50, 0] = True
    truth[:10, :20, 0] = True
    prob[:10, :10, 0] = 0.15  # above 0.2 x 0.5 = 0.1 -> predicted
    prob[10, 0, 0] = 0.5  # slice maximum, a false positive
    prob[15, 0, 0] = 0.05  # below 0.1 -> not predicted
    # slice 1: only 150 truth px (<= 163) -> skipped
    lung[:, :, 1] = True
    truth[:10, :15, 1] = True
    # slice 2: 200 truth px but under 1 % of a 40,000 px lung -> skipped
    lung[:, :, 2] = True
    truth[:10, :20, 2] = True
    rows = metrics.predecessor_slice_protocol(prob, truth, lung)
    assert [r["slice"] for r in rows] == [0]
    r = rows[0]
    # TP 100, FP 1, FN 100
    assert r["sensitivity"] == pytest.approx(100 / 200)
    assert r["precision"] == pytest.approx(100 / 101)
    assert r["dice"] == pytest.approx(200 / 301)


def test_summarise_and_shape_errors():
    s = metrics.summarise([0.5, 1.0, float("nan")])
    assert s["mean"] == pytest.approx(0.75) and s["std"] == pytest.approx(np.std([0.5, 1.0], ddof=1)) and s["n"] == 2
    assert metrics.summarise([float("nan")]) == {"mean": None, "std": None, "n": 0}
    assert metrics.summarise([0.3])["std"] == 0.0
    with pytest.raises(ValueError):
        metrics.confusion(np.zeros((2, 2)), np.zeros((2, 3)))
    with pytest.raises(ValueError):
        metrics.volume_metrics(np.zeros((2, 2, 2)), np.zeros((2, 2, 2)), spacing=(1, 0, 1))
