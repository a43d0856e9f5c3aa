"""Inference: sliding window (shared with training validation), models and ensembles, the
cascade, ROI-first prediction, export to the input grid, and the folder runner."""
