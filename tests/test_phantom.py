"""Phantom generator: anatomy in realistic HU, emboli, the physics of the thick series, the zip layout
and DICOM that SimpleITK reads back with the right geometry."""

import dataclasses
import io
import math
import zipfile
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from paramkit import merged_params, phantom_params, with_crop

from ctdiff.data.phantom import (
    HU_AIR,
    HU_RANGES,
    Tissue,
    ape_case_numbers,
    case_zip_members,
    make_case,
    slab_slices,
    thick_profile_masses,
    write_case_zip,
    write_phantom_dataset,
)
from ctdiff.params import ParamsError, PhantomParams

SEED = 7
# The default mode (adult anatomy, 0.8 mm pixels, crop centred on a hilum) on a smaller crop.
SMALL = phantom_params(n_cases=3, shape=(24, 48, 48))
# The whole-chest, low-resolution mode: a 320 mm field of view centred on the body.
WHOLE = phantom_params(n_cases=3, shape=(24, 64, 64), pixel_mm=5.0, centre="body")
MEDIASTINUM = [Tissue.FAT, Tissue.SOFT_TISSUE, Tissue.BLOOD, Tissue.HEART]


def _eroded(mask: np.ndarray) -> np.ndarray:
    """In-plane 4-neighbour erosion: voxels whose neighbours share the tissue (no partial volume)."""
    out = mask.copy()
    for axis in (1, 2):
        for shift in (1, -1):
            out &= np.roll(mask, shift, axis=axis)
    return out


def _read_series(folder: Path) -> tuple[sitk.Image, sitk.ImageSeriesReader]:
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    reader.MetaDataDictionaryArrayUpdateOn()
    return reader.Execute(), reader


def _pixel_data(zip_path: Path) -> dict[str, tuple[bytes, str]]:
    """member name -> (PixelData, ImagePositionPatient) for every DICOM in the zip."""
    out = {}
    with zipfile.ZipFile(zip_path) as zf:
        for name in zf.namelist():
            ds = pydicom.dcmread(io.BytesIO(zf.read(name)))
            out[name] = (ds.PixelData, str(ds.ImagePositionPatient))
    return out


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> tuple[Path, list[Path]]:
    raw = tmp_path_factory.mktemp("raw")
    return raw, write_phantom_dataset(raw, SMALL, SEED)


@pytest.fixture(scope="module")
def extracted(dataset, tmp_path_factory) -> tuple[Path, int]:
    """The first APE zip, extracted, and its case number."""
    _, paths = dataset
    zip_path = next(p for p in paths if p.parent.name == "APE")
    out = tmp_path_factory.mktemp("extracted")
    with zipfile.ZipFile(zip_path) as zf:
        zf.extractall(out)
    return out / zip_path.stem, int(zip_path.stem.split("_")[1])


def test_zip_layout_matches_ape_data(dataset):
    raw, paths = dataset
    files = sorted(p.relative_to(raw).as_posix() for p in raw.rglob("*") if p.is_file())
    # The zips, and beside them (never inside) the tissue labels of each case with their class table.
    assert files == sorted([*(p.relative_to(raw).as_posix() for p in paths),
                            *(f"labels/{p.stem}.nii.gz" for p in paths), "labels/classes.json"])
    numbers = sorted(int(p.stem.split("_")[1]) for p in paths)
    assert numbers == [1, 2, 3]  # unique across both categories
    ape = {p for p in paths if p.parent.name == "APE"}
    assert len(ape) == 2 == len(ape_case_numbers(SMALL, SEED))  # round(3 * 0.5) = 2, half up
    assert all(p.parent.name in ("APE", "non-APE") and p.name == f"case_{int(p.stem[5:]):03d}.zip" for p in paths)
    n_thick = SMALL.shape[0] // slab_slices(SMALL)
    for path in paths:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
        assert all(n.startswith(f"{path.stem}/") and n.endswith(".dcm") for n in names)
        assert sum(n.startswith(f"{path.stem}/1/") for n in names) == n_thick
        assert sum(n.startswith(f"{path.stem}/2/") for n in names) == SMALL.shape[0]
    assert not list(raw.rglob(".*"))  # no temporaries left behind


def test_simpleitk_reads_both_series_with_the_phantom_geometry(extracted):
    folder, number = extracted
    case = make_case(number, SMALL, SEED, ape=True)
    thick, thick_reader = _read_series(folder / "1")
    thin, thin_reader = _read_series(folder / "2")

    assert thin.GetSpacing() == pytest.approx(case.thin_spacing_mm) == (0.8, 0.8, 1.0)
    assert thick.GetSpacing() == pytest.approx(case.thick_spacing_mm) == (0.8, 0.8, 5.0)
    assert thin.GetOrigin() == pytest.approx(case.thin_origin_mm)
    assert thick.GetOrigin() == pytest.approx(case.thick_origin_mm)
    assert thin.GetDirection() == pytest.approx(case.direction) == thick.GetDirection()
    assert thin.GetOrigin()[2] < 0  # LPS table positions, documented as negative

    def tag(reader, key):
        return reader.GetMetaData(0, key).strip()

    assert tag(thin_reader, "0020|0052") == tag(thick_reader, "0020|0052")  # FrameOfReferenceUID
    assert tag(thin_reader, "0020|000d") == tag(thick_reader, "0020|000d")  # StudyInstanceUID
    assert tag(thin_reader, "0020|000e") != tag(thick_reader, "0020|000e")  # SeriesInstanceUID
    assert tag(thin_reader, "0010|0010") == f"PHANTOM^CASE{number:03d}"
    assert float(tag(thick_reader, "0018|0050")) == case.thick_thickness_mm == 5.0  # SliceThickness
    assert float(tag(thin_reader, "0018|0050")) == 1.0

    # The stored HU are the generated ones, on the writer's storage grid (intercept -1024, uint16).
    def stored(hu):
        return np.clip(np.rint(hu - -1024.0), 0, 65535) - 1024

    np.testing.assert_array_equal(sitk.GetArrayFromImage(thin), stored(case.thin_hu))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(thick), stored(case.thick_hu))


def weighted_thin_truth(case, p, offset_slices: int = 0) -> np.ndarray:
    """(S, H, W) the thin truth weighted by the thick profile's mass over each thin slice, around each thick
    slice's z (shifted by ``offset_slices``): what a profile fitted on the thin series can at best predict."""
    z = np.arange(case.truth_hu.shape[0]) * p.thin_mm
    centres = (case.slab_starts + (case.slab_slices - 1) / 2 + offset_slices) * p.thin_mm
    weights = thick_profile_masses(p, z, p.thin_mm, centres)
    return np.tensordot(weights / weights.sum(axis=1, keepdims=True), case.truth_hu, axes=(1, 0))


def test_thick_series_is_the_scanner_profile_of_the_field_at_its_physical_z(extracted):
    """The thick slices integrate the field with a bell-shaped profile at their own z: close to the thin truth
    weighted by that profile (not equal: both series integrate a finer field), far from its box average."""
    folder, number = extracted
    case = make_case(number, SMALL, SEED, ape=True)
    thick = sitk.GetArrayFromImage(_read_series(folder / "1")[0]).astype(np.float64)
    thin_img, _ = _read_series(folder / "2")
    n = slab_slices(SMALL)
    box = np.stack([case.truth_hu[k:k + n].mean(axis=0) for k in case.slab_starts])
    weighted = weighted_thin_truth(case, SMALL)
    body = weighted > -950  # away from the -1024 storage floor
    residual = (thick - weighted)[body]
    assert abs(residual.mean()) < 0.5
    box_error = np.abs(case.thick_truth_hu - box)[body].mean()
    profile_error = np.abs(case.thick_truth_hu - weighted)[body].mean()
    assert box_error > 3 * profile_error > 0  # the box is visibly wrong; the profile nearly right, not by construction
    # One thin slice off in z is clearly worse: the test sees the slab position, not just the profile.
    assert np.abs(case.thick_truth_hu - weighted_thin_truth(case, SMALL, 1))[body].mean() > 2 * profile_error
    noise = case.thick_hu - case.thick_truth_hu  # about noise / sqrt(n): the profile spans about n thin slices
    assert noise.std() == pytest.approx(SMALL.noise_hu / math.sqrt(n), rel=0.2)

    thin_residual = sitk.GetArrayFromImage(thin_img) - case.truth_hu
    assert thin_residual[case.truth_hu > -950].std() == pytest.approx(SMALL.noise_hu, rel=0.1)


def test_with_box_profiles_and_no_subsamples_the_thick_series_is_the_box_average():
    """The old physics, as a limit of the new: every profile a box, the field sampled at the thin slices."""
    p = dataclasses.replace(SMALL, z_subsamples=1, thin_blur_mm=0.0, thick_blur_mm=0.0)
    case = make_case(1, p, SEED, ape=False)
    n = slab_slices(p)
    box = np.stack([case.truth_hu[k:k + n].mean(axis=0) for k in case.slab_starts])
    np.testing.assert_allclose(case.thick_truth_hu, box, atol=1e-3)


def test_a_softer_kernel_blurs_the_thick_series_in_plane_only():
    sharp = make_case(1, SMALL, SEED, ape=False)
    soft = make_case(1, dataclasses.replace(SMALL, thick_inplane_blur_mm=3.0), SEED, ape=False)
    np.testing.assert_array_equal(soft.truth_hu, sharp.truth_hu)
    gradient = [np.abs(np.diff(c.thick_truth_hu, axis=2)).mean() for c in (sharp, soft)]
    assert gradient[1] < 0.8 * gradient[0]
    assert soft.thick_truth_hu.mean() == pytest.approx(sharp.thick_truth_hu.mean(), abs=2.0)


def test_thin_series_has_z_detail_that_the_thick_one_loses():
    case = make_case(1, SMALL, SEED, ape=True)
    n, k0 = case.slab_slices, case.slab_start
    depth = case.thick_truth_hu.shape[0] * n
    nearest_slab = np.repeat(case.thick_truth_hu, n, axis=0)
    err = np.abs(nearest_slab - case.truth_hu[k0 : k0 + depth])
    body = case.labels[k0 : k0 + depth] != Tissue.AIR
    assert err[body].mean() > 5.0  # HU: the slab average erases real structure along z
    assert np.percentile(err[body], 99) > 150.0  # vessels crossing slices


@pytest.mark.parametrize("number", [1, 2, 3])
def test_tissues_have_realistic_hu_in_the_whole_chest_mode(number):
    case = make_case(number, WHOLE, SEED, ape=False)
    hu, labels = case.truth_hu, case.labels
    lung = hu[_eroded(labels == Tissue.LUNG)]
    assert lung.mean() == pytest.approx(-850, abs=60)
    artery = hu[_eroded(labels == Tissue.ARTERY)]
    assert artery.size > 50
    assert 250 <= np.median(artery) <= 350
    assert np.mean((artery >= 250) & (artery <= 350)) > 0.95
    bone = hu[(labels == Tissue.BONE_CORTICAL) | (labels == Tissue.BONE_CANCELLOUS)]
    assert bone.size > 100 and bone.mean() > 200
    assert hu[labels == Tissue.BONE_CORTICAL].max() >= HU_RANGES["cortical"][0] - 100  # thin shells: partial volume
    fat = hu[_eroded(labels == Tissue.FAT)]
    assert -120 <= np.median(fat) <= -80
    assert np.all(hu[:, :2, :] == HU_AIR) and np.all(hu[:, :, :2] == HU_AIR)  # air around the body
    assert (labels == Tissue.AIR).mean() > 0.2
    # The noisy series keeps the tissue means.
    assert case.thin_hu[_eroded(labels == Tissue.LUNG)].mean() == pytest.approx(lung.mean(), abs=2)


@pytest.mark.parametrize("number", [1, 2, 3])
def test_ape_cases_have_filling_defects_inside_arteries_and_non_ape_none(number):
    ape = make_case(number, SMALL, SEED, ape=True)
    healthy = make_case(number, SMALL, SEED, ape=False)
    assert healthy.n_emboli == 0 and not (healthy.labels == Tissue.EMBOLUS).any()
    assert 1 <= ape.n_emboli <= 3
    emboli = ape.labels == Tissue.EMBOLUS
    assert emboli.any()
    # Same patient: the emboli sit where the healthy twin has contrast-filled artery...
    assert np.all(healthy.labels[emboli] == Tissue.ARTERY)
    # ...and they only ever lower the density (a filling defect), nowhere else is anything changed.
    changed = ape.truth_hu != healthy.truth_hu
    assert changed.any() and np.all(ape.truth_hu[changed] < healthy.truth_hu[changed])
    assert np.all(np.isin(healthy.labels[changed], [Tissue.ARTERY, Tissue.LUNG, *MEDIASTINUM, Tissue.AIRWAY]))
    core = ape.truth_hu[emboli].min()
    assert core < 120  # the defect's own density (40..60 HU) shows at its core
    assert healthy.truth_hu[emboli].mean() - ape.truth_hu[emboli].mean() > 100
    z_slices = np.unique(np.nonzero(emboli)[0])
    assert 2 <= len(z_slices) <= 24  # a few mm along z at 1 mm slices


def test_same_seed_same_pixels_other_seed_other_pixels(tmp_path):
    p = phantom_params(n_cases=2, shape=(10, 32, 32), pixel_mm=10.0)
    first = write_phantom_dataset(tmp_path / "a", p, seed=3)
    again = write_phantom_dataset(tmp_path / "b", p, seed=3)
    other = write_phantom_dataset(tmp_path / "c", p, seed=4)
    assert [q.relative_to(tmp_path / "a") for q in first] == [q.relative_to(tmp_path / "b") for q in again]
    for x, y in zip(first, again):
        assert _pixel_data(x) == _pixel_data(y)
    for x, y in zip(first, other):
        pixels_x = [v[0] for v in _pixel_data(x).values()]
        pixels_y = [v[0] for v in _pixel_data(y).values()]
        assert pixels_x != pixels_y


def test_patients_vary_but_ape_and_healthy_twins_share_anatomy():
    a, b = make_case(1, SMALL, SEED, ape=False), make_case(2, SMALL, SEED, ape=False)
    assert np.mean(a.labels != b.labels) > 0.05
    assert a.thin_origin_mm[2] != b.thin_origin_mm[2] or not np.array_equal(a.truth_hu, b.truth_hu)
    twin = make_case(1, SMALL, SEED, ape=True)
    assert twin.thin_origin_mm == a.thin_origin_mm and twin.uids == a.uids


def test_slab_must_hold_whole_thin_slices():
    with pytest.raises(ParamsError, match="whole multiple of thin_mm"):
        phantom_params(thin_mm=1.0, thick_mm=2.5)
    with pytest.raises(ValueError, match="cannot hold one"):
        make_case(1, phantom_params(shape=(4, 32, 32), pixel_mm=10.0), SEED, ape=False)


# ------------------------------------------------------------------------ CT-scale anatomy and crops
def test_anatomy_is_adult_sized_whatever_the_pixel_size():
    """The same patient at two pixel sizes over the same field of view: the artery lumen has the same
    size in mm (not in pixels), and so has the body in the whole-chest mode."""
    fine = make_case(1, phantom_params(shape=(24, 96, 96), pixel_mm=0.8), SEED, ape=False)
    coarse = make_case(1, phantom_params(shape=(24, 48, 48), pixel_mm=1.6), SEED, ape=False)
    assert fine.crop_centre_mm == pytest.approx(coarse.crop_centre_mm)
    k = fine.truth_hu.shape[0] // 2

    def artery_mm2(case) -> float:
        return float((case.labels[k] == Tissue.ARTERY).sum()) * case.thin_spacing_mm[0] ** 2

    assert artery_mm2(fine) > 200  # several vessels, a few hundred mm^2
    assert artery_mm2(coarse) == pytest.approx(artery_mm2(fine), rel=0.15)

    def body_width_mm(p: PhantomParams) -> float:
        case = make_case(1, p, SEED, ape=False)
        row = case.labels[case.labels.shape[0] // 2, case.labels.shape[1] // 2]
        return float((row != Tissue.AIR).sum()) * p.pixel_mm

    width = body_width_mm(WHOLE)
    assert 250 <= width <= 300  # 2 * (128..148 mm) at body_mm = 320
    assert body_width_mm(phantom_params(shape=(24, 128, 128), pixel_mm=2.5, centre="body")) == pytest.approx(width,
                                                                                                        abs=5.0)
    assert body_width_mm(phantom_params(shape=(24, 64, 64), pixel_mm=2.5, centre="body", body_mm=160.0)) == (
        pytest.approx(width / 2, abs=5.0))


@pytest.mark.parametrize("number", [1, 2, 3])
def test_default_crop_shows_hilar_arteries_lung_and_mediastinum(number):
    case = make_case(number, phantom_params(), SEED, ape=False)
    assert case.truth_hu.shape == (48, 96, 96) and case.thin_spacing_mm == (0.8, 0.8, 1.0)
    assert case.view in ("left hilum", "right hilum")
    labels, hu = case.labels, case.truth_hu

    def fraction(*tissues: Tissue) -> float:
        return float(np.isin(labels, tissues).mean())

    assert fraction(Tissue.ARTERY) > 0.03
    assert fraction(Tissue.LUNG) > 0.25
    assert fraction(*MEDIASTINUM) > 0.1
    assert fraction(Tissue.SOFT_TISSUE) > 0.005
    assert fraction(Tissue.AIR) == 0.0  # inside the chest
    artery = hu[_eroded(labels == Tissue.ARTERY)]
    assert artery.size > 5000 and 250 <= np.median(artery) <= 350
    assert hu[_eroded(labels == Tissue.LUNG)].mean() == pytest.approx(-850, abs=60)
    assert -120 <= np.median(hu[_eroded(labels == Tissue.FAT)]) <= -80
    # Arteries in every slice (the crop sits at the hila in z too), and wide ones: the main and lobar arteries.
    assert np.all((labels == Tissue.ARTERY).any(axis=(1, 2)))
    assert _eroded(_eroded(_eroded(labels == Tissue.ARTERY))).any()  # some lumen >= 7 px (5.6 mm) across


def test_both_hila_are_chosen_and_the_crop_can_be_placed():
    views = {make_case(n, SMALL, SEED, ape=False).view for n in range(1, 7)}
    assert views == {"left hilum", "right hilum"}
    body = make_case(1, with_crop(SMALL, centre="body"), SEED, ape=False)
    shifted = make_case(1, with_crop(SMALL, centre=(30.0, -20.0)), SEED, ape=False)
    assert body.view == "body" and shifted.view == "30, -20 mm from body"
    assert np.subtract(shifted.crop_centre_mm, body.crop_centre_mm) == pytest.approx((30.0, -20.0, 0.0), abs=0.02)
    assert body.truth_hu.shape == shifted.truth_hu.shape == SMALL.shape
    assert merged_params({"data": {"phantom": {"families": {"hilum": {"centre": [30, -20]}}}}}).data.phantom.centre \
        == (30.0, -20.0)


@pytest.mark.parametrize("number", sorted(ape_case_numbers(phantom_params(), SEED))[:2])
def test_default_ape_cases_have_emboli_inside_the_crop(number):
    ape = make_case(number, phantom_params(), SEED, ape=True)
    healthy = make_case(number, phantom_params(), SEED, ape=False)
    emboli = ape.labels == Tissue.EMBOLUS
    assert ape.n_emboli >= 1 and emboli.sum() >= 20  # several voxels at 0.8 mm
    assert np.all(healthy.labels[emboli] == Tissue.ARTERY)
    assert healthy.truth_hu[emboli].mean() - ape.truth_hu[emboli].mean() > 100


def test_whole_chest_mode_still_works():
    p = phantom_params(n_cases=3, shape=(48, 64, 64), pixel_mm=5.0, centre="body")
    case = make_case(1, p, SEED, ape=True)
    assert case.view == "body" and case.n_emboli >= 1 and (case.labels == Tissue.EMBOLUS).any()
    assert np.all(case.truth_hu[:, :2, :] == HU_AIR) and np.all(case.truth_hu[:, :, -2:] == HU_AIR)
    lung = case.labels == Tissue.LUNG
    half = lung.shape[2] // 2
    assert lung[..., :half].mean() > 0.05 and lung[..., half:].mean() > 0.05  # both lungs in view
    # The body centre is in the middle of the image.
    assert case.crop_centre_mm[:2] == pytest.approx((0.0, 0.0), abs=8.5)


def test_bad_crop_and_spacing_values_name_the_key():
    for value in (2.5, 0.5, -5.0):  # not whole thin slices, under one thin slice, negative
        with pytest.raises(ParamsError, match="data.phantom.thick_spacing_mm"):
            phantom_params(thick_spacing_mm=value)
    with pytest.raises(ParamsError, match="data.phantom.thick_spacing_mm"):
        merged_params({"data": {"phantom": {"thick_spacing_mm": 1.5}}})
    for centre in ("lung", (1.0, 2.0, 3.0), (float("nan"), 0.0)):
        with pytest.raises(ParamsError, match=r"data.phantom.families.\*.centre"):
            phantom_params(centre=centre)
    with pytest.raises(ParamsError, match=r"data.phantom.families.periphery.centre"):
        merged_params({"data": {"phantom": {"families": {"periphery": {"centre": "lung"}}}}})
    with pytest.raises(ParamsError, match="data.phantom.body_mm"):
        phantom_params(body_mm=0.0)


@pytest.mark.parametrize(("spacing", "starts"), [(2.0, range(0, 19, 2)), (7.0, (2, 9, 16)), (5.0, (2, 7, 12, 17))])
def test_thick_slabs_overlap_or_leave_gaps_as_spaced(spacing, starts):
    """24 thin slices, 5 mm slabs: 2 mm spacing overlaps (10 slabs), 7 mm leaves 2 mm gaps (3 slabs,
    centred), 5 mm (= the default 0) is contiguous."""
    # The box profiles of the old physics make the slab arithmetic exact (the default profiles: test above).
    p = dataclasses.replace(SMALL, thick_spacing_mm=spacing, z_subsamples=1, thin_blur_mm=0.0, thick_blur_mm=0.0)
    case = make_case(1, p, SEED, ape=False)
    n = 5
    assert case.slab_slices == n and case.slab_step == round(spacing)
    assert list(case.slab_starts) == list(starts) and case.slab_start == starts[0]
    assert case.thick_spacing_mm == pytest.approx((0.8, 0.8, spacing)) and case.thick_thickness_mm == 5.0
    expected = np.stack([case.truth_hu[k : k + n].mean(axis=0) for k in starts])
    np.testing.assert_allclose(case.thick_truth_hu, expected, atol=1e-3)
    assert case.thick_origin_mm[2] == pytest.approx(case.thin_origin_mm[2] + starts[0] + (n - 1) / 2)
    used = np.zeros(24, int)
    for k in starts:
        used[k : k + n] += 1
    if spacing < n:
        assert used.max() > 1  # thin slices shared by consecutive slabs
    if spacing > n:
        assert np.count_nonzero(used[starts[0] : starts[-1] + n] == 0) == 2 * (len(starts) - 1)  # the gaps
    residual = case.thick_hu - case.thick_truth_hu
    assert residual.std() == pytest.approx(p.noise_hu / math.sqrt(n), rel=0.1)
    if spacing == 5.0:
        contiguous = make_case(1, dataclasses.replace(p, thick_spacing_mm=0.0), SEED, ape=False)
        np.testing.assert_array_equal(case.thick_hu, contiguous.thick_hu)


def test_overlapping_thick_series_in_dicom_has_its_thickness_and_spacing(tmp_path):
    p = dataclasses.replace(SMALL, thick_spacing_mm=3.0)
    case = make_case(1, p, SEED, ape=False)
    zip_path = tmp_path / f"{case.case_id}.zip"
    write_case_zip(zip_path, case_zip_members(case, SEED))
    with zipfile.ZipFile(zip_path) as zf:
        zf.extractall(tmp_path)
    thick, reader = _read_series(tmp_path / case.case_id / "1")
    assert thick.GetSize()[2] == case.thick_hu.shape[0] == (24 - 5) // 3 + 1
    assert thick.GetSpacing()[2] == pytest.approx(3.0)
    assert thick.GetOrigin() == pytest.approx(case.thick_origin_mm)
    assert float(reader.GetMetaData(0, "0018|0050")) == 5.0

