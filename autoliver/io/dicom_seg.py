"""Liver and tumour label maps as DICOM-SEG objects, and DICOM-SEG objects as label maps.

``write_dicom_seg`` stores a (Z, Y, X) label map (0 background, 1 liver, 2 tumour) that lies on
a DICOM CT series' grid, as ``read_image`` returns it, as a BINARY DICOM Segmentation with two
overlapping segments (``autoliver.io.dicom_seg_codes``): 1 "Liver" = labels 1 + 2 (the liver
structure, tumours included), 2 "Tumour" = label 2. Frame k of a segment is derived from the
series slice at volume index k (slices ordered by their headers, ``dicom_series_headers``);
empty frames are left out. The file is written under a temporary name, read back and checked
voxel for voxel against the input, then renamed into place.

``read_dicom_seg`` does the reverse for any DICOM-SEG (BINARY, FRACTIONAL thresholded at one
half, or LABELMAP): each frame goes to the slice of the source image it names (Referenced SOP
Instance UID), or, when it names none, to the slice at its Image Position (Patient); a frame
that fits neither the series' slices nor its grid is an error naming the file. Segments
become labels through a mapping (``dicom_seg_codes.resolve_mapping``); where segments overlap
the higher label wins, so liver voxels covered by a tumour segment are tumour.
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from pydicom.uid import generate_uid

from autoliver.core.errors import UsageError
from autoliver.core.labels import label_value_problems, liver_mask, tumour_mask
from autoliver.io.atomic import atomic_path
from autoliver.io.dicom_seg_codes import DicomSegError, output_segments, resolve_mapping, segment_infos
from autoliver.io.dicom_series_headers import (
    POSITION_TOLERANCE,
    SeriesSlices,
    class_uid,
    geometry_axes,
    instance_uid,
    read_series_slices,
    same_geometry,
    slice_index,
)
from autoliver.io.images import Geometry, dicom_series_files, read_image

log = logging.getLogger(__name__)

SEGMENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
DEFAULT_DESCRIPTION = "autoliver liver and tumour segmentation"


def _package_version() -> str:
    try:
        return importlib.metadata.version("autoliver")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _person_name(name: str | None) -> str | None:
    """A one-word name as a DICOM person name (its family-name component, "name^")."""
    return name if not name or "^" in name else f"{name}^"


def _prepare_sources(slices: SeriesSlices) -> list:
    """The slice headers as highdicom source images: empty SOP UIDs taken from the file meta, an
    empty Specific Character Set dropped, an empty Study / Series Instance UID (over-anonymised
    series) replaced by one derived from the slices' instance UIDs, with a warning, since the
    SEG must name some study and series."""
    sources = list(slices.headers)
    derived = {}
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID"):
        if not str(sources[0].get(keyword, "") or ""):
            derived[keyword] = generate_uid(entropy_srcs=[keyword, *slices.sop_uids])
            log.warning("%s: the series has no %s; the DICOM-SEG names a derived one (%s), which no archive will know",
                        slices.files[0].parent, keyword, derived[keyword])
    for ds in sources:
        if "SpecificCharacterSet" in ds and not ds.SpecificCharacterSet:
            del ds.SpecificCharacterSet  # empty: the default repertoire, which highdicom wants unstated
        ds.SOPClassUID = class_uid(ds)
        ds.SOPInstanceUID = instance_uid(ds)
        for keyword, uid in derived.items():
            setattr(ds, keyword, uid)
    return sources


def write_dicom_seg(
    labels: np.ndarray,
    series_files: Sequence[str | os.PathLike],
    output: str | os.PathLike,
    *,
    series_description: str = DEFAULT_DESCRIPTION,
    algorithm_name: str = "autoliver",
    algorithm_version: str | None = None,
    content_creator: str | None = "autoliver",
    series_number: int = 300,
    manufacturer: str = "autoliver",
    device_serial_number: str = "0",
    geometry: Geometry | None = None,
    verify: bool = True,
) -> Path:
    """Write ``labels`` (Z, Y, X; 0/1/2) as a DICOM-SEG referring to the series ``series_files``.

    ``labels`` must lie on the series' grid as ``read_image`` returns it (slice k = k-th slice
    along the slice normal); ``geometry``, when given (e.g. the one ``read_image`` returned),
    is checked against the series. Segment 1 "Liver" holds labels 1 and 2 (liver including its
    tumours), segment 2 "Tumour" label 2. ``algorithm_version`` defaults to the installed
    autoliver version. With ``verify`` the written file is read back with ``read_dicom_seg``
    and must reproduce ``labels`` exactly before it replaces ``output``. Returns ``output``.
    """
    import highdicom as hd

    labels = np.asarray(labels)
    problems = label_value_problems("labels to write as DICOM-SEG", labels)
    if labels.ndim != 3 or problems:
        raise UsageError(problems[0] if problems else f"labels must be a 3D (Z, Y, X) array, got shape {labels.shape}")
    slices = read_series_slices(series_files)
    if tuple(labels.shape) != tuple(slices.geometry.shape):
        raise UsageError(f"labels of shape {labels.shape} do not fit the series in {slices.files[0].parent} "
                         f"({slices.geometry.shape[0]} slices of {slices.geometry.shape[1]} x {slices.geometry.shape[2]}); "
                         "give the prediction made for this series")
    if geometry is not None and not same_geometry(geometry, slices.geometry):
        raise UsageError(f"the labels' geometry {geometry} is not the grid of the series in {slices.files[0].parent} "
                         f"({slices.geometry}); give the prediction in the series' own geometry")
    version = algorithm_version or _package_version()
    pixels = np.stack([liver_mask(labels), tumour_mask(labels)], axis=-1)
    with warnings.catch_warnings():  # the source's patient name, copied as it is: nothing to act on
        warnings.filterwarnings("ignore", message=".*unlikely to represent the intended person name", category=UserWarning)
        seg = hd.seg.Segmentation(
            source_images=_prepare_sources(slices),
            pixel_array=pixels,
            segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=output_segments(algorithm_name, version),
            series_instance_uid=hd.UID(),
            series_number=int(series_number),
            sop_instance_uid=hd.UID(),
            instance_number=1,
            manufacturer=manufacturer,
            manufacturer_model_name=algorithm_name,
            software_versions=version,
            device_serial_number=device_serial_number,
            content_description=series_description[:64],
            content_creator_name=_person_name(content_creator),
            content_label="AUTOLIVER",
            series_description=series_description[:64],
            omit_empty_frames=True,
        )
    output = Path(output)
    with atomic_path(output) as tmp:
        seg.save_as(tmp)
        if verify:
            back, _ = read_dicom_seg(tmp, slices)
            differ = int(np.count_nonzero(back != labels))
            if differ:
                raise DicomSegError(f"{output}: the DICOM-SEG read back differs from the labels in {differ} voxels; nothing was written")
    log.info("wrote %s: DICOM-SEG with %d frames on %d slices of %s", output, int(seg.NumberOfFrames), labels.shape[0], slices.files[0].parent)
    return output


def export_dicom_seg(prediction: str | os.PathLike, series_folder: str | os.PathLike, output: str | os.PathLike,
                     series_uid: str | None = None, **options) -> Path:
    """A prediction file (``<case>.nii.gz`` in the series' geometry, as ``autoliver predict``
    writes it for a DICOM input) as a DICOM-SEG of the series in ``series_folder``
    (``series_uid`` picks one of several); ``options`` as for ``write_dicom_seg``."""
    labels, geometry = read_image(prediction)
    problems = label_value_problems(prediction, labels)
    if problems:
        raise UsageError(problems[0])
    files = dicom_series_files(series_folder, series_uid)
    return write_dicom_seg(labels.astype(np.uint8), files, output, geometry=geometry, **options)


def _item(fg, shared, keyword: str):
    """First item of a functional group macro, per-frame first, else shared; None if absent."""
    for group in (fg, shared):
        if group is not None and group.get(keyword):
            return group.get(keyword)[0]
    return None


def _read_seg(path: Path):
    import highdicom as hd

    try:
        seg = hd.seg.segread(str(path))
    except FileNotFoundError:
        raise DicomSegError(f"{path}: file not found") from None
    except Exception as exc:  # pydicom / highdicom raise many types for damaged or non-SEG files
        raise DicomSegError(f"{path}: not a readable DICOM Segmentation ({type(exc).__name__}: {str(exc)[:200]}); "
                            "give a DICOM-SEG file (SOP class 1.2.840.10008.5.1.4.1.1.66.4) or re-export it") from None
    return seg


def _check_plane(path: Path, seg, geometry: Geometry) -> None:
    """Rows, columns, orientation and pixel spacing of the SEG frames against ``geometry``."""
    _, rows, columns = geometry.shape
    if int(seg.Rows) != rows or int(seg.Columns) != columns:
        raise DicomSegError(f"{path}: frames of {seg.Rows} x {seg.Columns} pixels do not fit the series' {rows} x {columns} slices; "
                            "the SEG belongs to another series: give its own series")
    shared = (seg.get("SharedFunctionalGroupsSequence") or [None])[0]
    x, y, _ = geometry_axes(geometry)
    per_frame = seg.get("PerFrameFunctionalGroupsSequence") or [None]
    for fg in (per_frame[0], per_frame[-1]):
        orientation = _item(fg, shared, "PlaneOrientationSequence")
        if orientation is not None:
            iop = np.array([float(v) for v in orientation.ImageOrientationPatient])
            if not (np.allclose(iop[:3], x, atol=1e-3) and np.allclose(iop[3:], y, atol=1e-3)):
                raise DicomSegError(f"{path}: frame orientation {iop.round(4).tolist()} is not the series' orientation "
                                    f"{np.concatenate([x, y]).round(4).tolist()}; the SEG does not fit the series' geometry")
        measures = _item(fg, shared, "PixelMeasuresSequence")
        if measures is not None and measures.get("PixelSpacing"):
            spacing = [float(v) for v in measures.PixelSpacing]
            if not np.allclose(spacing, geometry.spacing[1:], rtol=1e-3):
                raise DicomSegError(f"{path}: frame pixel spacing {spacing} mm is not the series' {list(geometry.spacing[1:])} mm; "
                                    "the SEG does not fit the series' geometry")


def _frame_slice(path: Path, number: int, fg, shared, geometry: Geometry, uid_index: dict[str, int] | None) -> int:
    """The volume slice a frame belongs to: by its source instance UID, else its position."""
    position = _item(fg, shared, "PlanePositionSequence")
    ipp = np.array([float(v) for v in position.ImagePositionPatient]) if position is not None else None
    refs: list[str] = []
    for derivation in (fg.get("DerivationImageSequence") or []) if fg is not None else []:
        refs += [str(src.ReferencedSOPInstanceUID) for src in derivation.get("SourceImageSequence") or [] if src.get("ReferencedSOPInstanceUID")]
    k: int | None = None
    if uid_index is not None and refs:
        hits = {uid_index[r] for r in refs if r in uid_index}
        if not hits:
            raise DicomSegError(f"{path}: frame {number} refers to image {refs[0]}, which is not in the given series; the SEG "
                                "belongs to another series or the series is incomplete: give the complete series it was made on")
        if len(hits) > 1:
            raise DicomSegError(f"{path}: frame {number} refers to {len(hits)} different slices of the series; re-export the SEG")
        k = hits.pop()
    if ipp is None:
        if k is None:
            raise DicomSegError(f"{path}: frame {number} has neither a source image reference nor an Image Position; it cannot be placed")
        return k
    fk, fi, fj = slice_index(geometry, ipp)
    nearest = int(round(fk))
    off_grid = max(abs(fk - nearest), abs(fi), abs(fj)) > POSITION_TOLERANCE
    if k is not None and (off_grid or nearest != k):
        raise DicomSegError(f"{path}: frame {number} lies at {ipp.round(3).tolist()} mm, but its source slice {k} lies at "
                            f"slice position {fk:.2f} (row {fi:.2f}, column {fj:.2f}); the frames do not fit the series geometry")
    if k is None and (off_grid or not 0 <= nearest < geometry.shape[0]):
        raise DicomSegError(f"{path}: frame {number} at {ipp.round(3).tolist()} mm falls at slice {fk:.2f} (row {fi:.2f}, column "
                            f"{fj:.2f}) of a {geometry.shape[0]}-slice grid; the frames do not fit the series geometry")
    return nearest if k is None else k


def read_dicom_seg(
    seg_path: str | os.PathLike,
    reference: Sequence[str | os.PathLike] | Geometry | SeriesSlices,
    mapping: Mapping[str, int] | None = None,
) -> tuple[np.ndarray, Geometry]:
    """A DICOM-SEG as a (Z, Y, X) uint8 label map on its source series' grid, and that grid.

    ``reference`` is the source series (its slice files, or ``SeriesSlices``) or just the grid
    (a ``Geometry``, frames then placed by position alone). ``mapping`` maps segment labels to
    0 (ignore), 1 (liver) or 2 (tumour); None infers it (``dicom_seg_codes``).
    """
    path = Path(seg_path)
    if isinstance(reference, SeriesSlices):
        slices: SeriesSlices | None = reference
    elif isinstance(reference, Geometry):
        slices = None
    else:
        slices = read_series_slices(reference)
    geometry = slices.geometry if slices is not None else reference
    seg = _read_seg(path)
    if str(seg.get("SOPClassUID", "")) != SEGMENTATION_STORAGE:
        raise DicomSegError(f"{path}: SOP class {seg.get('SOPClassUID', '')} is not a DICOM Segmentation; give a DICOM-SEG file")
    to_label = resolve_mapping(segment_infos(seg), mapping, path)
    _check_plane(path, seg, geometry)
    kind = str(seg.SegmentationType)
    shared = (seg.get("SharedFunctionalGroupsSequence") or [None])[0]
    per_frame = seg.get("PerFrameFunctionalGroupsSequence") or []
    uid_index = slices.index_of_uid() if slices is not None else None
    lut = np.zeros(max([0, *to_label]) + 1, dtype=np.uint8)
    for number, value in to_label.items():
        lut[number] = value
    max_fraction = float(seg.get("MaximumFractionalValue", 1) or 1)
    labels = np.zeros(geometry.shape, dtype=np.uint8)
    for i in range(int(seg.get("NumberOfFrames", 1) or 1)):
        fg = per_frame[i] if i < len(per_frame) else None
        if kind != "LABELMAP":
            ident = _item(fg, shared, "SegmentIdentificationSequence")
            segment = int(ident.ReferencedSegmentNumber) if ident is not None else 0
            if not 0 < segment < lut.size or lut[segment] == 0:
                continue
        k = _frame_slice(path, i + 1, fg, shared, geometry, uid_index)
        frame = np.asarray(seg.get_stored_frame(i + 1))
        if kind == "LABELMAP":
            painted = lut[np.clip(frame, 0, lut.size - 1)] * (frame < lut.size)
        elif kind == "FRACTIONAL":
            painted = np.where(frame.astype(np.float64) * 2 >= max_fraction, lut[segment], 0)
        else:
            painted = np.where(frame > 0, lut[segment], 0)
        np.maximum(labels[k], painted.astype(np.uint8), out=labels[k])
    return labels, geometry
