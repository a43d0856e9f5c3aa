"""Build one training batch from preprocessed cases: sample, read, augment (numpy only).

``BatchMaker`` lives in the process that makes batches (the main process or one loader
worker): it opens each case's blosc2 arrays and sampling index once, then cuts patches.

Output of ``BatchMaker.batch`` (numpy):
    data    float32 (B, C, *patch): C = in_slices image channels (2.5d: slices z-k//2..z+k//2,
            edge slices repeated), then, for a cascade, n_classes - 1 one-hot channels of the
            previous stage's labels 1..n_classes-1
    target  int64 (B, 1, *patch): labels 0/1/2 (2.5d: the centre slice)
    tumour  bool (B,): the target holds tumour
    forced  int8 (B,): sampler.RANDOM / FOREGROUND / TUMOUR

With ``BatchSpec.roi`` (a ``sampler.LiverRoi``: a two-stage design's tumour stage) every
sample first draws its jittered liver box and is cut around a centre inside it (see
``autoliver.data.sampler``); the liver's box of each case is found once per process, from
its ground truth. Without, the draws are exactly those of a spec without the field.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import blosc2
import numpy as np

from autoliver.data import augment as aug
from autoliver.data.sampler import (
    Box,
    CaseIndex,
    LiverRoi,
    available_kind,
    choose_centre,
    choose_kind,
    jittered_box,
    liver_bbox,
    n_forced,
    patch_start,
    read_region,
    roi_patch_start,
)
from autoliver.preprocess.storage import load_case

log = logging.getLogger(__name__)

TUMOUR_LABEL = 2
PREV_SUFFIX = ".b2nd"


class SampleError(Exception):
    """A case could not be sampled; carries the case id."""

    def __init__(self, case_id: str, message: str):
        self.case_id = case_id
        super().__init__(message)


@dataclass(frozen=True)
class BatchSpec:
    """Everything a process needs to make batches (plain values: sent to loader workers)."""

    folder: Path
    case_ids: tuple[str, ...]
    network_dims: int  # 2 or 3
    patch_size: tuple[int, ...]  # (y, x) or (z, y, x)
    batch_size: int
    in_slices: int = 1
    oversample_foreground: float = 0.33
    tumour_share: float = 0.5
    settings: aug.AugmentSettings | None = None  # None: no augmentation
    prev_stage_folder: Path | None = None
    n_classes: int = 3
    pad_value: float = 0.0  # image value outside the volume (normalised units)
    roi: LiverRoi | None = None  # sample around each case's liver (a tumour stage); None: the whole volume
    spacing: tuple[float, float, float] | None = None  # the data's spacing (z, y, x) mm when a case's properties lack it


@dataclass(frozen=True)
class _Case:
    data: object  # blosc2 NDArray (Z, Y, X)
    seg: object
    prev: object | None
    index: CaseIndex
    liver: Box | None = None  # with a ROI: the liver's bounding box (None: no liver, whole volume)
    spacing: tuple[float, float, float] | None = None  # with a ROI: the case's spacing (mm)


class BatchMaker:
    def __init__(self, spec: BatchSpec):
        self.spec = spec
        self._cases: dict[str, _Case] = {}

    def _open(self, case_id: str) -> _Case:
        case = self._cases.get(case_id)
        if case is None:
            data, seg, props = load_case(self.spec.folder, case_id, mmap=True)
            if seg is None:
                raise ValueError(f"{self.spec.folder / case_id}: no segmentation stored; training needs labelled cases")
            prev = None
            if self.spec.prev_stage_folder is not None:
                path = Path(self.spec.prev_stage_folder) / f"{case_id}{PREV_SUFFIX}"
                prev = blosc2.open(str(path), mode="r", dparams=blosc2.DParams(nthreads=1))
                if tuple(prev.shape) != tuple(data.shape):
                    raise ValueError(f"{path}: shape {tuple(prev.shape)} differs from the case's {tuple(data.shape)}")
            liver, spacing = (None, None) if self.spec.roi is None else self._liver(case_id, seg, props)
            case = _Case(data, seg, prev, CaseIndex.from_properties(case_id, props, data.shape), liver, spacing)
            self._cases[case_id] = case
        return case

    def _liver(self, case_id: str, seg, props: dict) -> tuple[Box | None, tuple[float, float, float]]:
        """The liver's bounding box (labels 1 + 2) and the spacing its margin is measured in."""
        raw = props.get("spacing") or self.spec.spacing
        if raw is None or len(raw) != 3:
            raise ValueError(f"{self.spec.folder / case_id}: no spacing in its properties or the loader's spec; the ROI margin needs it")
        spacing = tuple(float(v) for v in raw)
        box = liver_bbox(seg)
        if box is None:
            log.warning("case %s has no liver (labels 1, 2) in its label: its patches are sampled from the whole volume", case_id)
        return box, spacing

    def roi_box(self, case_id: str, rng: np.random.Generator) -> Box | None:
        """One sample's jittered liver box of ``case_id`` (draws from ``rng``); None without a
        ROI or when the case has no liver."""
        roi = self.spec.roi
        case = self._open(case_id)
        if roi is None or case.liver is None:
            return None
        return jittered_box(case.liver, case.index.shape, case.spacing, roi.margin_mm, roi.jitter, rng)

    def sample(self, case_id: str, kind: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """(data (C, *patch) float32, seg (S, *patch) uint8) of one patch; S = 1 (+1 cascade)."""
        spec = self.spec
        case = self._open(case_id)
        shape = case.index.shape
        box = self.roi_box(case_id, rng) if spec.roi is not None else None
        if box is None:
            centre = choose_centre(case.index, kind, rng)
        else:  # the sampling rules inside the box
            inside = case.index.within(box)
            centre = choose_centre(inside, available_kind(inside, kind), rng)
        draw = aug.draw_spatial(spec.settings, rng) if spec.settings is not None else None
        labels = [case.seg] + ([case.prev] if case.prev is not None else [])
        if spec.network_dims == 3:
            patch = spec.patch_size
            start = patch_start(shape, patch, centre, rng) if box is None else roi_patch_start(shape, patch, box, centre, rng)
            if draw is None:
                img = read_region(case.data, start, patch, spec.pad_value)[None]
                seg = np.stack([read_region(a, start, patch, 0) for a in labels])
                return img.astype(np.float32), seg
            r = spec.settings.spatial_dims
            centre_f = start[-r:] + (np.asarray(patch[-r:]) - 1) / 2.0
            r_start, r_size, coords = aug.grid_region(aug.sampling_grid(patch[-r:], draw), centre_f)
            start3 = np.concatenate([start[:3 - r], r_start])
            size3 = np.concatenate([np.asarray(patch[:3 - r], dtype=np.int64), r_size])
            img = read_region(case.data, start3, size3, spec.pad_value)[None]
            seg = np.stack([read_region(a, start3, size3, 0) for a in labels])
            return aug.resample(img, seg, coords)
        # 2d / 2.5d: one slice (or k adjacent ones as channels) of (y, x)
        k = spec.in_slices
        if box is None:
            z = int(centre[0]) if centre is not None else int(rng.integers(shape[0]))
            yx = patch_start(shape[1:], spec.patch_size, None if centre is None else centre[1:], rng)
        else:
            z = int(centre[0]) if centre is not None else int(rng.integers(box[0][0], box[0][1]))
            yx = roi_patch_start(shape[1:], spec.patch_size, box[1:], None if centre is None else centre[1:], rng)
        if draw is None:
            y_start, size = yx, np.asarray(spec.patch_size, dtype=np.int64)
        else:
            centre_f = yx + (np.asarray(spec.patch_size) - 1) / 2.0
            y_start, size, coords = aug.grid_region(aug.sampling_grid(spec.patch_size, draw), centre_f)
        img = read_region(case.data, (z - k // 2, *y_start), (k, *size), spec.pad_value, clamp_axes=(0,))
        seg = np.concatenate([read_region(a, (z, *y_start), (1, *size), 0) for a in labels])
        if draw is None:
            return img.astype(np.float32), seg
        return aug.resample(img, seg, coords)

    def batch(self, rng: np.random.Generator) -> dict[str, np.ndarray]:
        spec = self.spec
        b = spec.batch_size
        n_fg = n_forced(b, spec.oversample_foreground, rng)
        datas, segs, kinds = [], [], []
        for i in range(b):
            case_id = spec.case_ids[int(rng.integers(len(spec.case_ids)))]
            try:
                kind = choose_kind(self._open(case_id).index, i >= b - n_fg, spec.tumour_share, rng)
                d, s = self.sample(case_id, kind, rng)
            except Exception as exc:
                raise SampleError(case_id, f"case {case_id} in {spec.folder}: {type(exc).__name__}: {exc}") from exc
            datas.append(d)
            segs.append(s)
            kinds.append(kind)
        data, seg = np.stack(datas), np.stack(segs)
        if spec.settings is not None:
            data, seg = aug.augment_batch(data, seg, spec.settings, rng)
        target = seg[:, :1].astype(np.int64)
        if spec.prev_stage_folder is not None:
            prev = seg[:, 1]
            onehot = np.stack([(prev == c) for c in range(1, spec.n_classes)], axis=1).astype(np.float32)
            data = np.concatenate([data, onehot], axis=1)
        return {
            "data": np.ascontiguousarray(data, dtype=np.float32),
            "target": target,
            "tumour": (target == TUMOUR_LABEL).reshape(b, -1).any(axis=1),
            "forced": np.asarray(kinds, dtype=np.int8),
        }
