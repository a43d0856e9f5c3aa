"""Side by side: nnU-Net v2 `nnUNetv2_predict` against `autoliver predict` on the CPU, each with a model it trained itself.

Both tools train their ``2d`` configuration on the same training cases (the real example cases
shipped with autoliver plus medium-size phantoms) for the same wall-clock budget, at the same
patch and batch size (autoliver's CPU plan; nnU-Net gets its own planner-derived U-Net for that
patch), with the same torch thread count and loader workers. Then each predicts the same
held-out test folder (real cases plus LiTS-size phantoms, 512 x 512 x 420 at 1.0 x 0.77 x 0.77 mm)
in one command, with test-time augmentation (mirroring) on and off. For each prediction run:
seconds per case (wall / cases; per case from autoliver's reports and nnU-Net's timestamped log),
start-up until the model is loaded, CPU time, peak summed RSS / PSS of the process tree and its
largest process (``_measure.measure_command``), and the liver and tumour Dice of every case
against its reference. Prints a table with the ratios nnU-Net / autoliver (above 1: autoliver
faster, leaner, or, for Dice, autoliver / nnU-Net: more accurate) and writes a JSON of everything,
with the load average before and after each run.

Trained models stay in --workdir; ``--skip-train`` reuses them and measures prediction only.

    python benchmarks/bench_predict_vs_nnunet.py --workdir /tmp/bench_predict --nnunet-venv VENV   # full run
    python benchmarks/bench_predict_vs_nnunet.py --workdir /tmp/bench_predict --nnunet-venv VENV --skip-train
    python benchmarks/bench_predict_vs_nnunet.py --workdir /tmp/bp_smoke --train-minutes 1 --n-train-phantoms 2 \
        --test-phantom-shape 40 256 256 --test-real dcmqi_ct3slice          # a quick check of the machinery

Run time on this project's 2-core machine with the defaults (measured while other jobs kept
its load average at 3-13): data and both preprocessings 2.5 min, training 2 x 9 min, prediction
with TTA off 15 min (nnU-Net) + 1 min (autoliver), with TTA on about 60 min (nnU-Net: 16 min for
chaos_ct_sample, the LiTS-size case about 4 x its 7.5 min without TTA) + 4 min (autoliver):
about 1 h 45 min in all, 1 h 20 min of it prediction (``--skip-train``). Less: ``--tta off``
(about 40 min in all), or coarser training phantoms (``--train-phantom-spacing 2.5 2.5 2.5``
should put the LiTS-size case on about one tile per slice instead of four; not measured).
See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _measure import human_bytes, measure_command  # noqa: E402
from bench_plan_and_preprocess import (  # noqa: E402
    DEFAULT_NNUNET_VENV,
    NNUNET_VENV_ENV,
    default_autoliver_cmd,
    describe_dataset,
    ensure_nnunet,
    package_versions,
)
from bench_train_vs_nnunet import autoliver_config, autoliver_parameters, prepare_autoliver, prepare_nnunet  # noqa: E402

HERE = Path(__file__).resolve().parent
TRAINER = HERE / "nnunet_train_budget.py"
CONFIG = "2d"
FOLD = "all"
PLANS_OUT = "nnUNetPlansBench"
TOOLS = ("nnunet", "autoliver")
TOOL_NAMES = {"nnunet": "nnU-Net v2", "autoliver": "autoliver"}
TRAIN_REAL = ("lits117_128cube", "totalseg_example_ct_full", "dcmqi_ct3slice")
TEST_REAL = ("chaos_ct_sample", "totalseg_example_dicom20")

log = logging.getLogger("bench_predict_vs_nnunet")


# ----------------------------------------------------------------------------- data

def _reuse(stamp: Path, recipe: dict, ready: bool) -> bool:
    return ready and stamp.is_file() and json.loads(stamp.read_text()) == recipe


def build_train_dataset(raw_root: Path, name: str, real: list[str], n_phantoms: int, shape, spacing, seed: int) -> tuple[Path, dict]:
    """The raw training dataset (nnU-Net v2 layout); reused when built with the same settings."""
    from autoliver.examples.dataset import build_example_dataset

    root = raw_root / name
    recipe = {"real_cases": list(real), "n_phantoms": n_phantoms, "phantom_shape": list(shape), "phantom_spacing": list(spacing), "seed": seed}
    stamp = raw_root / f".{name}.recipe.json"
    if _reuse(stamp, recipe, root.is_dir()):
        log.info("reusing raw training dataset %s", root)
        return root, recipe
    log.info("building raw training dataset %s: %s + %d phantoms %s at %s mm", root, ", ".join(real), n_phantoms, shape, spacing)
    raw_root.mkdir(parents=True, exist_ok=True)
    build_example_dataset(root, real_cases=tuple(real), n_phantoms=n_phantoms, phantom_shape=tuple(shape),
                          phantom_spacing=tuple(spacing), seed=seed, overwrite=True)
    stamp.write_text(json.dumps(recipe))
    return root, recipe


def build_test_set(folder: Path, real: list[str], n_phantoms: int, shape, spacing, n_tumours: int, seed: int) -> dict:
    """``folder/images/<case>_0000.nii.gz`` and ``folder/labels/<case>.nii.gz``: real cases copied, phantoms
    ``test_phantom_k`` from a generator seeded (seed, 1000 + k), so none equals a training phantom."""
    from autoliver.examples import image_path, label_path
    from autoliver.examples.phantom import make_phantom
    from autoliver.io.images import Geometry, write_image

    recipe = {"real_cases": list(real), "n_phantoms": n_phantoms, "phantom_shape": list(shape), "phantom_spacing": list(spacing),
              "n_tumours": n_tumours, "seed": seed}
    stamp = folder / "recipe.json"
    if _reuse(stamp, recipe, (folder / "images").is_dir()):
        log.info("reusing test set %s", folder)
        return recipe
    shutil.rmtree(folder, ignore_errors=True)
    (folder / "images").mkdir(parents=True)
    (folder / "labels").mkdir()
    for case in real:
        shutil.copyfile(image_path(case), folder / "images" / f"{case}_0000.nii.gz")
        shutil.copyfile(label_path(case), folder / "labels" / f"{case}.nii.gz")
    for k in range(n_phantoms):
        case = f"test_phantom_{k:03d}"
        log.info("writing %s %s at %s mm", case, shape, spacing)
        image, label = make_phantom(tuple(shape), tuple(spacing), np.random.default_rng([seed, 1000 + k]), n_tumours=n_tumours)
        geometry = Geometry(tuple(image.shape), tuple(float(s) for s in spacing), (0.0, 0.0, 0.0), (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))
        write_image(folder / "images" / f"{case}_0000.nii.gz", image, geometry)
        write_image(folder / "labels" / f"{case}.nii.gz", label, geometry)
        del image, label
    stamp.write_text(json.dumps(recipe))
    return recipe


def describe_test_set(folder: Path) -> list[dict]:
    from autoliver.io.images import read_header

    out = []
    for path in sorted((folder / "images").glob("*_0000.nii.gz")):
        geom, _, _ = read_header(path)
        out.append({"case": path.name[: -len("_0000.nii.gz")], "shape_zyx": list(geom.shape),
                    "spacing_zyx": [round(s, 4) for s in geom.spacing], "bytes": path.stat().st_size})
    return out


# ----------------------------------------------------------------------------- training

def _train_stamp(recipe: dict, patch: list[int], batch: int, args: argparse.Namespace) -> dict:
    return {"data": recipe, "patch": patch, "batch": batch, "minutes": args.train_minutes, "threads": args.threads,
            "loader_workers": args.loader_workers, "configuration": CONFIG, "fold": FOLD}


def autoliver_model_dir(ws: Path, name: str) -> Path:
    return ws / "results" / name


def nnunet_model_dir(work: Path, name: str) -> Path:
    return work / "nnunet_results" / name / f"nnUNetTrainer__{PLANS_OUT}__{CONFIG}"


def train_nnunet(venv: Path, pre: Path, work: Path, name: str, patch: list[int], batch: int, args: argparse.Namespace) -> dict:
    out = work / "train_nnunet.json"
    out.unlink(missing_ok=True)
    shutil.rmtree(nnunet_model_dir(work, name), ignore_errors=True)
    cmd = [str(venv / "bin" / "python"), str(TRAINER), "--preprocessed", str(pre), "--results", str(work / "nnunet_results"),
           "--dataset", name, "--configuration", CONFIG, "--patch", *map(str, patch), "--batch", str(batch), "--fold", FOLD,
           "--plans-out", PLANS_OUT, "--minutes", str(args.train_minutes), "--threads", str(args.threads),
           "--loader-workers", str(args.loader_workers), "--timeout", str(args.timeout), "--out", str(out)]
    log.info("nnU-Net training: %s", shlex.join(cmd))
    load0 = os.getloadavg()
    m = measure_command(cmd, env=_env(args), log_path=work / "train_nnunet.log", poll_s=1.0, timeout_s=args.timeout + 60)
    r = json.loads(out.read_text()) if out.is_file() else {"ok": False, "error": "no result file"}
    r.update(process=m.to_json(), loadavg_start=list(load0), loadavg_end=list(os.getloadavg()))
    if m.returncode != 0 or not r.get("ok"):
        raise SystemExit(f"nnU-Net training failed (exit {m.returncode}): {r.get('error')}; see {work / 'train_nnunet.log'}")
    out.write_text(json.dumps(r, indent=2) + "\n")
    return r


def train_autoliver(cmd: list[str], ws: Path, work: Path, name: str, cfg, args: argparse.Namespace) -> dict:
    fold_dir = autoliver_model_dir(ws, name) / CONFIG / f"fold_{FOLD}"
    shutil.rmtree(fold_dir, ignore_errors=True)
    train_cmd = [*cmd, "train", "-d", name, CONFIG, FOLD, "--workspace", str(ws), "--budget-minutes", str(args.train_minutes),
                 "--device", "cpu", "-np", str(args.loader_workers), "--threads", str(args.threads), "--no-progress"]
    log.info("autoliver training: %s", shlex.join(train_cmd))
    load0 = os.getloadavg()
    m = measure_command(train_cmd, env=_env(args), log_path=work / "train_autoliver.log", poll_s=1.0, timeout_s=args.timeout + 60)
    if m.returncode != 0 or not (fold_dir / "checkpoint_final.pt").is_file():
        raise SystemExit(f"autoliver training failed (exit {m.returncode}); see {work / 'train_autoliver.log'}")
    records = [json.loads(line) for line in (fold_dir / "log.jsonl").read_text().splitlines() if line.strip()]
    r = {"tool": "autoliver", "ok": True, "configuration": CONFIG, "fold": FOLD, "patch_size": list(cfg.patch_size),
         "batch_size": cfg.batch_size, "spacing": list(cfg.spacing), "budget_minutes": args.train_minutes,
         "epochs": len(records), "iterations": sum(int(x["samples"]) for x in records) // cfg.batch_size,
         "samples": sum(int(x["samples"]) for x in records), "training_s": sum(float(x["epoch_s"]) for x in records),
         "iters_per_epoch": records[0]["iters"] if records else None,
         "network": {"n_stages": cfg.n_stages, "features_per_stage": list(cfg.features_per_stage),
                     "strides": [list(s) for s in cfg.strides], "parameters": autoliver_parameters(cfg)},
         "checkpoint": str(fold_dir / "checkpoint_final.pt"), "process": m.to_json(),
         "loadavg_start": list(load0), "loadavg_end": list(os.getloadavg())}
    (work / "train_autoliver.json").write_text(json.dumps(r, indent=2) + "\n")
    return r


# ----------------------------------------------------------------------------- prediction

class LineClock(threading.Thread):
    """Timestamps the lines a running command writes to its log (seconds since ``t0``)."""

    def __init__(self, path: Path, t0: float, poll_s: float = 0.2):
        super().__init__(daemon=True)
        self.path, self.t0, self.poll_s = path, t0, poll_s
        self.lines: list[tuple[float, str]] = []
        self._done = threading.Event()
        self._buf, self._pos = "", 0

    def _read(self) -> None:
        try:
            with open(self.path, "rb") as f:
                f.seek(self._pos)
                chunk = f.read()
        except FileNotFoundError:
            return
        if not chunk:
            return
        self._pos += len(chunk)
        now = time.perf_counter() - self.t0
        self._buf += chunk.decode("utf-8", "replace").replace("\r", "\n")
        *done, self._buf = self._buf.split("\n")
        self.lines += [(now, line) for line in done if line.strip()]

    def run(self) -> None:
        while not self._done.wait(self.poll_s):
            self._read()

    def stop(self) -> list[tuple[float, str]]:
        self._done.set()
        self.join()
        self._read()
        if self._buf.strip():
            self.lines.append((time.perf_counter() - self.t0, self._buf))
        return self.lines


def _first(lines: list[tuple[float, str]], pattern: str) -> float | None:
    rx = re.compile(pattern)
    return next((t for t, line in lines if rx.search(line)), None)


def nnunet_timings(lines: list[tuple[float, str]]) -> dict:
    """Start-up (model loaded: 'There are N cases') and per case network seconds ('Predicting X:' ->
    'sending off prediction') from nnU-Net's timestamped output; its export runs in background workers."""
    per_case, current = {}, None
    for t, line in lines:
        m = re.match(r"\s*Predicting (\S+):\s*$", line)
        if m:
            current = (m[1], t)
        elif current and line.startswith("sending off prediction"):
            per_case[current[0]] = {"network_s": t - current[1]}
            current = None
    return {"startup_s": _first(lines, r"There are \d+ cases in the source folder"),
            "first_case_s": _first(lines, r"^\s*Predicting \S+:"), "per_case": per_case,
            "last_network_end_s": _first(lines, r"prediction completed|Waiting for remaining")}


def autoliver_timings(lines: list[tuple[float, str]], out_dir: Path, cases: list[str]) -> dict:
    """Start-up ('predicting N case(s)': model loaded) from the log and each case's stage seconds from its report."""
    per_case = {}
    for case in cases:
        report = out_dir / f"{case}.json"
        if report.is_file():
            runtime = json.loads(report.read_text()).get("runtime_s", {})
            # read and preprocess run in a prefetch thread during the previous case; where the report has
            # the wait for them (wait_input_s), that is what this case spent on them
            overlapped = ("read_s", "preprocess_s") if "wait_input_s" in runtime else ()
            per_case[case] = {**runtime, "total_s": sum(v for k, v in runtime.items() if isinstance(v, (int, float)) and k not in overlapped)}
    return {"startup_s": _first(lines, r"predicting \d+ case"), "per_case": per_case}


def score(pred_dir: Path, labels: Path, cases: list[str]) -> dict:
    """Liver (labels 1 + 2) and tumour (2) Dice of every case, LiTS empty rule (autoliver's case_dice)."""
    from autoliver.evaluate.overlap import case_dice
    from autoliver.io.images import read_image

    out = {}
    for case in cases:
        path = pred_dir / f"{case}.nii.gz"
        if not path.is_file():
            out[case] = {"liver": None, "tumour": None, "error": "no prediction"}
            continue
        pred, gp = read_image(path)
        ref, gr = read_image(labels / f"{case}.nii.gz")
        if pred.shape != ref.shape:
            out[case] = {"liver": None, "tumour": None, "error": f"shape {pred.shape} != reference {ref.shape}"}
            continue
        out[case] = case_dice(pred.astype(np.uint8), ref.astype(np.uint8))
        out[case]["spacing_matches"] = bool(np.allclose(gp.spacing, gr.spacing, rtol=1e-4))
    return out


def _mean(values) -> float | None:
    vals = [v for v in values if isinstance(v, (int, float))]
    return float(np.mean(vals)) if vals else None


def autoliver_flags(cmd: list[str]) -> dict:
    """Which optional `autoliver predict` flags this autoliver has (and their defaults, as its help states them)."""
    try:
        text = subprocess.run([*cmd, "predict", "--help"], capture_output=True, text=True, timeout=120).stdout
    except (OSError, subprocess.TimeoutExpired):
        text = ""
    flat = " ".join(text.split())
    flags = {}
    for flag in ("--roi", "--no-roi", "--precision", "--tta", "--no-tta", "--threads"):
        flags[flag] = re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", text) is not None
    defaults = {}
    for flag in ("--roi", "--precision", "--tta"):
        m = re.search(rf"{re.escape(flag)}\b[^\[]*?\(default: ([^)]*)\)", flat)
        if m:
            defaults[flag] = m[1]
    return {"has": flags, "defaults_from_help": defaults}


def predict_command(tool: str, tta: bool, test: Path, out_dir: Path, ctx: dict, args: argparse.Namespace) -> list[str]:
    if tool == "nnunet":
        cmd = [str(ctx["venv"] / "bin" / "nnUNetv2_predict"), "-i", str(test / "images"), "-o", str(out_dir), "-d", ctx["name"],
               "-p", PLANS_OUT, "-tr", "nnUNetTrainer", "-c", CONFIG, "-f", FOLD, "-device", "cpu", "--disable_progress_bar"]
        if not tta:
            cmd.append("--disable_tta")
        if args.nnunet_procs is not None:
            cmd += ["-npp", str(args.nnunet_procs), "-nps", str(args.nnunet_procs)]
        return cmd + shlex.split(args.nnunet_args)
    has = ctx["autoliver_flags"]["has"]
    cmd = [*ctx["autoliver_cmd"], "predict", "-m", str(ctx["autoliver_model"]), "-c", CONFIG, "-f", FOLD, "-i", str(test / "images"),
           "-o", str(out_dir), "--device", "cpu", "--threads", str(args.threads), "--tta" if tta else "--no-tta", "--no-progress"]
    if args.autoliver_roi is not None:
        flag = "--roi" if args.autoliver_roi == "on" else "--no-roi"
        if has.get(flag):
            cmd.append(flag)
        else:
            log.warning("this autoliver has no %s: not passed", flag)
    if args.autoliver_precision is not None:
        if has.get("--precision"):
            cmd += ["--precision", args.autoliver_precision]
        else:
            log.warning("this autoliver has no --precision: not passed")
    return cmd + shlex.split(args.autoliver_args)


def run_prediction(tool: str, tta: bool, work: Path, test: Path, cases: list[str], ctx: dict, args: argparse.Namespace) -> dict:
    tag = f"{tool}_{'tta' if tta else 'notta'}"
    out_dir = work / "predictions" / tag
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir(parents=True)
    cmd = predict_command(tool, tta, test, out_dir, ctx, args)
    log_path = work / f"predict_{tag}.log"
    log.info("%s, TTA %s: %s", TOOL_NAMES[tool], "on" if tta else "off", shlex.join(cmd))
    load0 = os.getloadavg()
    clock = LineClock(log_path, time.perf_counter())
    clock.start()
    m = measure_command(cmd, env=_env(args), log_path=log_path, poll_s=args.poll, timeout_s=args.timeout)
    lines = clock.stop()
    load1 = os.getloadavg()
    timings = nnunet_timings(lines) if tool == "nnunet" else autoliver_timings(lines, out_dir, cases)
    dice = score(out_dir, test / "labels", cases)
    ok = m.returncode == 0 and all(d.get("liver") is not None for d in dice.values())
    if not ok:
        log.error("%s prediction failed (exit %d); see %s", TOOL_NAMES[tool], m.returncode, log_path)
    return {"tool": tool, "tta": tta, "ok": ok, "command": cmd, "process": m.to_json(), "n_cases": len(cases),
            "s_per_case": m.wall_s / len(cases), "cpu_s_per_case": m.cpu_s / len(cases), "cpu_share": m.cpu_s / m.wall_s if m.wall_s else None,
            "startup_s": timings["startup_s"], "timings": timings, "dice": dice,
            "liver_dice": _mean(d.get("liver") for d in dice.values()), "tumour_dice": _mean(d.get("tumour") for d in dice.values()),
            "loadavg_start": list(load0), "loadavg_end": list(load1), "log": str(log_path)}


def _env(args: argparse.Namespace) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONUNBUFFERED": "1", **args.nnunet_env}


# ----------------------------------------------------------------------------- report

def _case_seconds(r: dict, case: str) -> float | None:
    c = r["timings"]["per_case"].get(case) or {}
    return c.get("total_s") if r["tool"] == "autoliver" else c.get("network_s")


METRICS = (  # label, getter, format, ratio sense: "time" nnU-Net / autoliver, "score" autoliver / nnU-Net, None: no ratio
    ("seconds per case (wall / cases)", lambda r: r["s_per_case"], lambda v: f"{v:.1f} s", "time"),
    ("wall time, whole command", lambda r: r["process"]["wall_s"], lambda v: f"{v:.1f} s", "time"),
    ("start-up until the model is loaded", lambda r: r["startup_s"], lambda v: f"{v:.1f} s", "time"),
    ("CPU time per case, process tree", lambda r: r["cpu_s_per_case"], lambda v: f"{v:.1f} s", "time"),
    ("peak RSS, process tree sum", lambda r: r["process"]["peak_tree_rss"], human_bytes, "time"),
    ("peak PSS, process tree sum", lambda r: r["process"]["peak_tree_pss"], human_bytes, "time"),
    ("peak RSS, single process", lambda r: r["process"]["peak_single_rss"], human_bytes, "time"),
    ("max processes", lambda r: r["process"]["max_processes"], str, None),
    ("liver Dice, mean of cases", lambda r: r["liver_dice"], lambda v: f"{v:.4f}", "score"),
    ("tumour Dice, mean of cases", lambda r: r["tumour_dice"], lambda v: f"{v:.4f}", "score"),
    ("CPU share (cpu s / wall s)", lambda r: r["cpu_share"], lambda v: f"{v:.2f}", None),
)


def _ratio(a, b, sense: str | None) -> float | None:
    if sense is None or not isinstance(a, (int, float)) or not isinstance(b, (int, float)):
        return None
    num, den = (a, b) if sense == "time" else (b, a)
    return num / den if den else None


def ratios(per_tool: dict) -> dict:
    a, b = per_tool.get("nnunet"), per_tool.get("autoliver")
    if not (a and b):
        return {}
    return {label: _ratio(get(a), get(b), sense) for label, get, _, sense in METRICS if sense}


def table(per_tool: dict, cases: list[str]) -> str:
    tools = [t for t in TOOLS if t in per_tool]
    both = len(tools) == 2
    rows = [["metric", *(TOOL_NAMES[t] for t in tools), *(["autoliver advantage"] if both else [])]]
    for label, get, fmt, sense in METRICS:
        vals = [get(per_tool[t]) for t in tools]
        r = _ratio(*vals, sense) if both else None
        rows.append([label, *(fmt(v) if v is not None else "n/a" for v in vals), *([f"{r:.2f}x" if r is not None else ""] if both else [])])
    for case in cases:
        vals = [_case_seconds(per_tool[t], case) for t in tools]
        r = _ratio(*vals, "time") if both else None
        rows.append([f"{case}: seconds (nnU-Net: network only)", *(f"{v:.1f} s" if v is not None else "n/a" for v in vals),
                     *([f"{r:.2f}x" if r is not None else ""] if both else [])])
        dice = [per_tool[t]["dice"].get(case, {}) for t in tools]
        rows.append([f"{case}: Dice liver / tumour",
                     *(f"{d['liver']:.3f} / {d['tumour']:.3f}" if d.get("liver") is not None else d.get("error", "n/a") for d in dice),
                     *([""] if both else [])])
    rows.append(["load average start -> end", *(f"{per_tool[t]['loadavg_start'][0]:.1f} -> {per_tool[t]['loadavg_end'][0]:.1f}" for t in tools),
                 *([""] if both else [])])
    rows.append(["status", *("ok" if per_tool[t]["ok"] else "FAILED" for t in tools), *([""] if both else [])])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def goals(per_tool: dict) -> str | None:
    """The issue's goal: >= 3x faster per case, <= half the peak RSS, Dice equal or better."""
    a, b = per_tool.get("nnunet"), per_tool.get("autoliver")
    if not (a and b and a["ok"] and b["ok"]):
        return None
    speed = a["s_per_case"] / b["s_per_case"]
    mem = a["process"]["peak_tree_rss"] / b["process"]["peak_tree_rss"]
    pss = (a["process"]["peak_tree_pss"] or 0) / (b["process"]["peak_tree_pss"] or float("inf"))
    dl, dt = b["liver_dice"] - a["liver_dice"], b["tumour_dice"] - a["tumour_dice"]
    mark = lambda ok: "met" if ok else "NOT met"  # noqa: E731
    return (f"goal: speed {speed:.2f}x (>= 3: {mark(speed >= 3)}), peak RSS {mem:.2f}x (>= 2: {mark(mem >= 2)}; PSS {pss:.2f}x), "
            f"Dice autoliver - nnU-Net: liver {dl:+.4f}, tumour {dt:+.4f} (>= 0: {mark(dl >= 0 and dt >= 0)})")


def print_report(report: dict) -> None:
    s = report["settings"]
    tr = report.get("training", {})
    stamp = report.get("train_stamp", {})
    stamp = stamp.get("nnunet", stamp.get("autoliver", stamp)) if "minutes" not in stamp else stamp
    print(f"\npredict, configuration {CONFIG}, fold {FOLD}: {len(report['test_set']['cases'])} test cases, "
          f"{s['threads']} torch threads; trained {stamp.get('minutes')} min each with {stamp.get('loader_workers')} loader workers")
    for t in TOOLS:
        if t in tr:
            r = tr[t]
            net = r.get("network", {})
            print(f"  {TOOL_NAMES[t]:10s}: patch {r.get('patch_size')} batch {r.get('batch_size')} spacing {r.get('spacing')}, "
                  f"{(net.get('parameters') or 0) / 1e6:.2f} M parameters, features {net.get('features_per_stage')}; "
                  f"{r.get('epochs')} epochs, {r.get('iterations')} iterations in {r.get('training_s', 0):.0f} s")
    for c in report["test_set"]["cases"]:
        print(f"  test case {c['case']}: {' x '.join(map(str, c['shape_zyx']))} voxels at {' x '.join(map(str, c['spacing_zyx']))} mm")
    cases = [c["case"] for c in report["test_set"]["cases"]]
    for key, runs in report["runs"].items():
        print(f"\n{key}:\n")
        print(table(runs, cases))
        g = goals(runs)
        if g:
            print(g)
    print("\nautoliver advantage: nnU-Net / autoliver for times and memory, autoliver / nnU-Net for Dice (above 1: autoliver "
          "faster, leaner or more accurate). nnU-Net's per-case seconds are its network time only (its export runs in "
          "background workers); autoliver's are the sum of its report's stages.")
    la0, la1 = report["loadavg_start"], report.get("loadavg_end", [float("nan")])
    print(f"load average (1 min) {la0[0]:.2f} at start, {la1[0]:.2f} at end on {report['machine']['cpus']} CPUs; "
          f"total {report.get('total_s', float('nan')) / 60:.1f} min")


# ----------------------------------------------------------------------------- main

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", type=Path, help="data, preprocessed data, trained models, predictions and logs (default: a new "
                   "temporary folder); what was made there from the same settings is reused")
    p.add_argument("--out", type=Path, help="results JSON (default: WORKDIR/bench_predict_vs_nnunet.json)")
    p.add_argument("--tools", nargs="+", choices=TOOLS, default=list(TOOLS))
    p.add_argument("--tta", choices=["both", "on", "off"], default="both", help="prediction runs with mirroring on, off or both (default: %(default)s)")
    p.add_argument("--skip-train", action="store_true", help="reuse the models trained before in --workdir; measure prediction only")
    p.add_argument("--retrain", action="store_true", help="train again even when a model of the same settings exists")
    p.add_argument("--train-minutes", type=float, default=10.0, help="training budget of each tool in minutes (default: %(default)s)")
    p.add_argument("--threads", type=int, default=2, help="torch threads in both tools, training and prediction (default: %(default)s)")
    p.add_argument("--loader-workers", type=int, default=2, help="training loader worker processes in both (default: %(default)s)")
    p.add_argument("--nnunet-venv", type=Path, default=Path(os.environ.get(NNUNET_VENV_ENV, DEFAULT_NNUNET_VENV)),
                   help=f"virtual environment with nnunetv2 (default: ${NNUNET_VENV_ENV}, else REPO/.venv-nnunet)")
    p.add_argument("--autoliver-cmd", help="command that runs autoliver (default: the `autoliver` script next to this Python)")
    p.add_argument("--nnunet-procs", type=int, help="nnUNetv2_predict -npp and -nps (default: not passed, nnU-Net's default 3 each)")
    p.add_argument("--nnunet-args", default="", help="extra arguments for nnUNetv2_predict")
    p.add_argument("--autoliver-args", default="", help="extra arguments for autoliver predict")
    p.add_argument("--autoliver-roi", choices=["on", "off"], help="pass --roi / --no-roi to autoliver predict where it has them "
                   "(default: neither, autoliver's default)")
    p.add_argument("--autoliver-precision", help="pass --precision P to autoliver predict where it has it (default: not passed)")
    p.add_argument("--train-real", nargs="*", default=list(TRAIN_REAL), help="real example cases to train on (default: %(default)s)")
    p.add_argument("--n-train-phantoms", type=int, default=6, help="training phantoms (default: %(default)s)")
    p.add_argument("--train-phantom-shape", type=int, nargs=3, default=[160, 208, 208], metavar=("Z", "Y", "X"))
    p.add_argument("--train-phantom-spacing", type=float, nargs=3, default=[2.5, 2.0, 2.0], metavar=("Z", "Y", "X"))
    p.add_argument("--test-real", nargs="*", default=list(TEST_REAL), help="real example cases held out for testing (default: %(default)s)")
    p.add_argument("--n-test-phantoms", type=int, default=1, help="LiTS-size test phantoms (default: %(default)s)")
    p.add_argument("--test-phantom-shape", type=int, nargs=3, default=[420, 512, 512], metavar=("Z", "Y", "X"))
    p.add_argument("--test-phantom-spacing", type=float, nargs=3, default=[1.0, 0.77, 0.77], metavar=("Z", "Y", "X"))
    p.add_argument("--test-phantom-tumours", type=int, default=3, help="tumours per test phantom (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="phantom seed (default: %(default)s)")
    p.add_argument("--dataset-id", type=int, default=902)
    p.add_argument("--dataset-name", default="LiverPredBench")
    p.add_argument("--poll", type=float, default=0.5, help="memory polling interval in s during prediction; polling PSS (smaps) "
                   "costs CPU on a small machine (default: %(default)s)")
    p.add_argument("--timeout", type=float, default=3600, help="kill a run after this many seconds (default: %(default)s)")
    p.add_argument("--show", type=Path, metavar="JSON", help="print the tables of a results JSON written before, run nothing")
    a = p.parse_args(argv)
    if a.threads < 1 or a.loader_workers < 0 or not a.train_minutes > 0 or a.n_train_phantoms < 0 or a.n_test_phantoms < 0:
        p.error("--threads >= 1, --loader-workers >= 0, --train-minutes > 0, phantom counts >= 0")
    if set(a.train_real) & set(a.test_real):
        p.error(f"cases both in --train-real and --test-real: {sorted(set(a.train_real) & set(a.test_real))}")
    if not a.test_real and not a.n_test_phantoms:
        p.error("no test cases: give --test-real or --n-test-phantoms")
    a.nnunet_env = {}
    return a


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.show:
        print_report(json.loads(args.show.read_text()))
        return 0
    t_start = time.perf_counter()
    work = (args.workdir or Path(tempfile.mkdtemp(prefix="autoliver-bench-predict-"))).resolve()
    work.mkdir(parents=True, exist_ok=True)
    out_json = args.out or work / "bench_predict_vs_nnunet.json"
    venv = args.nnunet_venv.expanduser().resolve()
    ensure_nnunet(venv, False, "", [])
    autoliver_cmd = shlex.split(args.autoliver_cmd) if args.autoliver_cmd else default_autoliver_cmd()
    name = f"Dataset{args.dataset_id:03d}_{args.dataset_name}"
    raw_root = work / "raw"
    args.nnunet_env = {"nnUNet_raw": str(raw_root), "nnUNet_preprocessed": str(work / "nnunet_preprocessed"),
                       "nnUNet_results": str(work / "nnunet_results"), "nnUNet_compile": "false"}

    report: dict = {
        "benchmark": "predict_vs_nnunet",
        "machine": {"cpus": os.cpu_count(), "ram_bytes": psutil.virtual_memory().total, "platform": platform.platform(),
                    "python": platform.python_version()},
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k not in ("show", "nnunet_env")},
        "configuration": CONFIG, "fold": FOLD, "loadavg_start": list(os.getloadavg()),
        "versions": {"nnunet": package_versions(venv / "bin" / "python", ("nnunetv2", "torch", "numpy", "SimpleITK")),
                     "autoliver": package_versions(Path(sys.executable), ("autoliver", "torch", "numpy", "SimpleITK"))},
    }
    test = work / "test"
    report["test_set"] = {"recipe": build_test_set(test, args.test_real, args.n_test_phantoms, args.test_phantom_shape,
                                                   args.test_phantom_spacing, args.test_phantom_tumours, args.seed),
                          "cases": describe_test_set(test)}
    cases = [c["case"] for c in report["test_set"]["cases"]]
    ws = work / "autoliver_workspace"

    # ---- training (or the cached models)
    stamps = {t: work / f".model_{t}.json" for t in TOOLS}
    training: dict = {}
    if args.skip_train:
        for t in args.tools:
            if not stamps[t].is_file():
                raise SystemExit(f"--skip-train: no trained {TOOL_NAMES[t]} model in {work} ({stamps[t].name} missing); run without --skip-train first")
            training[t] = json.loads((work / f"train_{t}.json").read_text())
            training[t]["reused"] = True
        report["train_stamp"] = {t: json.loads(stamps[t].read_text()) for t in args.tools}
    else:
        dataset, recipe = build_train_dataset(raw_root, name, args.train_real, args.n_train_phantoms, args.train_phantom_shape,
                                              args.train_phantom_spacing, args.seed)
        report["train_set"] = {"recipe": recipe, "cases": describe_dataset(dataset)}
        ws = prepare_autoliver(autoliver_cmd, dataset, work, [CONFIG], recipe, args.timeout)  # its CPU plan sets the sizes
        cfg = autoliver_config(ws, name, CONFIG)
        patch, batch = list(cfg.patch_size), int(cfg.batch_size)
        pre = prepare_nnunet(venv, raw_root, args.dataset_id, name, work, [CONFIG], recipe, args.timeout) if "nnunet" in args.tools else None
        want = _train_stamp(recipe, patch, batch, args)
        for t in args.tools:
            model_ready = (nnunet_model_dir(work, name) / f"fold_{FOLD}" / "checkpoint_final.pth").is_file() if t == "nnunet" else \
                (autoliver_model_dir(ws, name) / CONFIG / f"fold_{FOLD}" / "checkpoint_final.pt").is_file()
            if not args.retrain and _reuse(stamps[t], want, model_ready and (work / f"train_{t}.json").is_file()):
                log.info("reusing the trained %s model (same settings; --retrain trains again)", TOOL_NAMES[t])
                training[t] = {**json.loads((work / f"train_{t}.json").read_text()), "reused": True}
                continue
            stamps[t].unlink(missing_ok=True)
            training[t] = train_nnunet(venv, pre, work, name, patch, batch, args) if t == "nnunet" else train_autoliver(autoliver_cmd, ws, work, name, cfg, args)
            stamps[t].write_text(json.dumps(want))
        report["train_stamp"] = want
    report["training"] = training
    out_json.parent.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps(report, indent=2) + "\n")

    # ---- prediction
    ctx = {"venv": venv, "name": name, "autoliver_cmd": autoliver_cmd, "autoliver_model": autoliver_model_dir(ws, name),
           "autoliver_flags": autoliver_flags(autoliver_cmd)}
    report["autoliver_predict_flags"] = ctx["autoliver_flags"]
    report["runs"] = {}
    for tta in {"both": (False, True), "on": (True,), "off": (False,)}[args.tta]:  # off first: the shorter runs
        key = f"TTA {'on (mirroring)' if tta else 'off'}"
        per_tool = report["runs"].setdefault(key, {})
        for t in args.tools:
            per_tool[t] = run_prediction(t, tta, work, test, cases, ctx, args)
            out_json.write_text(json.dumps(report, indent=2) + "\n")  # partial results survive a later failure
    report["ratios"] = {key: ratios(runs) for key, runs in report["runs"].items()}
    report["loadavg_end"] = list(os.getloadavg())
    report["total_s"] = time.perf_counter() - t_start
    out_json.write_text(json.dumps(report, indent=2) + "\n")
    print_report(report)
    print(f"results: {out_json}")
    ok = all(r["ok"] for runs in report["runs"].values() for r in runs.values())
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
