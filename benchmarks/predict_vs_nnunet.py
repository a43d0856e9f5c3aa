"""Prediction on the CPU: `autoliver predict` against `nnUNetv2_predict`, each with a `2d` model it trained itself.

Both tools train their ``2d`` configuration (fold ``all``) on the same training cases (by
default ``lits117_128cube``, ``totalseg_example_ct_full``, ``dcmqi_ct3slice`` and 6 phantoms of
160 x 208 x 208 at 2.5 x 2.0 x 2.0 mm) for the same wall-clock budget (``--train-minutes``), at
the same patch and batch (autoliver's CPU plan; nnU-Net's U-Net re-derived for that patch),
threads and loader workers: ``autoliver train --budget-minutes M`` and
``harness.nnunet_side.train_budget`` (the stock trainer's loop fitted to the same budget the same
way). The models are cached under the settings that trained them (``--retrain``, ``--skip-train``).

Then each tool predicts the same held-out test folder (by default ``chaos_ct_sample``,
``totalseg_example_dicom20`` and a LiTS-size phantom, 420 x 512 x 512 at 1.0 x 0.77 x 0.77 mm
with 3 tumours) in one command, TTA off, then on, from an empty output folder:

    nnUNetv2_predict -i TEST -o OUT -d D -p nnUNetPlansBench -c 2d -f all -device cpu [--disable_tta] --disable_progress_bar
    autoliver predict -m MODEL -c 2d -f all -i TEST -o OUT --device cpu --threads T --tta|--no-tta --no-progress

Measured per run: seconds per case (wall / cases), start-up until the model is loaded (from
the log, timestamped as it is written), CPU time, peak memory (main process; process tree
sum of RSS and PSS; largest process), per case autoliver's stage seconds (its reports) and
nnU-Net's network seconds (its log), and each case's liver (labels 1 + 2) and tumour (2) Dice
against its reference (LiTS rule: both empty = 1). The issue's goal (>= 3x faster per case,
<= half the peak RSS, Dice equal or better) is checked and noted.
"""

from __future__ import annotations

import json
import re
import shlex
import threading
import time
from pathlib import Path

import numpy as np

from benchmarks.harness import cache, cases, measure, nnunet
from benchmarks.harness.report import compare

FOLD, PLANS_OUT = "all", "nnUNetPlansBench"
TRAIN_REAL = ("lits117_128cube", "totalseg_example_ct_full", "dcmqi_ct3slice")
TEST_REAL = ("chaos_ct_sample", "totalseg_example_dicom20")
DICE = ("liver Dice, mean of cases", "tumour Dice, mean of cases")


def add_arguments(p) -> None:
    p.add_argument("-c", "--configuration", choices=["2d", "3d_fullres"], default="3d_fullres", help="the configuration both tools train and predict (default: %(default)s)")
    p.add_argument("--nnunet-plan", choices=["own", "autoliver"], default="own",
                   help="nnU-Net's patch, batch and U-Net: its own plan's, or re-derived for autoliver's CPU plan's patch and batch (default: %(default)s)")
    p.add_argument("--goal-speed", type=float, default=10.0, help="the goal: autoliver at least this many times faster per case (default: %(default)s)")
    p.add_argument("--goal-memory", type=float, default=8.0, help="the goal: autoliver's peak RSS at most 1/this of nnU-Net's (default: %(default)s)")
    p.add_argument("--repredict-nnunet", action="store_true", help="run nnU-Net's predictions again even when a run of the same settings is cached")
    p.add_argument("--tta", choices=["both", "on", "off"], default="both", help="prediction runs with mirroring on, off or both (default: %(default)s)")
    p.add_argument("--skip-train", action="store_true", help="use the models trained before with the same settings; fail if there are none")
    p.add_argument("--retrain", action="store_true", help="train again even when a model of the same settings exists")
    p.add_argument("--train-minutes", type=float, default=10.0, help="training budget of each tool (default: %(default)s)")
    p.add_argument("--loader-workers", type=int, default=2, help="training loader workers in both (default: %(default)s)")
    p.add_argument("--nnunet-procs", type=int, help="nnUNetv2_predict -npp and -nps (default: nnU-Net's 3 each)")
    p.add_argument("--nnunet-args", default="", help="extra arguments for nnUNetv2_predict")
    p.add_argument("--autoliver-args", default="", help="extra arguments for autoliver predict")
    p.add_argument("--autoliver-roi", choices=["on", "off"], help="pass --roi / --no-roi to autoliver predict (default: its default)")
    p.add_argument("--autoliver-precision", help="pass --precision P to autoliver predict (default: its default)")
    p.add_argument("--train-real", nargs="*", default=list(TRAIN_REAL), help="real cases to train on (default: %(default)s)")
    p.add_argument("--n-train-phantoms", type=int, default=6)
    p.add_argument("--train-phantom-shape", type=int, nargs=3, default=[160, 208, 208], metavar=("Z", "Y", "X"))
    p.add_argument("--train-phantom-spacing", type=float, nargs=3, default=[2.5, 2.0, 2.0], metavar=("Z", "Y", "X"))
    p.add_argument("--test-real", nargs="*", default=list(TEST_REAL), help="real cases held out for testing (default: %(default)s)")
    p.add_argument("--n-test-phantoms", type=int, default=1)
    p.add_argument("--test-phantom-shape", type=int, nargs=3, default=[420, 512, 512], metavar=("Z", "Y", "X"))
    p.add_argument("--test-phantom-spacing", type=float, nargs=3, default=[1.0, 0.77, 0.77], metavar=("Z", "Y", "X"))
    p.add_argument("--test-phantom-tumours", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dataset-id", type=int, default=902)
    p.add_argument("--dataset-name", default="LiverPredBench")
    p.add_argument("--predict-poll", type=float, default=0.5, help="memory polling during prediction in s: reading PSS costs CPU (default: %(default)s)")


def run(ctx) -> dict:
    a = ctx.args
    if set(a.train_real) & set(a.test_real):
        raise SystemExit(f"cases both in --train-real and --test-real: {sorted(set(a.train_real) & set(a.test_real))}")
    venv = ctx.nnunet
    tools = [t for t in ("nnunet", "autoliver") if (t == "nnunet" and venv) or (t == "autoliver" and ctx.autoliver)]
    test = cases.test_set(ctx, ctx.pick(a.test_real, ["lits117_128cube"]), ctx.pick(a.n_test_phantoms, 1), ctx.pick(a.test_phantom_shape, [40, 96, 96]),
                          ctx.pick(a.test_phantom_spacing, [4.0, 4.0, 4.0]), a.test_phantom_tumours, a.seed)
    test_cases = [c["case"] for c in cases.describe(test / "images")]
    models, training = train_models(ctx, venv, tools)
    rows = [r for r in compare({t: _training_metrics(training[t]) for t in tools}, no_ratio=("patch", "batch", "epochs", "iterations", "training (s)"), setting="training")]
    runs: dict = {}
    warm = warm_up(ctx, test, test_cases, models["autoliver"]) if "autoliver" in tools else None
    if warm:
        rows.append({"setting": "autoliver", "metric": "first run on one case, untimed: engine export and cache (s)", "autoliver": warm["wall_s"]})
    for tta in {"both": (False, True), "on": (True,), "off": (False,)}[ctx.pick(a.tta, "off")]:  # off first: the shorter runs
        key = f"TTA {'on' if tta else 'off'}"
        runs[key] = {t: (cached_nnunet_prediction if t == "nnunet" else predict)(ctx, t, tta, test, test_cases, models[t], venv) for t in tools}
        values = {t: _prediction_metrics(r, test_cases) for t, r in runs[key].items()}
        rows += compare(values, higher_better=[*DICE, *(k for k in values[tools[0]] if "Dice" in k)], no_ratio=("CPU share",), setting=key)
        goal = goals(runs[key], a.goal_speed, a.goal_memory)
        if goal:
            ctx.note(f"{key}: {goal}")
        ctx.checkpoint({"rows": rows, "runs": runs, "training": training})
    return {"rows": rows, "runs": runs, "training": training, "test_set": cases.describe(test / "images"),
            "ok": all(r["ok"] for per_tool in runs.values() for r in per_tool.values())}


# ----------------------------------------------------------------------------- training

def train_models(ctx, venv, tools) -> tuple[dict, dict]:
    """(model location, training record) of each tool, from the cache or trained now."""
    a = ctx.args
    name = cases.TINY_DATASET if ctx.quick else f"Dataset{a.dataset_id:03d}_{a.dataset_name}"
    recipe = {"real": a.train_real, "n_phantoms": a.n_train_phantoms, "shape": a.train_phantom_shape, "spacing": a.train_phantom_spacing,
              "seed": a.seed, "name": name, "quick": ctx.quick}
    prepared: dict = {}

    def prepare() -> dict:  # the data both tools train on, built on first need
        if not prepared:
            if ctx.quick:
                prepared["ws"] = cases.tiny_workspace(ctx)
            else:
                raw_root, dataset = cases.raw_dataset(ctx, name, a.train_real, a.n_train_phantoms, a.train_phantom_shape, a.train_phantom_spacing, a.seed)
                prepared["ws"] = cases.autoliver_preprocessed(ctx, dataset, [a.configuration])
                if venv:
                    prepared["pre"] = nnunet.preprocessed(ctx, venv, raw_root, a.dataset_id, name, [a.configuration])
            prepared["cfg"] = cases.load_plans(prepared["ws"], name).configurations[a.configuration]
        return prepared

    models, training = {}, {}
    for tool in tools:
        params = {"tool": tool, "data": recipe, "configuration": a.configuration, "nnunet_plan": a.nnunet_plan if tool == "nnunet" else None, "minutes": ctx.pick(a.train_minutes, 0.05), "threads": ctx.threads,
                  "loader_workers": ctx.pick(a.loader_workers, 0)}
        folder = cache.exists(ctx, "model", params) if not a.retrain else None
        if folder is None:
            if a.skip_train:
                raise SystemExit(f"--skip-train: no {tool} model trained with these settings in {ctx.cache}; run without --skip-train first")
            folder = cache.entry(ctx, "model", params, lambda f, tool=tool: _train(ctx, tool, venv, name, prepare(), params, f), rebuild=True)
        training[tool] = json.loads((folder / "train.json").read_text())
        models[tool] = folder / ("ws/results/" + name if tool == "autoliver" else "nnunet_results")
    return models, training


def _train(ctx, tool: str, venv, name: str, data: dict, params: dict, folder: Path) -> None:
    cfg = data["cfg"]
    if tool == "nnunet":
        own = params["nnunet_plan"] == "own"
        kwargs = {"preprocessed": str(data["pre"]), "dataset": name, "configuration": params["configuration"],
                  "patch": None if own else list(cfg.patch_size), "batch": None if own else cfg.batch_size, "minutes": params["minutes"], "plans_out": PLANS_OUT, "fold": FOLD, "threads": ctx.threads}
        m = nnunet.run(ctx, venv, "benchmarks.harness.nnunet_side:train_budget", nnunet.env(preprocessed=data["pre"], results=folder / "nnunet_results",
                       loader_workers=params["loader_workers"]), folder / "train.log", kwargs=kwargs, poll_s=1.0)
        r = m["value"] or {}
    else:
        ws = cases.scratch_workspace(data["ws"], name, folder / "ws", {})
        argv = ["train", "-d", name, params["configuration"], FOLD, "--workspace", str(ws), "--budget-minutes", str(params["minutes"]), "--device", "cpu",
                "-np", str(params["loader_workers"]), "--threads", str(ctx.threads), "--no-progress", *(["--epochs", "1", "--iters-per-epoch", "2"] if ctx.quick else [])]
        m = measure.run_child("autoliver.cli:main", argv=argv, threads=ctx.threads, log_path=folder / "train.log", poll_s=1.0, timeout_s=ctx.timeout)
        records = cases.read_jsonl(ws / "results" / name / params["configuration"] / f"fold_{FOLD}" / "log.jsonl")
        r = {"epochs": len(records), "iterations": sum(int(x["iters"]) for x in records), "training_s": sum(float(x["epoch_s"]) for x in records),
             "network": {"parameters": cases.network_parameters(cfg), "features_per_stage": list(cfg.features_per_stage)}}
    if not m["ok"]:
        raise SystemExit(f"{tool} training failed: {m['error']}; see {folder / 'train.log'}")
    for k, v in {"patch_size": list(cfg.patch_size), "batch_size": cfg.batch_size, "spacing": list(cfg.spacing)}.items():
        r.setdefault(k, v)  # nnU-Net's own plan reports its own
    r["process"] = {k: v for k, v in m.items() if k != "value"}
    (folder / "train.json").write_text(json.dumps(r, indent=1, default=str))


def _training_metrics(r: dict) -> dict:
    return {"patch": " x ".join(map(str, r.get("patch_size") or [])), "batch": r.get("batch_size"),
            "epochs": r.get("epochs"), "iterations": r.get("iterations"), "training (s)": r.get("training_s"),
            "network parameters (M)": (r.get("network") or {}).get("parameters", 0) / 1e6,
            "peak RSS, main process (MiB)": measure.mib(r["process"].get("peak_rss"))}


# ----------------------------------------------------------------------------- prediction

class LineClock(threading.Thread):
    """Timestamps the lines a running process writes to its log (seconds since the start)."""

    def __init__(self, path: Path, poll_s: float = 0.2):
        super().__init__(daemon=True)
        self.path, self.poll_s, self.t0 = path, poll_s, time.perf_counter()
        self.lines: list[tuple[float, str]] = []
        self._done, self._buf, self._pos = threading.Event(), "", 0

    def _read(self) -> None:
        try:
            with open(self.path, "rb") as f:
                f.seek(self._pos)
                chunk = f.read()
        except FileNotFoundError:
            return
        self._pos += len(chunk)
        *done, self._buf = (self._buf + chunk.decode("utf-8", "replace").replace("\r", "\n")).split("\n")
        now = time.perf_counter() - self.t0
        self.lines += [(now, line) for line in done if line.strip()]

    def run(self) -> None:
        while not self._done.wait(self.poll_s):
            self._read()

    def stop(self) -> list[tuple[float, str]]:
        self._done.set()
        self.join()
        self._read()
        return self.lines + ([(time.perf_counter() - self.t0, self._buf)] if self._buf.strip() else [])


def _first(lines, pattern: str) -> float | None:
    return next((t for t, line in lines if re.search(pattern, line)), None)


def timings(tool: str, lines, out_dir: Path, test_cases: list[str]) -> dict:
    """Start-up (model loaded) and per-case seconds: nnU-Net's network time ('Predicting X:' ->
    'sending off prediction'; its export runs in background workers), autoliver's report stages."""
    per_case: dict = {}
    if tool == "nnunet":
        current = None
        for t, line in lines:
            m = re.match(r"\s*Predicting (\S+):\s*$", line)
            if m:
                current = (m[1], t)
            elif current and line.startswith("sending off prediction"):
                per_case[current[0]] = {"seconds": t - current[1]}
                current = None
        return {"startup_s": _first(lines, r"There are \d+ cases in the source folder"), "per_case": per_case}
    for case in test_cases:
        report = out_dir / f"{case}.json"
        if report.is_file():
            rt = json.loads(report.read_text()).get("runtime_s", {})
            # read and preprocess run in a prefetch thread during the previous case: where the report
            # has the wait for them (wait_input_s), that wait is what this case spent on them
            skip = ("read_s", "preprocess_s") if "wait_input_s" in rt else ()
            per_case[case] = {**rt, "seconds": sum(v for k, v in rt.items() if isinstance(v, (int, float)) and k not in skip)}
    return {"startup_s": _first(lines, r"predicting \d+ case"), "per_case": per_case}


def score(pred_dir: Path, labels: Path, test_cases: list[str]) -> dict:
    from autoliver.evaluate.overlap import case_dice
    from autoliver.io.images import read_image

    out = {}
    for case in test_cases:
        path = pred_dir / f"{case}.nii.gz"
        if not path.is_file():
            out[case] = {"liver": None, "tumour": None, "error": "no prediction"}
            continue
        pred, _ = read_image(path)
        ref, _ = read_image(labels / f"{case}.nii.gz")
        out[case] = case_dice(pred.astype(np.uint8), ref.astype(np.uint8)) if pred.shape == ref.shape else \
            {"liver": None, "tumour": None, "error": f"shape {pred.shape} != reference {ref.shape}"}
    return out


def warm_up(ctx, test: Path, test_cases: list[str], model: Path) -> dict:
    """One untimed `autoliver predict` of the first test case, so that the measured runs find the
    engine's export cached next to the weights (it is made once per model, as for a user)."""
    a = ctx.args
    out_dir = ctx.path("predictions", "autoliver_warm_up", fresh=True)
    case = next(p for p in sorted((test / "images").iterdir()) if p.name.startswith(test_cases[0] + "_0000"))
    argv = ["predict", "-m", str(model), "-c", a.configuration, "-f", FOLD, "-i", str(case), "-o", str(out_dir), "--device", "cpu",
            "--threads", str(ctx.threads), "--no-tta", "--no-progress", *shlex.split(a.autoliver_args)]
    return measure.run_child("autoliver.cli:main", argv=argv, threads=ctx.threads, log_path=ctx.workdir / "predict_warm_up.log",
                             poll_s=0, timeout_s=ctx.timeout)


def predict(ctx, tool: str, tta: bool, test: Path, test_cases: list[str], model: Path, venv) -> dict:
    a = ctx.args
    tag = f"{tool}_{'tta' if tta else 'notta'}"
    out_dir = ctx.path("predictions", tag, fresh=True)
    log_path = ctx.workdir / f"predict_{tag}.log"
    log_path.unlink(missing_ok=True)
    clock = LineClock(log_path)
    clock.start()
    if tool == "nnunet":
        argv = ["-i", str(test / "images"), "-o", str(out_dir), "-d", f"Dataset{a.dataset_id:03d}_{a.dataset_name}", "-p", PLANS_OUT,
                "-tr", "nnUNetTrainer", "-c", a.configuration, "-f", FOLD, "-device", "cpu", "--disable_progress_bar", *([] if tta else ["--disable_tta"]),
                *(["-npp", str(a.nnunet_procs), "-nps", str(a.nnunet_procs)] if a.nnunet_procs else []), *shlex.split(a.nnunet_args)]
        m = nnunet.run(ctx, venv, "predict", nnunet.env(results=model), log_path, argv=argv, poll_s=a.predict_poll)
    else:
        argv = ["predict", "-m", str(model), "-c", a.configuration, "-f", FOLD, "-i", str(test / "images"), "-o", str(out_dir), "--device", "cpu",
                "--threads", str(ctx.threads), "--tta" if tta else "--no-tta", "--no-progress",
                *({"on": ["--roi"], "off": ["--no-roi"]}.get(a.autoliver_roi, [])),
                *(["--precision", a.autoliver_precision] if a.autoliver_precision else []), *shlex.split(a.autoliver_args)]
        m = measure.run_child("autoliver.cli:main", argv=argv, threads=ctx.threads, log_path=log_path, poll_s=a.predict_poll, timeout_s=ctx.timeout)
    t = timings(tool, clock.stop(), out_dir, test_cases)
    dice = score(out_dir, test / "labels", test_cases)
    mean = {k: _mean(d.get(k) for d in dice.values()) for k in ("liver", "tumour")}
    return {**m, "ok": m["ok"] and all(d.get("liver") is not None for d in dice.values()), "tool": tool, "tta": tta, "n_cases": len(test_cases),
            "s_per_case": m["wall_s"] / len(test_cases), "cpu_s_per_case": m["cpu_s"] / len(test_cases), "timings": t, "dice": dice,
            "liver_dice": mean["liver"], "tumour_dice": mean["tumour"], "value": None}


def cached_nnunet_prediction(ctx, tool: str, tta: bool, test: Path, test_cases: list[str], model: Path, venv) -> dict:
    """nnU-Net's run for these settings, measured once and kept in the cache (``--repredict-nnunet``):
    it does not change while autoliver does, and with TTA on it is the longest part of the benchmark."""
    a = ctx.args
    params = {"model": str(model), "test": str(test), "tta": tta, "configuration": a.configuration, "procs": a.nnunet_procs,
              "args": a.nnunet_args, "threads": ctx.threads, "poll": a.predict_poll}

    def build(folder: Path) -> None:
        r = predict(ctx, tool, tta, test, test_cases, model, venv)
        if not r["ok"]:
            raise SystemExit(f"nnUNetv2_predict failed: {r.get('error')}")
        (folder / "run.json").write_text(json.dumps(r, indent=1, default=str))

    folder = cache.entry(ctx, "nnunet_prediction", params, build, rebuild=a.repredict_nnunet)
    r = json.loads((folder / "run.json").read_text())
    if folder.stat().st_mtime < time.time() - 60:
        ctx.note(f"nnU-Net {'TTA on' if tta else 'TTA off'}: its run measured earlier with the same settings ({folder.name}; --repredict-nnunet runs it again)")
    return r


def _mean(values) -> float | None:
    vals = [v for v in values if isinstance(v, (int, float))]
    return float(np.mean(vals)) if vals else None


def _prediction_metrics(r: dict, test_cases: list[str]) -> dict:
    out = {"seconds per case (wall / cases)": r["s_per_case"], "start-up until the model is loaded (s)": r["timings"]["startup_s"],
           "CPU time per case, process tree (s)": r["cpu_s_per_case"], **measure.process_metrics(r),
           DICE[0]: r["liver_dice"], DICE[1]: r["tumour_dice"], "CPU share": r.get("cpu_share")}
    for case in test_cases:
        d = r["dice"].get(case, {})
        out.update({f"{case}: seconds (nnU-Net: network only)": (r["timings"]["per_case"].get(case) or {}).get("seconds"),
                    f"{case}: liver Dice": d.get("liver"), f"{case}: tumour Dice": d.get("tumour")})
    return out


def goals(per_tool: dict, speed_goal: float = 10.0, memory_goal: float = 8.0) -> str | None:
    """The goal: >= ``speed_goal`` x faster per case, <= 1/``memory_goal`` of the peak RSS (process
    tree), Dice equal or better."""
    a, b = per_tool.get("nnunet"), per_tool.get("autoliver")
    if not (a and b and a["ok"] and b["ok"]):
        return None
    speed, mem = a["s_per_case"] / b["s_per_case"], a["peak_tree_rss"] / b["peak_tree_rss"]
    dl, dt = b["liver_dice"] - a["liver_dice"], b["tumour_dice"] - a["tumour_dice"]
    mark = lambda ok: "met" if ok else "NOT met"
    return (f"goal: speed {speed:.2f}x (>= {speed_goal:g}: {mark(speed >= speed_goal)}), "
            f"peak RSS {mem:.2f}x (>= {memory_goal:g}: {mark(mem >= memory_goal)}), "
            f"Dice autoliver - nnU-Net: liver {dl:+.4f}, tumour {dt:+.4f} (>= 0: {mark(dl >= 0 and dt >= 0)})")
