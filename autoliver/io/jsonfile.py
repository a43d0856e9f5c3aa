"""Reading a JSON artefact safely: one message naming the file and the fix for every way it can
be broken (not found, unreadable, not UTF-8, not JSON, nested too deep, too large, an integer
too long to parse). Every JSON artefact autoliver reads comes through here; the rules live in
``planning.jsonio`` (the lowest layer), which plans.json and fingerprint.json use directly."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from autoliver.core.errors import AutoliverError
from planning.jsonio import MAX_JSON_BYTES, read_json_file


def read_json(path: str | Path, error: type[AutoliverError] = AutoliverError, fix: str = "fix or rebuild it") -> Any:
    """The parsed content of ``path``; ``error(message)`` naming the file and ``fix`` otherwise."""
    return read_json_file(path, error, fix)


__all__ = ["MAX_JSON_BYTES", "read_json"]
