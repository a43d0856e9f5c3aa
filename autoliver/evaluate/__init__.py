"""Evaluation of predicted label maps against references: overlap, surface distances, lesion
detection, tumour burden (LiTS metrics). ``evaluate_folders`` is the folder runner."""

from autoliver.evaluate.detection import DetectionResult, LesionMatch, detect_lesions, detection_summary, label_lesions, match_lesions
from autoliver.evaluate.overlap import (
    OverlapCounts,
    accuracy,
    dice,
    f1,
    iou,
    overlap_counts,
    overlap_metrics,
    precision,
    recall,
    rvd,
    voe,
)
from autoliver.evaluate.runner import CSV_COLUMNS, evaluate_case, evaluate_folders, read_label_map, summarise
from autoliver.evaluate.surface import SurfaceDistances, assd, bounding_box, hd95, mssd, surface, surface_distances, surface_metrics
from autoliver.evaluate.table import evaluation_table

__all__ = [
    "CSV_COLUMNS",
    "DetectionResult",
    "LesionMatch",
    "OverlapCounts",
    "SurfaceDistances",
    "accuracy",
    "assd",
    "bounding_box",
    "detect_lesions",
    "detection_summary",
    "dice",
    "evaluate_case",
    "evaluate_folders",
    "evaluation_table",
    "f1",
    "hd95",
    "iou",
    "label_lesions",
    "match_lesions",
    "mssd",
    "overlap_counts",
    "overlap_metrics",
    "precision",
    "read_label_map",
    "recall",
    "rvd",
    "summarise",
    "surface",
    "surface_distances",
    "surface_metrics",
    "voe",
]
