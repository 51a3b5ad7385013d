"""Dataset discovery: MosMedData and plain layouts, the slice-count rule, evaluation-only masks."""

from __future__ import annotations

import logging

import nibabel as nib
import numpy as np
import pytest

from CovidGANSegLib.datasets import discover_studies, lesion_mask_path, slice_count
from CovidGANSegLib.errors import InputError

AFFINE = np.diag([-0.7, 0.7, 8.0, 1.0])


def _vol(path, slices, affine=AFFINE, axis=2):
    shape = [8, 8, 8]
    shape[axis] = slices
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.full(shape, -1000, np.int16), affine), str(path))
    return path


def _mosmed(root, counts):
    for cat, names in counts.items():
        for name, slices in names:
            _vol(root / "studies" / cat / f"{name}.nii.gz", slices)
    return root


def test_mosmed_layout_order_and_skip(tmp_path, caplog):
    root = _mosmed(tmp_path / "mosmed", {
        "CT-0": [("study_0002", 40), ("study_0001", 36)],
        "CT-1": [("study_0300", 33), ("study_0255", 20)],
        "CT-3": [("study_1100", 32)],
    })
    (root / "studies" / "CT-2").mkdir()
    (root / "studies" / "CT-0" / "notes.txt").write_text("ignored")
    with caplog.at_level(logging.WARNING, logger="CovidGANSegLib.datasets"):
        studies = discover_studies(root)
    assert [s.id for s in studies] == ["study_0001", "study_0002", "study_0300", "study_1100"]
    assert [s.category for s in studies] == ["CT-0", "CT-0", "CT-1", "CT-3"]
    assert [s.covid for s in studies] == [False, False, True, True]
    assert all(s.path.is_file() for s in studies)
    assert "study_0255" in caplog.text and "20 slices" in caplog.text
    assert discover_studies(root) == studies  # deterministic
    assert [s.id for s in discover_studies(root / "studies")] == [s.id for s in studies]  # root may be studies/
    assert len(discover_studies(root, min_slices=1)) == 5


def test_plain_layout(tmp_path):
    root = tmp_path / "plain"
    _vol(root / "healthy" / "b.nii.gz", 32)
    _vol(root / "healthy" / "a.nii", 32)
    _vol(root / "covid" / "c.nii.gz", 40)
    studies = discover_studies(root)
    assert [(s.id, s.covid, s.category) for s in studies] == [("a", False, None), ("b", False, None), ("c", True, None)]


def test_slice_axis_from_orientation(tmp_path):
    # slices along the first file axis (the axis that points superior in the affine)
    affine = np.array([[0, 0, 0.7, 0], [0, 0.7, 0, 0], [8.0, 0, 0, 0], [0, 0, 0, 1]])
    path = _vol(tmp_path / "sag.nii.gz", 40, affine=affine, axis=0)
    assert slice_count(path) == 40


def test_bad_folders(tmp_path):
    with pytest.raises(InputError, match="not found"):
        discover_studies(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no data set found"):
        discover_studies(tmp_path / "empty")
    root = tmp_path / "dup"
    _vol(root / "healthy" / "x.nii.gz", 32)
    _vol(root / "covid" / "x.nii.gz", 32)
    with pytest.raises(InputError, match="appears twice"):
        discover_studies(root)


def test_unreadable_header_is_named(tmp_path):
    root = tmp_path / "bad"
    _vol(root / "healthy" / "ok.nii.gz", 32)
    bad = root / "covid" / "broken.nii.gz"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"garbage" * 10)
    with pytest.raises(InputError) as info:
        discover_studies(root)
    assert str(bad) in str(info.value)


def test_lesion_mask_path_is_for_evaluation(tmp_path):
    root = _mosmed(tmp_path / "m", {"CT-1": [("study_0255", 33)]})
    assert lesion_mask_path(root, "study_0255") is None
    mask = root / "masks" / "study_0255_mask.nii.gz"
    _vol(mask, 33)
    assert lesion_mask_path(root, "study_0255") == mask
    assert lesion_mask_path(root / "studies", "study_0255") == mask
    assert lesion_mask_path(root, "study_0001") is None
