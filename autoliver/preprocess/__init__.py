"""Preprocessing: crop to body, normalise, resample, store; and map predictions back."""
