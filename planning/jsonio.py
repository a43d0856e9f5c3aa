"""Reading a JSON artefact safely: one error naming the file and the fix for a missing,
unreadable, non-UTF-8, invalid, too deeply nested or too large file. ``planning`` reads
plans.json and fingerprint.json with it; autoliver's readers use it through
``autoliver.io.jsonfile.read_json``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from planning.errors import AutoliverError

MAX_JSON_BYTES = 256 * 1024 * 1024


def read_json_file(path: str | Path, error: type[AutoliverError], fix: str, missing_fix: str | None = None) -> Any:
    """The parsed content of ``path``; ``error(message)`` naming the file and ``fix`` otherwise
    (``missing_fix`` for a missing file)."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > MAX_JSON_BYTES:
            raise error(f"{path}: {size} bytes is far too large for this JSON file; {fix}")
        return json.loads(path.read_bytes().decode("utf-8"))
    except AutoliverError:
        raise
    except FileNotFoundError:
        raise error(f"{path}: not found; {missing_fix or fix}") from None
    except OSError as exc:
        raise error(f"{path}: cannot be read ({exc.strerror or exc}); check the file's permissions") from None
    except UnicodeDecodeError:
        raise error(f"{path}: not UTF-8 text; {fix}") from None
    except json.JSONDecodeError as exc:
        raise error(f"{path}: not valid JSON ({exc}); {fix}") from None
    except ValueError as exc:
        raise error(f"{path}: not usable JSON ({exc}); {fix}") from None
    except RecursionError:
        raise error(f"{path}: JSON nested too deeply to be a real artefact; {fix}") from None
