"""Built inputs cached under the cache folder, keyed by the parameters that built them.

``entry(ctx, kind, params, build)`` returns ``CACHE/<kind>-<hash of params>/``: built by
``build(folder)`` in place the first time (``params.json`` records the parameters, a
``.complete`` stamp is written last), reused as long as the stamp is there. An entry cut
short (no stamp) is removed and built again; ``rebuild`` builds it again regardless.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)


def key(params: dict) -> str:
    return hashlib.sha1(json.dumps(params, sort_keys=True, default=str).encode()).hexdigest()[:12]


def entry(ctx, kind: str, params: dict, build: Callable[[Path], object], rebuild: bool = False) -> Path:
    folder = ctx.cache / f"{kind}-{key(params)}"
    stamp = folder / ".complete"
    if stamp.is_file() and not rebuild:
        log.info("reusing %s", folder)
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    (folder / "params.json").write_text(json.dumps(params, indent=1, sort_keys=True, default=str))
    log.info("building %s: %s", folder, params)
    build(folder)
    stamp.touch()
    return folder


def exists(ctx, kind: str, params: dict) -> Path | None:
    folder = ctx.cache / f"{kind}-{key(params)}"
    return folder if (folder / ".complete").is_file() else None
