"""NIfTI I/O: canonical orientation with an exact way back, and a clear error for each bad input."""

from __future__ import annotations

import gzip
import io

import nibabel as nib
import numpy as np
import pytest

from CovidGANSegLib.errors import InputError
from CovidGANSegLib.nifti import CTVolume, load_ct, load_mask, save_array, save_like

LAS = np.array([[-0.7, 0, 0, 180.0], [0, 0.7, 0, -170.0], [0, 0, 8.0, -120.0], [0, 0, 0, 1]])


def _ct_array(shape=(24, 20, 12), seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(-1024, 1500, size=shape).astype(np.int16)


def _write(path, data, affine=LAS, **header):
    img = nib.Nifti1Image(data, affine)
    for key, value in header.items():
        img.header[key] = value
    nib.save(img, str(path))
    return path


def _patch_header(src, dst, **fields):
    """Copy a .nii.gz with header fields changed *after* nibabel's save (which would fix them)."""
    raw = gzip.decompress(src.read_bytes())
    hdr = nib.Nifti1Header.from_fileobj(io.BytesIO(raw), check=False)
    for key, value in fields.items():
        hdr[key] = value
    dst.write_bytes(gzip.compress(hdr.binaryblock + raw[348:]))
    return dst


def _expect(path, match, **kwargs):
    with pytest.raises(InputError, match=match) as info:
        load_ct(path, **kwargs)
    assert str(info.value).startswith(str(path)), "the message must name the file"
    assert info.value.path == path


def test_load_reorients_and_goes_back_exactly(tmp_path):
    data = _ct_array()
    path = _write(tmp_path / "ct.nii.gz", data)
    ct = load_ct(path)
    assert ct.array.dtype == np.float32
    assert ct.spacing == pytest.approx((0.7, 0.7, 8.0))
    assert np.allclose(np.diag(ct.affine)[:3], [0.7, 0.7, 8.0])  # RAS+: positive diagonal
    assert np.array_equal(ct.array, data[::-1].astype(np.float32))  # LAS -> RAS flips x
    assert np.array_equal(ct.to_original(ct.array), data)
    # world coordinates of a voxel agree between the file grid and the canonical grid
    i, j, k = 3, 5, 7
    world_file = LAS @ [i, j, k, 1]
    world_canon = ct.affine @ [data.shape[0] - 1 - i, j, k, 1]
    assert np.allclose(world_file, world_canon)
    out = save_like(ct.array > 0, ct, tmp_path / "mask.nii.gz", dtype=np.uint8)
    img = nib.load(str(out))
    assert img.shape == data.shape and np.allclose(img.affine, LAS)
    assert np.array_equal(np.asarray(img.dataobj) > 0, data > 0)
    assert np.array_equal(load_mask(out, ct), ct.array > 0)


def test_scaled_integers_and_4d_single_volume(tmp_path):
    data = _ct_array()
    img = nib.Nifti1Image(((data.astype(np.float32) + 1024) / 2).astype(np.int16), LAS)
    img.header.set_slope_inter(2.0, -1024.0)
    nib.save(img, str(tmp_path / "scaled.nii.gz"))
    ct = load_ct(tmp_path / "scaled.nii.gz")
    assert np.allclose(ct.to_original(ct.array), (data // 2) * 2, atol=2)
    path = _write(tmp_path / "one.nii", data[..., None])
    assert load_ct(path).shape == data.shape


def test_from_array_matches_load(tmp_path):
    data = _ct_array()
    path = _write(tmp_path / "ct.nii", data)
    a, b = load_ct(path), CTVolume.from_array(data, LAS)
    assert np.array_equal(a.array, b.array) and np.allclose(a.affine, b.affine)


def test_missing_and_not_a_file(tmp_path):
    _expect(tmp_path / "missing.nii.gz", "file not found")
    (tmp_path / "folder.nii.gz").mkdir()
    _expect(tmp_path / "folder.nii.gz", "not a file")


def test_unreadable_files(tmp_path):
    (tmp_path / "text.nii").write_bytes(b"this is not an image" * 40)
    _expect(tmp_path / "text.nii", "not a NIfTI image")
    (tmp_path / "gztext.nii.gz").write_bytes(gzip.compress(b"hello" * 200))
    _expect(tmp_path / "gztext.nii.gz", "not a NIfTI image")
    (tmp_path / "notgz.nii.gz").write_bytes(b"plain bytes, no gzip" * 30)
    _expect(tmp_path / "notgz.nii.gz", "gzip")
    (tmp_path / "tiny.nii").write_bytes(b"12")
    _expect(tmp_path / "tiny.nii", "not a NIfTI image")


def test_truncated_and_corrupt_gzip(tmp_path):
    good = _write(tmp_path / "good.nii.gz", _ct_array())
    raw = good.read_bytes()
    (tmp_path / "trunc.nii.gz").write_bytes(raw[: len(raw) // 2])
    _expect(tmp_path / "trunc.nii.gz", "corrupt or truncated gzip")
    corrupt = bytearray(raw)
    corrupt[len(raw) // 2: len(raw) // 2 + 64] = bytes(64)
    (tmp_path / "corrupt.nii.gz").write_bytes(bytes(corrupt))
    _expect(tmp_path / "corrupt.nii.gz", "corrupt or truncated gzip")
    plain = _write(tmp_path / "plain.nii", _ct_array())
    data = plain.read_bytes()
    (tmp_path / "trunc.nii").write_bytes(data[: len(data) - 1000])
    _expect(tmp_path / "trunc.nii", "truncated")


def test_not_3d(tmp_path):
    data = _ct_array()
    _expect(_write(tmp_path / "2d.nii.gz", data[:, :, 0]), "expected a 3D volume")
    _expect(_write(tmp_path / "4d.nii.gz", np.stack([data, data], axis=-1)), "expected a 3D volume")
    _expect(_write(tmp_path / "slice.nii.gz", data[:, :, :1]), "expected a 3D volume")


def test_non_finite(tmp_path):
    for value, name in ((np.nan, "nan"), (np.inf, "inf")):
        data = _ct_array().astype(np.float32)
        data[2, 3, 4] = value
        _expect(_write(tmp_path / f"{name}.nii.gz", data), "NaN or infinite")


def test_not_hounsfield_units(tmp_path):
    data = _ct_array().astype(np.float32)
    unit = (data + 1024) / 2524
    _expect(_write(tmp_path / "unit.nii.gz", unit), "not Hounsfield units")
    bytes255 = np.round(unit * 255).astype(np.uint8)
    _expect(_write(tmp_path / "u8.nii.gz", bytes255), "not Hounsfield units")


def test_zero_or_negative_spacing(tmp_path):
    good = _write(tmp_path / "good.nii.gz", _ct_array())
    _expect(_patch_header(good, tmp_path / "zero_sform.nii.gz", srow_y=[0, 0, 0, 0], qform_code=0, sform_code=1),
            "spacing must be positive")
    _expect(_patch_header(good, tmp_path / "zero_pixdim.nii.gz", pixdim=[1, 0.7, 0.0, 8, 1, 1, 1, 1],
                          qform_code=0, sform_code=0), "spacing must be positive")
    _expect(_patch_header(good, tmp_path / "neg_pixdim.nii.gz", pixdim=[1, -0.7, 0.7, 8, 1, 1, 1, 1],
                          qform_code=1, sform_code=0), "spacing must be positive")
    _expect(_patch_header(good, tmp_path / "nan_affine.nii.gz", srow_x=[np.nan, 0, 0, 0], qform_code=0, sform_code=1),
            "non-finite")


def test_too_few_slices(tmp_path):
    path = _write(tmp_path / "short.nii.gz", _ct_array((16, 16, 10)))
    _expect(path, "10 slices, fewer than the 32 required", min_slices=32)
    assert load_ct(path, min_slices=10).shape == (16, 16, 10)


def test_mask_on_another_grid(tmp_path):
    ct = load_ct(_write(tmp_path / "ct.nii.gz", _ct_array()))
    other = save_array(np.ones((10, 10, 10), np.uint8), LAS, tmp_path / "m.nii.gz", dtype=np.uint8)
    with pytest.raises(InputError, match="does not match the CT grid"):
        load_mask(other, ct)


def test_nifti2_extensions_and_trailing_bytes_read_as_before(tmp_path):
    data = _ct_array()
    two = nib.Nifti2Image(data, LAS)
    nib.save(two, str(tmp_path / "two.nii.gz"))
    assert np.array_equal(load_ct(tmp_path / "two.nii.gz").to_original(load_ct(tmp_path / "two.nii.gz").array), data)
    ext = nib.Nifti1Image(data, LAS)
    ext.header.extensions.append(nib.nifti1.Nifti1Extension("comment", b"a comment extension" * 20))
    nib.save(ext, str(tmp_path / "ext.nii"))
    assert np.array_equal(load_ct(tmp_path / "ext.nii").to_original(load_ct(tmp_path / "ext.nii").array), data)
    raw = (tmp_path / "ext.nii").read_bytes()
    (tmp_path / "trailing.nii.gz").write_bytes(gzip.compress(raw + b"\0" * 1000))
    assert load_ct(tmp_path / "trailing.nii.gz").shape == load_ct(tmp_path / "ext.nii").shape


def test_implausible_spacing_and_singular_affine(tmp_path):
    good = _write(tmp_path / "good.nii.gz", _ct_array())
    _expect(_patch_header(good, tmp_path / "tiny.nii.gz", srow_x=[-1e-4, 0, 0, 180], qform_code=0, sform_code=1),
            r"implausible for a CT \(each must be within 0.05..20 mm\)")
    _expect(_patch_header(good, tmp_path / "huge.nii.gz", srow_z=[0, 0, 1e4, -120], qform_code=0, sform_code=1), "implausible")
    _expect(_patch_header(good, tmp_path / "singular.nii.gz", srow_y=[-0.7, 0, 0, -170], qform_code=0, sform_code=1), "singular")
    oblique = LAS.copy()
    c, s = np.cos(np.radians(30)), np.sin(np.radians(30))
    oblique[:3, :3] = oblique[:3, :3] @ np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])
    assert load_ct(_write(tmp_path / "oblique.nii.gz", _ct_array(), oblique)).shape == (24, 20, 12)


def test_blank_volumes_have_no_lungs(tmp_path):
    for value in (-1000, 40):
        _expect(_write(tmp_path / f"blank{value}.nii.gz", np.full((16, 16, 8), value, dtype=np.int16)), "no lungs found")
