"""The per-case report against hand-computed cases and SimpleITK's index -> physical transform."""

import math

import numpy as np
import pytest
import SimpleITK as sitk
from scipy.spatial.distance import pdist

from autoliver.evaluate.case_report import case_report, index_to_physical, largest_diameter, size_category
from autoliver.io.images import Geometry

IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)


def geometry(shape, spacing, origin=(0.0, 0.0, 0.0), direction=IDENTITY):
    return Geometry(tuple(shape), tuple(float(s) for s in spacing), tuple(origin), tuple(direction))


def sphere(shape, spacing, centre_mm, radius_mm):
    zz, yy, xx = np.meshgrid(*(np.arange(n) * s for n, s in zip(shape, spacing)), indexing="ij")
    return (zz - centre_mm[0]) ** 2 + (yy - centre_mm[1]) ** 2 + (xx - centre_mm[2]) ** 2 <= radius_mm**2


def rotation_z(deg):
    a = math.radians(deg)
    return (math.cos(a), -math.sin(a), 0.0, math.sin(a), math.cos(a), 0.0, 0.0, 0.0, 1.0)


def test_sphere_volume_and_diameter_with_anisotropic_spacing():
    spacing, shape, r = (2.5, 0.8, 0.7), (20, 56, 64), 15.0
    g = geometry(shape, spacing)
    seg = np.zeros(shape, np.uint8)
    liver = sphere(shape, spacing, (25.0, 22.0, 22.0), 20.0)
    seg[liver] = 1
    tumour = sphere(shape, spacing, (25.0, 22.0, 22.0), r)
    seg[tumour] = 2
    rep = case_report(seg, g, configuration="2d", folds=["0"], version="x", timings={"network_s": 1.23456})
    exact = 4 / 3 * math.pi * r**3 / 1000
    assert rep["tumour_count"] == 1
    t = rep["tumours"][0]
    assert t["volume_ml"] == pytest.approx(exact, rel=0.03)
    assert t["volume_ml"] == pytest.approx(np.count_nonzero(tumour) * 2.5 * 0.8 * 0.7 / 1000)
    # centre-to-centre of surface voxels: at most 2r, at least 2r minus one voxel at each end
    assert 2 * r - 2 * 2.5 <= t["largest_diameter_mm"] <= 2 * r + 1e-6
    assert t["size_category"] == "large"
    assert t["centroid_lps_mm"] == pytest.approx([22.0, 22.0, 25.0], abs=0.1)  # (x, y, z)
    assert rep["liver_volume_ml"] == pytest.approx(np.count_nonzero(liver) * 1.4e-3)
    assert rep["tumour_burden"] == pytest.approx(np.count_nonzero(tumour) / np.count_nonzero(liver))
    assert rep["runtime_s"] == {"network_s": 1.2346} and rep["folds"] == ["0"]


def test_diameter_matches_brute_force_on_the_hull_path():
    rng = np.random.default_rng(0)
    pts = rng.normal(size=(3000, 3)) * [5.0, 2.0, 1.0]
    assert largest_diameter(pts) == pytest.approx(pdist(pts).max())
    flat = np.c_[rng.uniform(-10, 10, size=(2500, 2)), np.zeros(2500)]  # coplanar: qhull degenerates
    assert largest_diameter(flat) == pytest.approx(pdist(flat).max())
    line = np.c_[np.linspace(0, 30, 2500), np.zeros(2500), np.zeros(2500)]
    assert largest_diameter(line) == pytest.approx(30.0)
    assert largest_diameter(pts[:1]) == 0.0


def test_two_blobs_are_two_tumours_and_diagonal_contact_is_one():
    g = geometry((10, 20, 20), (1.0, 1.0, 1.0))
    seg = np.ones((10, 20, 20), np.uint8)
    seg[2:5, 2:5, 2:5] = 2
    seg[6:8, 12:14, 12:14] = 2
    rep = case_report(seg, g)
    assert rep["tumour_count"] == 2
    assert [t["voxels"] for t in rep["tumours"]] == [27, 8]
    assert rep["tumours"][0]["largest_diameter_mm"] == pytest.approx(math.sqrt(12))
    assert rep["tumours"][1]["size_category"] == "small"
    seg[5, 5, 5] = 2  # touches the first blob's corner only: 26-connected
    assert case_report(seg, g)["tumour_count"] == 2
    assert case_report(np.zeros((10, 20, 20), np.uint8), g)["tumour_burden"] == 0.0


def test_centroid_with_oblique_direction_matches_simpleitk():
    spacing, origin, direction = (3.0, 0.9, 1.3), (10.0, -20.0, 5.0), rotation_z(30)
    g = geometry((8, 12, 14), spacing, origin, direction)
    seg = np.zeros(g.shape, np.uint8)
    seg[2:4, 4:6, 6:8] = 2
    tumour = case_report(seg, g)["tumours"][0]
    img = g.apply_to(sitk.GetImageFromArray(seg))
    expected = img.TransformContinuousIndexToPhysicalPoint((6.5, 4.5, 2.5))  # (x, y, z) index order
    assert tumour["centroid_lps_mm"] == pytest.approx(list(expected), abs=1e-9)
    # a rotation keeps distances: diameter as with the identity direction
    assert tumour["largest_diameter_mm"] == pytest.approx(math.sqrt(3.0**2 + 0.9**2 + 1.3**2))
    pts = np.array([[0, 0, 0], [7, 11, 13]])
    ref = [img.TransformIndexToPhysicalPoint((int(p[2]), int(p[1]), int(p[0]))) for p in pts]
    assert index_to_physical(pts, g) == pytest.approx(np.array(ref))


def test_size_categories_and_shape_check():
    assert [size_category(d) for d in (0.0, 9.99, 10.0, 20.0, 20.01)] == ["small", "small", "medium", "medium", "large"]
    with pytest.raises(ValueError):
        case_report(np.zeros((2, 2, 2), np.uint8), geometry((2, 2, 3), (1, 1, 1)))


def test_many_components_match_scipy_reference():
    from scipy import ndimage

    rng = np.random.default_rng(1)
    seg = np.where(rng.random((20, 30, 40)) < 0.08, 2, 1).astype(np.uint8)  # hundreds of specks
    g = geometry(seg.shape, (2.0, 0.5, 0.75), origin=(5.0, -3.0, 1.0))
    comps, n = ndimage.label(seg == 2, structure=np.ones((3, 3, 3), bool))
    tumours = case_report(seg, g)["tumours"]
    assert len(tumours) == n > 100
    ref = ndimage.center_of_mass(seg == 2, comps, np.arange(1, n + 1))
    sizes = np.bincount(comps.ravel())[1:]
    got = sorted((t["voxels"], tuple(np.round(t["centroid_lps_mm"], 6))) for t in tumours)
    want = sorted((int(s), tuple(np.round(index_to_physical(np.array([c]), g)[0], 6))) for s, c in zip(sizes, ref))
    assert got == want
    # the diameter over every voxel of a component equals the one over its surface
    label = comps == comps[tuple(np.argwhere(comps > 0)[0])]
    pts = index_to_physical(np.argwhere(label), g)
    big = [t for t in tumours if t["voxels"] == int(label.sum())]
    assert any(t["largest_diameter_mm"] == pytest.approx(pdist(pts).max() if len(pts) > 1 else 0.0) for t in big)
