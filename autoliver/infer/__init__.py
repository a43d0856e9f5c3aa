"""Inference: sliding-window prediction (shared by training validation and prediction)."""
