"""Synthetic abdominal CT phantoms with liver and liver-tumour labels.

A phantom is a (Z, Y, X) int16 volume in HU and a uint8 label map (0 background, 1 liver,
2 tumour). Z runs from feet to head (the top slices reach into the lungs), Y from anterior to
posterior, X from the patient's right to left (LPS with identity direction), so the liver lies
at low X, the spleen at high X.

Every structure is defined in mm around the centre of the field of view, so the anatomy keeps
its physical size whatever the spacing or the number of voxels: the same ``rng`` seed and the
same field of view give the same patient at any resolution. The volume is built slab by slab in
float32 with in-place operations, each organ only inside its bounding box, so a LiTS-size
512 x 512 x 500 phantom takes a few seconds and little more memory than its output arrays.

What makes it non-trivial to segment: soft-tissue organs (spleen, kidneys, muscle) within
15-30 HU of the liver, hypodense tumours of chosen number and size, lungs and ribs near the
liver dome, bone, bowel gas, noise, and (optionally) partial-volume blurring.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from scipy import ndimage

from autoliver.io.atomic import write_json
from autoliver.io.images import Geometry, write_image

log = logging.getLogger(__name__)

AIR_HU = -1000.0
FAT_HU = -100.0
SOFT_TISSUE_HU = 40.0
LUNG_HU = -820.0
SPLEEN_HU = 48.0
KIDNEY_HU = 32.0
AORTA_HU = 150.0
BOWEL_GAS_HU = -900.0
CANCELLOUS_BONE_HU = 400.0
CORTICAL_BONE_HU = 900.0
DISC_HU = 80.0
TUMOUR_CONTRAST_HU = -40.0  # tumour = liver + this
HU_RANGE = (-1024, 3071)

PLACEMENT_GRID_MM = 4.0  # tumours are placed on a grid of this pitch, whatever the spacing
SLAB_VOXELS = 1 << 23  # about 8 M voxels (32 MB float32) per slab


@dataclass(frozen=True)
class Blob:
    """A deformed ellipsoid: sum(((p - c) / a)^2) <= 1 + wobble(p), all in mm, (z, y, x)."""

    centre: tuple[float, float, float]
    semi_axes: tuple[float, float, float]
    wobble: float = 0.0  # amplitude of the smooth deformation (0 = exact ellipsoid)
    wavelengths: tuple[float, float, float] = (90.0, 90.0, 90.0)
    phases: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        grow = math.sqrt(1.0 + abs(self.wobble))
        c, a = np.asarray(self.centre), np.asarray(self.semi_axes) * grow
        return c - a, c + a

    def inside(self, z: np.ndarray, y: np.ndarray, x: np.ndarray) -> np.ndarray:
        """Boolean mask over the broadcast of 1D coordinate vectors shaped (nz,1,1), (1,ny,1), (1,1,nx)."""
        (cz, cy, cx), (az, ay, ax) = self.centre, self.semi_axes
        f = ((x - cx) / ax) ** 2 + ((y - cy) / ay) ** 2  # (1, ny, nx)
        f = f + ((z - cz) / az) ** 2  # (nz, ny, nx)
        if self.wobble:
            wz, wy, wx = (2 * math.pi / w for w in self.wavelengths)
            p = self.phases
            f -= self.wobble * 0.5 * (np.sin(wz * z + p[0]) * np.sin(wx * x + p[1]) + np.sin(wy * y + p[2]) * np.cos(wz * z + p[3]))
        return f <= 1.0


@dataclass(frozen=True)
class Anatomy:
    """Everything random about one phantom, in mm relative to the field of view's corner."""

    fov: tuple[float, float, float]  # (z, y, x) mm
    body: tuple[float, float]  # outer semi-axes (y, x) mm at mid height
    body_wave: tuple[float, float]  # relative amplitude and phase of the body's change along z
    fat_mm: float
    liver: tuple[Blob, ...]
    lungs: tuple[Blob, ...]
    spleen: Blob
    kidneys: tuple[Blob, ...]
    gas: tuple[Blob, ...]
    tumours: tuple[Blob, ...]
    rib_phase_mm: float

    @property
    def centre(self) -> tuple[float, float, float]:
        return tuple(f / 2.0 for f in self.fov)  # type: ignore[return-value]


def _coords(n: int, spacing: float, start: int = 0, stop: int | None = None) -> np.ndarray:
    stop = n if stop is None else stop
    return ((np.arange(start, stop, dtype=np.float32) + 0.5) * np.float32(spacing))


def _wobbly(rng: np.random.Generator, centre, semi, wobble: float) -> Blob:
    return Blob(
        centre=tuple(float(v) for v in centre),
        semi_axes=tuple(float(v) for v in semi),
        wobble=wobble,
        wavelengths=tuple(float(v) for v in rng.uniform(70.0, 140.0, 3)),
        phases=tuple(float(v) for v in rng.uniform(0.0, 2 * math.pi, 4)),
    )


def _draw_anatomy(fov: tuple[float, float, float], rng: np.random.Generator) -> Anatomy:
    cz, cy, cx = (f / 2.0 for f in fov)
    s = float(rng.uniform(0.92, 1.08))  # patient size

    def j(mm: float) -> float:  # jitter in mm
        return float(rng.uniform(-mm, mm))

    by, bx = 118.0 * s, 165.0 * s
    liver_c = (cz + 10 + j(8), cy - 5 + j(6), cx - 62 * s + j(6))
    liver = (
        _wobbly(rng, liver_c, (68 * s, 72 * s, 66 * s), 0.15),
        _wobbly(rng, (liver_c[0] + 28, cy - 45 * s, cx + 8 * s + j(6)), (36 * s, 34 * s, 55 * s), 0.12),
    )
    lungs = (
        _wobbly(rng, (cz + 185, cy + 5, cx - 75 * s), (140, 80 * s, 62 * s), 0.08),
        _wobbly(rng, (cz + 175, cy + 5, cx + 75 * s), (140, 80 * s, 62 * s), 0.08),
    )
    spleen = _wobbly(rng, (cz + 30 + j(8), cy + 40 * s, cx + 100 * s), (50, 42 * s, 26 * s), 0.12)
    kidneys = (
        _wobbly(rng, (cz - 75 + j(6), cy + 58 * s, cx - 68 * s), (52, 30 * s, 27 * s), 0.05),
        _wobbly(rng, (cz - 55 + j(6), cy + 58 * s, cx + 68 * s), (52, 30 * s, 27 * s), 0.05),
    )
    gas = tuple(
        _wobbly(rng, (cz - 110 + j(50), cy - 50 * s + j(20), cx + 35 * s + j(45)), rng.uniform(6, 16, 3), 0.1)
        for _ in range(int(rng.integers(3, 7)))
    )
    return Anatomy(
        fov=fov, body=(by, bx), body_wave=(float(rng.uniform(0.02, 0.06)), float(rng.uniform(0, 2 * math.pi))),
        fat_mm=float(rng.uniform(12.0, 25.0)), liver=liver, lungs=lungs, spleen=spleen, kidneys=kidneys,
        gas=gas, tumours=(), rib_phase_mm=float(rng.uniform(0.0, 28.0)),
    )


def _body_scale2(anat: Anatomy, z: np.ndarray) -> np.ndarray:
    """Squared scale of the body cross-section along z (the trunk is not a perfect cylinder)."""
    amp, phase = anat.body_wave
    return (1.0 + amp * np.sin(2 * math.pi * (z - anat.centre[0]) / 400.0 + phase)) ** 2


def _body_q(anat: Anatomy, y: np.ndarray, x: np.ndarray, inset_mm: float = 0.0) -> np.ndarray:
    """((y-cy)/by)^2 + ((x-cx)/bx)^2 for the body ellipse shrunk by ``inset_mm``; shape (1, ny, nx)."""
    _, cy, cx = anat.centre
    by, bx = anat.body
    return ((y - cy) / (by - inset_mm)) ** 2 + ((x - cx) / (bx - inset_mm)) ** 2


def _liver_mask(anat: Anatomy, z: np.ndarray, y: np.ndarray, x: np.ndarray) -> np.ndarray:
    """The liver over broadcast coordinates: union of its blobs, kept inside the rib cage."""
    mask = anat.liver[0].inside(z, y, x)
    for blob in anat.liver[1:]:
        mask |= blob.inside(z, y, x)
    mask &= _body_q(anat, y, x, anat.fat_mm + 14.0) <= _body_scale2(anat, z)
    return mask


def _place_tumours(anat: Anatomy, n: int, radius_mm: tuple[float, float], spacing: tuple[float, float, float], rng: np.random.Generator) -> tuple[Blob, ...]:
    """Ellipsoids wholly inside the liver (and the field of view), not touching each other.

    Placement runs on a fixed mm grid, so it does not depend on the image spacing.
    """
    if n == 0:
        return ()
    g = PLACEMENT_GRID_MM
    shape = tuple(max(1, int(f // g)) for f in anat.fov)
    z, y, x = (_coords(k, g)[idx] for k, idx in zip(shape, (np.s_[:, None, None], np.s_[None, :, None], np.s_[None, None, :])))
    liver = np.pad(_liver_mask(anat, z, y, x), 1)  # outside the field of view counts as outside
    dist = ndimage.distance_transform_edt(liver, sampling=g)[1:-1, 1:-1, 1:-1]
    margin = g + max(spacing) + 1.0
    placed: list[tuple[np.ndarray, float]] = []
    tumours = []
    for k in range(n):
        semi = rng.uniform(radius_mm[0], radius_mm[1]) * rng.uniform(0.85, 1.15, 3)
        r = float(semi.max())
        ok = dist > r + margin
        idx = np.argwhere(ok)
        if len(idx):
            pts = (idx + 0.5) * g
            for c, rc in placed:
                far = np.linalg.norm(pts - c, axis=1) > r + rc + margin
                idx, pts = idx[far], pts[far]
        if not len(idx):
            raise ValueError(
                f"cannot fit tumour {k + 1} of {n} (radius up to {r:.1f} mm) inside the liver without touching "
                f"the others; ask for fewer or smaller tumours (tumour_radius_mm={radius_mm})"
            )
        centre = pts[int(rng.integers(len(pts)))]
        placed.append((centre, r))
        tumours.append(Blob(centre=tuple(float(v) for v in centre), semi_axes=tuple(float(v) for v in semi)))
    return tuple(tumours)


def _index_range(lo: float, hi: float, spacing: float, n: int) -> tuple[int, int]:
    return max(0, int(math.floor(lo / spacing - 0.5))), min(n, int(math.ceil(hi / spacing + 0.5)))


class _SlabPainter:
    """Paints blobs into one z slab: values into the float32 image, optionally a label."""

    def __init__(self, img: np.ndarray, lab: np.ndarray | None, z0: int, spacing, shape):
        self.img, self.lab, self.z0, self.spacing, self.shape = img, lab, z0, spacing, shape

    def paint(self, blob: Blob, value: float | None, label: int | None = None, within: np.ndarray | None = None) -> None:
        lo, hi = blob.bounds()
        rz = _index_range(lo[0], hi[0], self.spacing[0], self.shape[0])
        rz = (max(rz[0], self.z0), min(rz[1], self.z0 + self.img.shape[0]))
        ry = _index_range(lo[1], hi[1], self.spacing[1], self.shape[1])
        rx = _index_range(lo[2], hi[2], self.spacing[2], self.shape[2])
        if rz[0] >= rz[1] or ry[0] >= ry[1] or rx[0] >= rx[1]:
            return
        z = _coords(self.shape[0], self.spacing[0], *rz)[:, None, None]
        y = _coords(self.shape[1], self.spacing[1], *ry)[None, :, None]
        x = _coords(self.shape[2], self.spacing[2], *rx)[None, None, :]
        mask = blob.inside(z, y, x)
        sl = (slice(rz[0] - self.z0, rz[1] - self.z0), slice(*ry), slice(*rx))
        if within is not None:
            mask &= within[sl]
        if value is not None:
            self.img[sl][mask] = value
        if label is not None and self.lab is not None:
            self.lab[sl][mask] = label


def _paint_slab(anat: Anatomy, liver_hu: float, spacing, shape, z0: int, z1: int) -> tuple[np.ndarray, np.ndarray]:
    """The noise-free image (float32) and label of slices [z0, z1)."""
    nz = z1 - z0
    sz, sy, sx = spacing
    z = _coords(shape[0], sz, z0, z1)[:, None, None]
    y = _coords(shape[1], sy)[None, :, None]
    x = _coords(shape[2], sx)[None, None, :]
    cz, cy, cx = anat.centre
    img = np.full((nz, shape[1], shape[2]), AIR_HU, dtype=np.float32)
    lab = np.zeros(img.shape, dtype=np.uint8)
    scale2 = _body_scale2(anat, z)

    img[_body_q(anat, y, x) <= scale2] = FAT_HU
    inner = _body_q(anat, y, x, anat.fat_mm) <= scale2
    img[inner] = SOFT_TISSUE_HU

    # ribs: a thin shell just inside the fat, open at the front (costal cartilage gap), above
    # the lower abdomen, in bands along z that slope down towards the front, so each slice
    # cuts them into short arcs; evaluated only on the few pixels of the shell
    q_out, q_in = _body_q(anat, y, x, anat.fat_mm + 2.0)[0], _body_q(anat, y, x, anat.fat_mm + 11.0)[0]
    cand = np.flatnonzero(((q_out <= scale2.max()) & (q_in > scale2.min()) & (y[0] > cy - 0.55 * anat.body[0])).ravel())
    if cand.size:
        zc = z[:, 0, 0]
        ty = (y[0, :, 0][cand // shape[2]] - cy) / anat.body[0]
        tilt = 45.0 * (1.0 - ty)  # mm lower at the front than at the back
        band = np.cos(2 * math.pi * (zc[:, None] + tilt[None, :] - anat.rib_phase_mm) / 28.0) > 0.55
        band &= (zc > cz - 70.0)[:, None]
        band &= q_out.ravel()[cand][None, :] <= scale2[:, 0]
        band &= q_in.ravel()[cand][None, :] > scale2[:, 0]
        flat = img.reshape(nz, -1)
        sub = flat[:, cand]
        sub[band] = CORTICAL_BONE_HU
        flat[:, cand] = sub

    paint = _SlabPainter(img, lab, z0, spacing, shape)
    for lung in anat.lungs:
        paint.paint(lung, LUNG_HU, within=inner)
    paint.paint(anat.spleen, SPLEEN_HU)
    for kidney in anat.kidneys:
        paint.paint(kidney, KIDNEY_HU)
    for bubble in anat.gas:
        paint.paint(bubble, BOWEL_GAS_HU)

    # aorta and spine: fixed cross-sections along the whole z range
    by, bx = anat.body
    s = float(bx / 165.0)

    def disc(yc: float, xc: float, ry: float, rx: float) -> np.ndarray:
        return ((y - yc) / ry) ** 2 + ((x - xc) / rx) ** 2 <= 1.0
    img[:, disc(cy + 40 * s, cx + 18 * s, 12, 12)[0]] = AORTA_HU
    vb_y = cy + 0.62 * by
    vertebra = disc(vb_y, cx, 17 * s, 20 * s)[0]
    img[:, vertebra] = CANCELLOUS_BONE_HU
    img[:, vertebra & ~disc(vb_y, cx, 14 * s, 17 * s)[0]] = CORTICAL_BONE_HU
    img[:, (disc(vb_y + 32 * s, cx, 10 * s, 26 * s) & ~disc(vb_y + 24 * s, cx, 7 * s, 7 * s))[0]] = CORTICAL_BONE_HU
    is_disc = np.flatnonzero(np.mod(z[:, 0, 0] - anat.rib_phase_mm, 30.0) < 6.0)
    if is_disc.size:
        sub = img[is_disc]
        sub[:, vertebra] = DISC_HU
        img[is_disc] = sub

    # the liver last among organs (it is what is labelled), tumours inside it
    lz = _index_range(min(b.bounds()[0][0] for b in anat.liver), max(b.bounds()[1][0] for b in anat.liver), sz, shape[0])
    lz = (max(lz[0], z0), min(lz[1], z1))
    if lz[0] < lz[1]:
        zs = slice(lz[0] - z0, lz[1] - z0)
        liver = _liver_mask(anat, z[zs], y, x)
        img[zs][liver] = liver_hu
        lab[zs][liver] = 1
        for t in anat.tumours:
            paint.paint(t, liver_hu + TUMOUR_CONTRAST_HU, label=2)
    return img, lab


def make_phantom(
    shape: tuple[int, int, int],
    spacing: tuple[float, float, float],
    rng: np.random.Generator,
    n_tumours: int = 2,
    tumour_radius_mm: tuple[float, float] = (5.0, 20.0),
    liver_hu: float = 60.0,
    noise_hu: float = 12.0,
    smooth_mm: float = 0.0,
) -> tuple[np.ndarray, np.ndarray]:
    """A synthetic abdominal CT: (image int16 HU, label uint8 0/1/2), both (Z, Y, X).

    ``spacing`` is (z, y, x) mm; the anatomy has the same physical size at any spacing.
    Tumours are hypodense (liver + TUMOUR_CONTRAST_HU), wholly inside the liver and never
    touching each other; their semi-axes lie in ``tumour_radius_mm`` (+-15 %). ``smooth_mm``
    blurs the noise-free image with a Gaussian of that sigma (partial-volume edges) before
    Gaussian noise of ``noise_hu`` is added. Raises ValueError for bad arguments or when the
    tumours cannot fit.
    """
    shape = tuple(int(v) for v in shape)
    spacing = tuple(float(v) for v in spacing)
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"shape must be 3 positive ints (Z, Y, X), got {shape}")
    if len(spacing) != 3 or min(spacing) <= 0:
        raise ValueError(f"spacing must be 3 positive mm values (Z, Y, X), got {spacing}")
    if n_tumours < 0:
        raise ValueError(f"n_tumours must be >= 0, got {n_tumours}")
    if not 0 < tumour_radius_mm[0] <= tumour_radius_mm[1]:
        raise ValueError(f"tumour_radius_mm must be (min, max) with 0 < min <= max, got {tumour_radius_mm}")
    if noise_hu < 0 or smooth_mm < 0:
        raise ValueError(f"noise_hu and smooth_mm must be >= 0, got {noise_hu}, {smooth_mm}")

    fov = tuple(n * s for n, s in zip(shape, spacing))
    anat = _draw_anatomy(fov, rng)
    anat = replace(anat, tumours=_place_tumours(anat, n_tumours, tumour_radius_mm, spacing, rng))

    image = np.empty(shape, dtype=np.int16)
    label = np.empty(shape, dtype=np.uint8)
    sigma = tuple(smooth_mm / s for s in spacing)
    halo = int(math.ceil(4 * sigma[0])) if smooth_mm > 0 else 0
    step = max(1, SLAB_VOXELS // (shape[1] * shape[2]))
    for z0 in range(0, shape[0], step):
        z1 = min(shape[0], z0 + step)
        h0, h1 = max(0, z0 - halo), min(shape[0], z1 + halo)
        img, lab = _paint_slab(anat, liver_hu, spacing, shape, h0, h1)
        if smooth_mm > 0:
            img = ndimage.gaussian_filter(img, sigma, mode="nearest")
        img = img[z0 - h0 : z0 - h0 + (z1 - z0)]
        label[z0:z1] = lab[z0 - h0 : z0 - h0 + (z1 - z0)]
        if noise_hu > 0:
            noise = rng.standard_normal(img.shape, dtype=np.float32)
            noise *= np.float32(noise_hu)
            img += noise
            del noise
        np.rint(img, out=img)
        np.clip(img, *HU_RANGE, out=img)
        image[z0:z1] = img
    log.debug("phantom %s at %s mm: %d tumours, liver %.0f ml", shape, spacing, n_tumours,
              np.count_nonzero(label) * np.prod(spacing) / 1000.0)
    return image, label


def write_phantom_dataset(
    root: Path,
    n_cases: int,
    rng: np.random.Generator,
    shape: tuple[int, int, int] = (80, 128, 128),
    spacing: tuple[float, float, float] = (3.0, 3.0, 3.0),
    dataset_name: str = "Dataset900_LiverPhantom",
    n_tumours: tuple[int, int] = (1, 3),
    vary: float = 0.1,
) -> Path:
    """Write ``n_cases`` phantoms as an nnU-Net v2 raw dataset ``root/dataset_name``; return its path.

    Each case's shape and spacing vary by up to +-``vary`` (relative) around the given ones,
    its tumour count is drawn from the inclusive range ``n_tumours``. The per-case seeds,
    shapes and spacings are recorded in dataset.json under "phantoms".
    """
    if n_cases < 1:
        raise ValueError(f"n_cases must be >= 1, got {n_cases}")
    if not 0 <= vary < 1:
        raise ValueError(f"vary must be in [0, 1), got {vary}")
    if not 0 <= n_tumours[0] <= n_tumours[1]:
        raise ValueError(f"n_tumours must be an inclusive range (lo, hi) with 0 <= lo <= hi, got {n_tumours}")
    out = Path(root) / dataset_name
    (out / "imagesTr").mkdir(parents=True, exist_ok=True)
    (out / "labelsTr").mkdir(parents=True, exist_ok=True)
    record = {}
    for i in range(n_cases):
        case = f"phantom_{i:03d}"
        seed = int(rng.integers(2**63))
        case_rng = np.random.default_rng(seed)
        f = case_rng.uniform(1 - vary, 1 + vary, 3)
        case_shape = tuple(max(1, int(round(n * v))) for n, v in zip(shape, f))
        case_spacing = tuple(round(float(s * v), 4) for s, v in zip(spacing, case_rng.uniform(1 - vary, 1 + vary, 3)))
        k = int(case_rng.integers(n_tumours[0], n_tumours[1] + 1))
        image, label = make_phantom(case_shape, case_spacing, case_rng, n_tumours=k)
        fov_x, fov_y = case_shape[2] * case_spacing[2], case_shape[1] * case_spacing[1]
        geometry = Geometry(shape=case_shape, spacing=case_spacing, origin=(-fov_x / 2, -fov_y / 2, 0.0),
                            direction=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))
        write_image(out / "imagesTr" / f"{case}_0000.nii.gz", image, geometry)
        write_image(out / "labelsTr" / f"{case}.nii.gz", label, geometry)
        record[case] = {"seed": seed, "shape": list(case_shape), "spacing": list(case_spacing), "n_tumours": k}
        log.info("wrote %s %s at %s mm (%d tumours)", case, case_shape, case_spacing, k)
        del image, label
    write_json(out / "dataset.json", {
        "channel_names": {"0": "CT"},
        "labels": {"background": 0, "liver": 1, "tumour": 2},
        "numTraining": n_cases,
        "file_ending": ".nii.gz",
        "name": dataset_name,
        "description": "synthetic abdominal CT phantoms (autoliver.examples.phantom)",
        "phantoms": record,
    })
    return out
