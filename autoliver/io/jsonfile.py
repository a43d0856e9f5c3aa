"""Reading a JSON artefact safely: one message naming the file and the fix for every way it can
be broken (not found, unreadable, not UTF-8, not JSON, nested too deep, too large, an integer
too long to parse). Every JSON artefact autoliver reads comes through here (``planning`` reads
its own two, plans.json and fingerprint.json, with the same rules: ``planning.plans.read_json_file``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from autoliver.core.errors import AutoliverError

MAX_JSON_BYTES = 256 * 1024 * 1024  # a plans/dataset/inference-plan file is kilobytes; this is far beyond any real one


def read_json(path: str | Path, error: type[AutoliverError] = AutoliverError, fix: str = "fix or rebuild it") -> Any:
    """The parsed content of ``path``; ``error(message)`` naming the file and ``fix`` otherwise."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > MAX_JSON_BYTES:
            raise error(f"{path}: {size} bytes is far too large for this JSON file; {fix}")
        text = path.read_bytes().decode("utf-8")
        return json.loads(text)
    except AutoliverError:
        raise
    except FileNotFoundError:
        raise error(f"{path}: not found; {fix}") from None
    except OSError as exc:
        raise error(f"{path}: cannot be read ({exc.strerror or exc}); check the file's permissions") from None
    except UnicodeDecodeError:
        raise error(f"{path}: not UTF-8 text; {fix}") from None
    except json.JSONDecodeError as exc:
        raise error(f"{path}: not valid JSON ({exc}); {fix}") from None
    except ValueError as exc:  # e.g. an integer of more digits than Python converts
        raise error(f"{path}: not usable JSON ({exc}); {fix}") from None
    except RecursionError:
        raise error(f"{path}: JSON nested too deeply to be a real artefact; {fix}") from None
