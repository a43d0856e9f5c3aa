"""One measured setting in a fresh process: ``python -m benchmarks.child MODULE:FUNCTION SPEC.json RESULT.json``.

``SPEC.json`` holds ``{"kwargs": {...}}`` (the function is called with them) or ``{"argv": [...]}``
(``sys.argv`` is set to them and the function is called without arguments: a command-line
entry point such as ``autoliver.cli:main`` or nnU-Net's ``predict_entry_point``). At the end
the process writes ``RESULT.json``: the function's return value (``value``, JSON), its exit
status, and this process's own peak resident memory, read from ``VmHWM`` in
``/proc/self/status`` (``ru_maxrss`` where there is no /proc). VmHWM belongs to this process
image alone: unlike ``ru_maxrss`` of a long-lived parent, it never carries an earlier setting's
peak. The peak of the largest worker process it waited for (``RUSAGE_CHILDREN``) is reported
beside it. Standard library only: this also runs under nnU-Net's Python.
"""

from __future__ import annotations

import importlib
import json
import resource
import sys
import time
import traceback
from pathlib import Path


def peak_rss_bytes() -> tuple[int, str]:
    """(peak resident memory of this process in bytes, where it was read)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024, "VmHWM"
    except OSError:
        pass
    scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, kB elsewhere
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale, "ru_maxrss"


def allocate(mib: int) -> int:
    """A setting of known size: hold ``mib`` MiB of written (resident) memory; checks the measurement."""
    block = b"\x01" * (mib * 2**20)
    return len(block) // 2**20


def main(argv: list[str] | None = None) -> int:
    target, spec_path, result_path = argv if argv is not None else sys.argv[1:]
    spec = json.loads(Path(spec_path).read_text())
    out: dict = {"target": target, "ok": False, "exit_code": None, "value": None, "error": None}
    t0, c0 = time.perf_counter(), time.process_time()
    try:
        module, _, name = target.partition(":")
        fn = getattr(importlib.import_module(module), name)
        out["peak_rss_before_call"] = peak_rss_bytes()[0]  # interpreter + imports
        if "argv" in spec:  # an entry point: returns its exit status (or None)
            sys.argv = [target, *spec["argv"]]
            status = fn()
            out["exit_code"] = status if isinstance(status, int) else 0
        else:
            out["value"], out["exit_code"] = fn(**spec.get("kwargs", {})), 0
    except SystemExit as exc:
        out["exit_code"] = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException as exc:  # noqa: BLE001 - reported to the parent
        traceback.print_exc()
        out.update(exit_code=1, error=f"{type(exc).__name__}: {exc}")
    if out["exit_code"] != 0 and out["error"] is None:
        out["error"] = f"exit status {out['exit_code']}"
    out["ok"] = out["error"] is None
    out["wall_s"] = time.perf_counter() - t0
    out["cpu_s"] = time.process_time() - c0
    out["peak_rss"], out["peak_rss_source"] = peak_rss_bytes()
    out["children_peak_rss"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    sys.stdout.flush()
    Path(result_path).write_text(json.dumps(out, default=str))
    return 0 if out["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
