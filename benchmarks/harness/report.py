"""The one report format: ``OUT/NAME.json`` and a printed Markdown table.

The JSON holds the benchmark's name and settings, the machine (CPU model and the vector and
matrix flags from /proc/cpuinfo, CPU count, RAM, platform, load average), the versions (python,
torch, numpy, autoliver, nnunetv2 where importable, and those of nnU-Net's own environment
where it ran), the thread counts, notes (such as a skipped nnU-Net side) and the results:
``results["rows"]``, flat records printed as the table (one table per value of a row's
``table`` key, where rows have one), plus anything else a benchmark keeps.

Comparison rows carry ``metric``, ``autoliver``, ``nnunet`` and ``better`` ("lower" or
"higher"); ``compare`` adds ``advantage``: nnU-Net / autoliver for lower-is-better metrics,
autoliver / nnU-Net for higher-is-better ones, so above 1 always means autoliver is ahead.
"""

from __future__ import annotations

import importlib.metadata as md
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import psutil

CPU_FLAG_PREFIXES = ("sse4", "avx", "fma", "f16c", "amx", "vnni", "bf16", "neon", "asimd", "sve")
PACKAGES = ("autoliver", "torch", "numpy", "nnunetv2")


def cpu_info() -> dict:
    """Model name and the SIMD / matrix flags of this CPU, from /proc/cpuinfo."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip().lower()
            if key in ("model name", "hardware", "cpu model") and value.strip():
                model = value.strip()
            elif key in ("flags", "features"):
                flags.update(value.split())
    except OSError:
        pass
    wanted = sorted(f for f in flags if f.startswith(CPU_FLAG_PREFIXES) or any(p in f for p in ("avx512", "amx", "vnni")))
    return {"model": model, "flags": wanted, "logical_cpus": os.cpu_count()}


def versions(python: str | os.PathLike | None = None, packages=PACKAGES) -> dict:
    """Versions of ``packages`` in this environment, or in another Python's (None: not installed)."""
    if python is None:
        out = {"python": platform.python_version()}
        for p in packages:
            try:
                out[p] = md.version(p)
            except md.PackageNotFoundError:
                out[p] = None
        return out
    code = ("import importlib.metadata as m, json, platform, sys\nout = {'python': platform.python_version()}\n"
            "for p in sys.argv[1:]:\n    try: out[p] = m.version(p)\n    except m.PackageNotFoundError: out[p] = None\nprint(json.dumps(out))")
    try:
        res = subprocess.run([str(python), "-c", code, *packages], capture_output=True, text=True, check=True, timeout=120)
        return json.loads(res.stdout)
    except (OSError, subprocess.SubprocessError, json.JSONDecodeError):
        return {p: None for p in packages}


def environment(threads: int | None) -> dict:
    threads_info = {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"), "requested": threads}
    if "torch" in sys.modules:
        threads_info["torch"] = sys.modules["torch"].get_num_threads()
    return {"versions": versions(), "cpu": cpu_info(), "threads": threads_info, "ram_bytes": psutil.virtual_memory().total,
            "platform": platform.platform(), "loadavg": list(os.getloadavg())}


def compare(values: dict[str, dict], higher_better=(), no_ratio=(), **group) -> list[dict]:
    """Comparison rows from ``{tool: {metric: value}}`` (tools: "autoliver", "nnunet")."""
    labels = list(dict.fromkeys(k for v in values.values() for k in v))
    rows = []
    for label in labels:
        a, n = values.get("autoliver", {}).get(label), values.get("nnunet", {}).get(label)
        row = {**group, "metric": label, "autoliver": a}
        if "nnunet" in values:
            row["nnunet"] = n
        if label not in no_ratio:
            row["better"] = "higher" if label in higher_better else "lower"
            if _number(a) and _number(n) and a and n:
                row["advantage"] = a / n if label in higher_better else n / a
        rows.append(row)
    return rows


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _cell(v) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.4g}" if abs(v) < 1e5 else f"{v:.0f}"
    if isinstance(v, (list, tuple)):
        return " x ".join(map(_cell, v))
    return str(v).replace("|", "/")


HEADERS = {"autoliver": "autoliver", "nnunet": "nnU-Net v2", "advantage": "autoliver advantage", "better": "better"}


def markdown(rows: list[dict]) -> str:
    """``rows`` as one Markdown table (columns: every key, in order of first appearance)."""
    if not rows:
        return "(no rows)"
    cols = list(dict.fromkeys(k for r in rows for k in r))
    lines = ["| " + " | ".join(HEADERS.get(c, c) for c in cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(_cell(r[c]) if c in r else "" for c in cols) + " |")
    return "\n".join(lines)


def print_report(report: dict) -> None:
    env = report["environment"]
    print(f"\n## {report['benchmark']}{' (quick)' if report.get('quick') else ''}")
    tables: dict = {}  # rows with a "table" key are printed as one table per value
    for r in report["results"].get("rows", []):
        tables.setdefault(r.get("table"), []).append({k: v for k, v in r.items() if k != "table"})
    for title, rows in tables.items():
        print(f"\n{'### ' + title + chr(10) + chr(10) if title else ''}{markdown(rows)}")
    if any("advantage" in r for r in report["results"].get("rows", [])):
        print("\nautoliver advantage: nnU-Net / autoliver for times and memory, autoliver / nnU-Net for rates and Dice "
              "(above 1: autoliver faster, leaner or more accurate)")
    for note in report.get("notes", []):
        print(f"\nnote: {note}")
    print(f"\n{env['cpu']['model']}, {env['cpu']['logical_cpus']} CPUs, load {env['loadavg'][0]:.1f} -> {report['loadavg_end'][0]:.1f}; "
          f"{report['wall_s']:.1f} s")


def write_report(path: Path, name: str, ctx, results: dict, env: dict, t0: float, partial: bool = False) -> dict:
    report = {"benchmark": name, "quick": ctx.quick, "partial": partial, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "argv": ctx.argv, "settings": ctx.settings(), "environment": env, "nnunet": ctx.nnunet_status(),
              "notes": list(ctx.notes), "results": results, "wall_s": time.perf_counter() - t0, "loadavg_end": list(os.getloadavg())}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(report, indent=2, default=str) + "\n")
    tmp.replace(path)
    return report
