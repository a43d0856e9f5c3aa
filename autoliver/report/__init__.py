"""Reports: per-case measurements of a predicted segmentation."""
