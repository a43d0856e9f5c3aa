"""One preprocessed case on disk: data, segmentation and properties.

    <folder>/<case_id>.b2nd        data, (Z, Y, X) float16, blosc2 NDArray
    <folder>/<case_id>_seg.b2nd    segmentation, (Z, Y, X) uint8, blosc2 NDArray (absent without label)
    <folder>/<case_id>.json        properties, written last: a case is done only once it exists

blosc2 NDArrays are chunked and compressed; slicing an opened array decompresses only the
chunks/blocks the slice touches, so a training patch never decodes the whole case. Chunks
and blocks are sized for 3D patches and 2D slices alike (``blosc2_layout``).

Measured with benchmarks/storage_formats.py on a 500 x 344 x 478 body-cropped, normalised
real CT (chaos_ct_sample stacked to 500 slices), 2 cores, shared machine (timings +-30 %):

=============================  =======  ========  ==========  ==========  ===========
format                         disk MB  write s   128^3 cold  128^3 warm  slice cold
=============================  =======  ========  ==========  ==========  ===========
npy float32 + mmap               314     0.4       67 ms       15 ms       8 ms
npy float16 + mmap               157     0.5       53 ms       14 ms       7 ms
b2nd float32 LZ4HC5              125     4.8       58 ms       23 ms       23 ms
b2nd float16 LZ4HC5 (nnU-Net)     67     6.8       84 ms       62 ms       24 ms
b2nd float16 ZSTD1 c32x256x256    46     1.2       43 ms       19 ms       14 ms
b2nd float16 ZSTD1 c128^3 b32^3   42     2.2       69 ms       46 ms       44 ms
b2nd float16 ZSTD1 (chosen)       47     1.5       38 ms       19 ms       11 ms
=============================  =======  ========  ==========  ==========  ===========

The chosen layout stores a case in 1/3 of float16 npy's disk (1/7 of float32 npy) and reads
a random cold 128^3 patch as fast as mmap'd npy (whose cold reads are seek-bound); warm reads
cost ~5 ms more per patch, small against a training step. Full decode ~0.8 s.

Every file is written under a temporary name and renamed (atomic), data and seg first,
properties last; ``case_done`` checks the properties file only.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

import blosc2
import numpy as np

from autoliver.core.errors import MissingArtefactError
from autoliver.io.atomic import atomic_path, write_json
from autoliver.preprocess.properties import CaseProperties

log = logging.getLogger(__name__)

DATA_SUFFIX = ".b2nd"
SEG_SUFFIX = "_seg.b2nd"
PROPS_SUFFIX = ".json"
BLOCK_SHAPE = (4, 64, 64)  # 32 KB of float16: the unit decompressed for a slice
CHUNK_SHAPE = (16, 512, 512)  # 8 MB of float16 at most: whole slices, few chunks per patch
CODEC = blosc2.Codec.ZSTD
CLEVEL = 1


def blosc2_layout(shape: Sequence[int], patch: Sequence[int] | None = None, itemsize: int = 2) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(chunks, blocks) for a (Z, Y, X) array: the fixed shapes above, clipped to the array.

    ``patch`` and ``itemsize`` are accepted for experiments; the default layout is used for
    every case so that all cases read alike.
    """
    chunks = tuple(max(1, min(c, s)) for c, s in zip(CHUNK_SHAPE, shape))
    blocks = tuple(max(1, min(b, c)) for b, c in zip(BLOCK_SHAPE, chunks))
    return chunks, blocks


def _paths(folder: Path, case_id: str) -> tuple[Path, Path, Path]:
    folder = Path(folder)
    return folder / f"{case_id}{DATA_SUFFIX}", folder / f"{case_id}{SEG_SUFFIX}", folder / f"{case_id}{PROPS_SUFFIX}"


def _write_b2nd(target: Path, array: np.ndarray) -> None:
    chunks, blocks = blosc2_layout(array.shape, itemsize=array.itemsize)
    cparams = blosc2.CParams(codec=CODEC, clevel=CLEVEL, filters=[blosc2.Filter.SHUFFLE], nthreads=1)
    with atomic_path(target, suffix=DATA_SUFFIX) as tmp:
        tmp.unlink()  # blosc2 refuses to overwrite an existing file
        blosc2.asarray(np.ascontiguousarray(array), urlpath=str(tmp), mode="w", chunks=chunks, blocks=blocks, cparams=cparams)


def save_case(folder: Path, case_id: str, data: np.ndarray, seg: np.ndarray | None, properties: dict) -> None:
    """Store one case atomically: data, then seg, then the properties JSON (the done marker)."""
    if data.ndim != 3:
        raise ValueError(f"case {case_id}: expected (Z, Y, X) data, got shape {data.shape}")
    if seg is not None and seg.shape != data.shape:
        raise ValueError(f"case {case_id}: seg shape {seg.shape} differs from data shape {data.shape}")
    data_path, seg_path, props_path = _paths(folder, case_id)
    props_path.unlink(missing_ok=True)  # an overwritten case is not done until rewritten
    _write_b2nd(data_path, data)
    if seg is not None:
        _write_b2nd(seg_path, seg.astype(np.uint8, copy=False))
    else:
        seg_path.unlink(missing_ok=True)
    write_json(props_path, dict(properties, case_id=case_id, has_seg=seg is not None))


def case_done(folder: Path, case_id: str) -> bool:
    """True when the case's properties JSON exists (it is written last)."""
    data_path, _, props_path = _paths(folder, case_id)
    return props_path.is_file() and data_path.is_file()


def list_cases(folder: Path) -> list[str]:
    """Case ids of every finished case in ``folder``, sorted."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    ids = [p.name[: -len(PROPS_SUFFIX)] for p in folder.glob(f"*{PROPS_SUFFIX}") if not p.name.startswith(".")]
    return sorted(i for i in ids if case_done(folder, i))


def load_properties(folder: Path, case_id: str) -> dict:
    _, _, props_path = _paths(folder, case_id)
    try:
        return json.loads(props_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise MissingArtefactError(f"{props_path}: preprocessed case {case_id} not found; run `autoliver preprocess` first") from None


def read_case_properties(folder: Path, case_id: str) -> CaseProperties:
    """The typed properties of a preprocessed case (see :class:`CaseProperties`)."""
    _, _, props_path = _paths(folder, case_id)
    return CaseProperties.from_json(load_properties(folder, case_id), str(props_path))


def load_case(folder: Path, case_id: str, mmap: bool = True):
    """(data, seg, properties). With ``mmap`` data/seg are opened blosc2 NDArrays: slicing
    (``data[z0:z1, y0:y1, x0:x1]``) returns a numpy array and decodes only what it touches.
    Without, both are decoded into numpy arrays. ``seg`` is None for a case without label."""
    if not case_done(folder, case_id):
        raise MissingArtefactError(f"{Path(folder) / case_id}: preprocessed case not found or unfinished; run `autoliver preprocess` (it resumes)")
    data_path, seg_path, _ = _paths(folder, case_id)
    props = load_properties(folder, case_id)
    kw = {"mmap_mode": "r"} if mmap else {}
    dparams = blosc2.DParams(nthreads=1)
    data = blosc2.open(str(data_path), mode="r", dparams=dparams, **kw)
    seg = blosc2.open(str(seg_path), mode="r", dparams=dparams, **kw) if props.get("has_seg", seg_path.is_file()) else None
    if not mmap:
        data = data[...]
        seg = None if seg is None else seg[...]
    return data, seg, props
