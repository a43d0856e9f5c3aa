"""The root of the project's error hierarchy.

It lives here, in the lowest layer, so that ``planning`` raises the same errors as the rest of
autoliver without importing it; ``autoliver.core.errors`` builds the rest of the hierarchy on
these two classes.
"""

from __future__ import annotations


class AutoliverError(Exception):
    """Base of every error autoliver raises for bad input, bad arguments or missing artefacts."""


class PlanError(AutoliverError):
    """Planning could not produce a valid configuration, or a plan file is invalid."""
