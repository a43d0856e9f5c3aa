"""Synthetic CT phantoms: labels, intensities, physical size across spacings, reproducibility."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import ndimage

from autoliver.examples import phantom
from autoliver.examples.phantom import SOFT_TISSUE_HU, TUMOUR_CONTRAST_HU, make_phantom, write_phantom_dataset
from autoliver.io.dataset import open_dataset
from autoliver.io.images import read_image

# 200 x 320 x 320 mm: the liver, the lung bases and the kidneys are all in view
SHAPE, SPACING = (80, 160, 160), (2.5, 2.0, 2.0)


@pytest.fixture(scope="module")
def case():
    image, label = make_phantom(SHAPE, SPACING, np.random.default_rng(7), n_tumours=3,
                                tumour_radius_mm=(6.0, 10.0), liver_hu=100.0, noise_hu=10.0)
    return image, label


def ml(mask: np.ndarray, spacing) -> float:
    return float(np.count_nonzero(mask) * np.prod(spacing) / 1000.0)


def test_types_and_label_values(case):
    image, label = case
    assert image.shape == SHAPE and label.shape == SHAPE
    assert image.dtype == np.int16 and label.dtype == np.uint8
    assert set(np.unique(label).tolist()) == {0, 1, 2}
    assert 1000.0 < ml(label > 0, SPACING) < 2500.0  # an adult liver, in ml


def test_tumour_count_is_connected_components(case):
    _, label = case
    _, n = ndimage.label(label == 2)
    assert n == 3


def test_tumours_lie_inside_the_liver(case):
    _, label = case
    tumour = label == 2
    shell = ndimage.binary_dilation(tumour, structure=np.ones((3, 3, 3), bool)) & ~tumour
    assert shell.any()
    assert np.all(label[shell] == 1), "every voxel touching a tumour must be liver"


def test_region_intensities(case):
    image, label = case
    liver, tumour = image[label == 1], image[label == 2]
    assert abs(liver.mean() - 100.0) < 2.0
    assert abs(tumour.mean() - (100.0 + TUMOUR_CONTRAST_HU)) < 3.0
    assert abs(liver.std() - 10.0) < 1.5  # flat organ + noise of the asked sigma
    air = image[:, :4, :4]  # a corner outside the body
    assert abs(air.mean() + 1000.0) < 2.0
    background = image[label == 0]
    # plenty of soft tissue within 25 HU of 40 HU outside the liver (the default liver is at
    # 60 HU): segmentation is not a threshold
    soft = np.count_nonzero(np.abs(background.astype(np.float32) - SOFT_TISSUE_HU) < 25.0)
    assert soft > np.count_nonzero(label == 1)
    assert np.count_nonzero(background > 300) > 1000  # bone


def test_lungs_at_the_top_not_the_bottom(case):
    image, label = case
    body = ndimage.binary_erosion(image[:, ::4, ::4] > -500, iterations=1)  # coarse body interior per slice
    lungish = (image[:, ::4, ::4] < -700)
    # lung = dark voxels enclosed by the body in the slice
    enclosed = np.array([np.count_nonzero(ndimage.binary_fill_holes(b) & lg) for b, lg in zip(body, lungish)])
    top, bottom = enclosed[-8:].sum(), enclosed[:8].sum()
    assert top > 50 and top > 5 * max(bottom, 1)


@pytest.mark.parametrize("spacing", [(1.0, 2.5, 2.5), (4.0, 1.25, 1.25)])
def test_physical_size_is_independent_of_spacing(spacing):
    fov = (160.0, 320.0, 320.0)
    ref_spacing = (2.0, 2.0, 2.0)
    ref_img, ref = make_phantom(tuple(int(f / s) for f, s in zip(fov, ref_spacing)), ref_spacing, np.random.default_rng(3),
                                n_tumours=2, tumour_radius_mm=(8.0, 12.0))
    img, lab = make_phantom(tuple(int(f / s) for f, s in zip(fov, spacing)), spacing, np.random.default_rng(3),
                            n_tumours=2, tumour_radius_mm=(8.0, 12.0))
    assert ml(lab > 0, spacing) == pytest.approx(ml(ref > 0, ref_spacing), rel=0.03)
    assert ml(lab == 2, spacing) == pytest.approx(ml(ref == 2, ref_spacing), rel=0.2)
    # the liver sits at the same place, in mm
    c_ref = np.array(ndimage.center_of_mass(ref > 0)) * ref_spacing
    c = np.array(ndimage.center_of_mass(lab > 0)) * spacing
    assert np.allclose(c, c_ref, atol=2.0)


def test_reproducible_with_a_seed():
    a = make_phantom((24, 48, 48), (8.0, 8.0, 8.0), np.random.default_rng(11), n_tumours=1, tumour_radius_mm=(10.0, 15.0))
    b = make_phantom((24, 48, 48), (8.0, 8.0, 8.0), np.random.default_rng(11), n_tumours=1, tumour_radius_mm=(10.0, 15.0))
    c = make_phantom((24, 48, 48), (8.0, 8.0, 8.0), np.random.default_rng(12), n_tumours=1, tumour_radius_mm=(10.0, 15.0))
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])


def test_slab_building_matches_one_piece_with_smoothing(monkeypatch):
    kwargs = dict(n_tumours=1, tumour_radius_mm=(8.0, 10.0), noise_hu=0.0, smooth_mm=2.0)
    whole = make_phantom((40, 64, 64), (5.0, 5.0, 5.0), np.random.default_rng(5), **kwargs)
    monkeypatch.setattr(phantom, "SLAB_VOXELS", 3 * 64 * 64)  # 3-slice slabs, halo larger than a slab
    slabs = make_phantom((40, 64, 64), (5.0, 5.0, 5.0), np.random.default_rng(5), **kwargs)
    assert np.array_equal(whole[1], slabs[1])
    assert np.abs(whole[0].astype(int) - slabs[0].astype(int)).max() <= 1  # rounding only
    # smoothing does blur: there are values strictly between fat and soft tissue
    assert np.count_nonzero((whole[0] > -90) & (whole[0] < 30)) > 100


def test_no_tumours_and_bad_arguments():
    _, label = make_phantom((20, 40, 40), (10.0, 10.0, 10.0), np.random.default_rng(0), n_tumours=0)
    assert 2 not in label and 1 in label
    with pytest.raises(ValueError, match="shape"):
        make_phantom((0, 10, 10), (1.0, 1.0, 1.0), np.random.default_rng(0))
    with pytest.raises(ValueError, match="spacing"):
        make_phantom((10, 10, 10), (1.0, -1.0, 1.0), np.random.default_rng(0))
    with pytest.raises(ValueError, match="tumour_radius_mm"):
        make_phantom((10, 10, 10), (1.0, 1.0, 1.0), np.random.default_rng(0), tumour_radius_mm=(5.0, 2.0))
    with pytest.raises(ValueError, match="cannot fit tumour"):
        make_phantom((20, 40, 40), (10.0, 10.0, 10.0), np.random.default_rng(0), n_tumours=40, tumour_radius_mm=(25.0, 30.0))


def test_lits_size_volume():
    shape, spacing = (500, 512, 512), (1.0, 0.77, 0.77)
    image, label = make_phantom(shape, spacing, np.random.default_rng(1), n_tumours=2)
    assert image.shape == shape and image.dtype == np.int16 and label.dtype == np.uint8
    assert 1000.0 < ml(label > 0, spacing) < 2500.0
    box = ndimage.find_objects((label == 2).astype(np.uint8))[0]
    grown = tuple(slice(max(0, s.start - 2), s.stop + 2) for s in box)
    assert ndimage.label(label[grown] == 2)[1] == 2


def test_write_phantom_dataset(tmp_path):
    root = write_phantom_dataset(tmp_path, 3, np.random.default_rng(2), shape=(40, 64, 64), spacing=(6.0, 6.0, 6.0),
                                 dataset_name="Dataset123_Phantom", n_tumours=(1, 2))
    assert root == tmp_path / "Dataset123_Phantom"
    dataset = open_dataset(root)  # the layout autoliver (and nnU-Net v2) reads
    assert [c.case_id for c in dataset.training] == ["phantom_000", "phantom_001", "phantom_002"]
    dj = json.loads((root / "dataset.json").read_text())
    assert dj["channel_names"] == {"0": "CT"}
    assert dj["labels"] == {"background": 0, "liver": 1, "tumour": 2}
    assert dj["numTraining"] == 3 and dj["file_ending"] == ".nii.gz"
    shapes = set()
    for c in dataset.training:
        rec = dj["phantoms"][c.case_id]
        image, geom = read_image(c.images[0])
        label, lgeom = read_image(c.label)
        assert geom == lgeom
        assert list(geom.shape) == rec["shape"] and np.allclose(geom.spacing, rec["spacing"], atol=1e-4)
        assert all(0.9 * 6.0 - 1e-6 <= s <= 1.1 * 6.0 + 1e-6 for s in geom.spacing)
        assert image.dtype == np.int16 and set(np.unique(label).tolist()) <= {0, 1, 2}
        assert ndimage.label(label == 2)[1] == rec["n_tumours"]
        shapes.add(geom.shape)
    assert len(shapes) > 1  # sizes vary between cases
