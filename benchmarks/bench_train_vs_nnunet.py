"""Side by side: nnU-Net v2's training iteration and training data loader against autoliver's, on the CPU.

Both tools preprocess the same raw dataset (the real example cases plus LiTS-size phantoms)
with their own ``plan_and_preprocess``, then train at the same patch size and batch size, with
the same torch thread count, the same number of loader worker processes, the same warm-up and
the same number of timed iterations. Each side runs as its own subprocess, measured as a
process tree by ``_measure.measure_command`` (peak summed RSS and PSS, largest single RSS):

- nnU-Net: ``nnunet_train_probe.py`` under nnU-Net's Python (its stock ``nnUNetTrainer``,
  device cpu, the plan's patch and batch replaced, topology re-derived for that patch);
- autoliver: ``bench_train.measure_autoliver_training``, which runs ``autoliver train`` from
  the CLI for 1 + iters / warmup epochs of ``warmup`` iterations (the first epoch is the
  warm-up) and reads iterations/s from its log.jsonl; autoliver's training loader alone is
  then timed here the way the probe times nnU-Net's.

Patch and batch default to autoliver's CPU plan for the configuration (autoliver's network is
then exactly its plan's; nnU-Net's is re-derived for that patch by its own planner function).

Prints a table with the ratios nnU-Net / autoliver (above 1: autoliver faster or leaner) and
writes a JSON with everything, including the load average before and after each run (the
machine may be shared; wall-clock figures move with its load).

    python benchmarks/bench_train_vs_nnunet.py --workdir /tmp/bench_train --out train.json
    python benchmarks/bench_train_vs_nnunet.py --configs 3d_fullres --iters 5 --n-phantoms 1 --phantom-slices 160
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _measure import human_bytes, measure_command  # noqa: E402
from bench_plan_and_preprocess import (  # noqa: E402
    DEFAULT_NNUNET_VENV,
    NNUNET_VENV_ENV,
    build_dataset,
    default_autoliver_cmd,
    describe_dataset,
    ensure_nnunet,
    package_versions,
    run_autoliver,
    run_nnunet,
)

HERE = Path(__file__).resolve().parent
PROBE = HERE / "nnunet_train_probe.py"
NNUNET_PLANS = {"2d": "nnUNetPlans_2d", "3d_fullres": "nnUNetPlans_3d_fullres"}  # data identifiers
TOOLS = ("nnunet", "autoliver")
TOOL_NAMES = {"nnunet": "nnU-Net v2", "autoliver": "autoliver"}

log = logging.getLogger("bench_train_vs_nnunet")


# ----------------------------------------------------------------------------- data

def _stamped(stamp: Path, want: dict, ready: bool) -> bool:
    """Whether ``stamp`` records the same raw recipe and at least the configurations wanted."""
    if not (ready and stamp.is_file()):
        return False
    have = json.loads(stamp.read_text())
    same = {k: v for k, v in have.items() if k != "configurations"} == {k: v for k, v in want.items() if k != "configurations"}
    return same and set(want["configurations"]) <= set(have.get("configurations", []))


def _with_stamped(stamp: Path, configs: list[str], recipe: dict) -> list[str]:
    """``configs`` plus those a stamp of the same recipe records (a redo then keeps them)."""
    if not stamp.is_file():
        return list(configs)
    have = json.loads(stamp.read_text())
    if {k: v for k, v in have.items() if k != "configurations"} != recipe:
        return list(configs)
    return sorted(set(configs) | set(have.get("configurations", [])))


def prepare_nnunet(venv: Path, raw_root: Path, dataset_id: int, name: str, work: Path, configs: list[str],
                   recipe: dict, timeout_s: float | None) -> Path:
    """nnU-Net's preprocessed dataset for ``configs``; reused when made from the same raw recipe."""
    pre = work / "nnunet_preprocessed"
    stamp = work / ".nnunet_preprocessed.recipe.json"
    configs = _with_stamped(stamp, configs, recipe)
    want = {**recipe, "configurations": sorted(configs)}
    ready = all((pre / name / NNUNET_PLANS[c]).is_dir() for c in configs)
    if _stamped(stamp, want, ready):
        log.info("reusing nnU-Net's preprocessed data in %s", pre)
        return pre
    stamp.unlink(missing_ok=True)
    r = run_nnunet(venv, raw_root, dataset_id, name, work, 2, 0.5, timeout_s, configurations=tuple(configs))
    if r["returncode"] != 0:
        raise SystemExit(f"nnUNetv2_plan_and_preprocess failed; see {r['log_path']}")
    stamp.write_text(json.dumps(want))
    return pre


def prepare_autoliver(cmd: list[str], dataset: Path, work: Path, configs: list[str], recipe: dict,
                      timeout_s: float | None) -> Path:
    """autoliver's workspace with the CPU plan preprocessed for ``configs``; reused likewise."""
    ws = work / "autoliver_workspace"
    stamp = work / ".autoliver_workspace.recipe.json"
    configs = _with_stamped(stamp, configs, recipe)
    want = {**recipe, "configurations": sorted(configs)}
    if _stamped(stamp, want, (ws / "preprocessed" / dataset.name / "plans.json").is_file()):
        log.info("reusing autoliver's preprocessed data in %s", ws)
        return ws
    stamp.unlink(missing_ok=True)
    extra = ["--device", "cpu", "-c", *configs, "--no-progress"]
    r = run_autoliver(cmd, dataset, work, 2, extra, 0.5, timeout_s)
    if r["returncode"] != 0:
        raise SystemExit(f"autoliver plan_and_preprocess failed; see {r['log_path']}")
    stamp.write_text(json.dumps(want))
    return ws


# ----------------------------------------------------------------------------- runs

def _run(tool: str, cmd: list[str], result_path: Path, log_path: Path, env: dict | None, timeout_s: float | None,
         poll_s: float) -> dict:
    result_path.unlink(missing_ok=True)
    load0 = os.getloadavg()
    log.info("%s: %s", TOOL_NAMES[tool], shlex.join(cmd))
    m = measure_command(cmd, env=env, log_path=log_path, poll_s=poll_s, timeout_s=timeout_s)
    load1 = os.getloadavg()
    probe = json.loads(result_path.read_text()) if result_path.is_file() else {"ok": False, "error": "no result file"}
    if m.returncode != 0 or not probe.get("ok"):
        log.error("%s failed (exit %d): %s; see %s", TOOL_NAMES[tool], m.returncode, probe.get("error"), log_path)
    return {**probe, "process": m.to_json(), "loadavg_start": list(load0), "loadavg_end": list(load1),
            "cpu_share": m.cpu_s / m.wall_s if m.wall_s else None}


def run_nnunet_probe(venv: Path, pre: Path, work: Path, name: str, config: str, patch: list[int], batch: int,
                     args: argparse.Namespace) -> dict:
    res = work / "nnunet_results"
    res.mkdir(parents=True, exist_ok=True)
    out = work / f"nnunet_{config}.json"
    cmd = [str(venv / "bin" / "python"), str(PROBE), "--preprocessed", str(pre), "--results", str(res),
           "--dataset", name, "--configuration", config, "--patch", *map(str, patch), "--batch", str(batch),
           "--warmup", str(args.warmup), "--iters", str(args.iters), "--loader-batches", str(args.loader_batches),
           "--threads", str(args.threads), "--loader-workers", str(args.loader_workers), "--out", str(out)]
    if args.timeout:
        cmd += ["--timeout", str(args.timeout)]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    return _run("nnunet", cmd, out, work / f"nnunet_{config}.log", env, args.timeout and args.timeout + 60, args.poll)


def autoliver_config(ws: Path, name: str, config: str):
    from planning.plans import Plans

    return Plans.load(ws / "preprocessed" / name / "plans.json").configurations[config]


def autoliver_parameters(cfg) -> int:
    from autoliver.nets.registry import build_network, net_spec

    return int(sum(p.numel() for p in build_network("unet", net_spec(cfg, 3)).parameters()))


def measure_autoliver_loader(ws: Path, name: str, cfg, case_ids: list[str], workers: int, n_batches: int, seed: int = 0) -> dict:
    """autoliver's training loader alone, timed like nnU-Net's in the probe: first every batch its
    workers may hold ready (prefetch 2 per worker, one in hand per worker, 2 spare), then K batches."""
    from autoliver.data.loader import make_train_loader

    folder = ws / "preprocessed" / name / cfg.data_identifier
    drain = 1 + (3 * workers + 2 if workers else 0)
    pulls = []
    with make_train_loader(folder, case_ids, cfg, seed=seed, n_workers=workers) as loader:
        for _ in range(drain + n_batches):
            t0 = time.perf_counter()
            next(loader)
            pulls.append(time.perf_counter() - t0)
    seconds = sum(pulls[drain:])
    return {"loader_batches": n_batches, "loader_drained": drain, "loader_s": seconds, "loader_pull_s": pulls,
            "loader_samples_per_s": n_batches * cfg.batch_size / seconds, "loader_cases": len(case_ids)}


def run_autoliver_side(ws: Path, work: Path, name: str, config: str, patch: list[int], batch: int,
                       args: argparse.Namespace) -> dict:
    """``bench_train.measure_autoliver_training``: ``autoliver train`` from the CLI as a measured process tree,
    epochs of ``warmup`` iterations; the first epoch is the warm-up, the next ``iters / warmup`` are timed."""
    from dataclasses import replace

    from bench_train import measure_autoliver_training

    from autoliver.preprocess.storage import list_cases

    cfg = autoliver_config(ws, name, config)
    if list(cfg.patch_size) != list(patch):
        log.warning("autoliver %s: patch %s differs from its plan's %s; its network keeps the plan's strides",
                    config, patch, list(cfg.patch_size))
    per_epoch = args.warmup
    scratch = work / f"autoliver_train_{config}"
    load0 = os.getloadavg()
    r = measure_autoliver_training(ws, name, config, fold=0, epochs=1 + args.iters // per_epoch, iters_per_epoch=per_epoch,
                                   n_workers=args.loader_workers, device="cpu", patch=tuple(patch), batch=batch,
                                   scratch=scratch, poll_s=args.poll, timeout_s=args.timeout, loader_batches=0)
    load1 = os.getloadavg()
    ok = r["returncode"] == 0 and bool(r.get("iterations_per_s"))
    if not ok:
        log.error("autoliver train failed (exit %d); see %s", r["returncode"], r.get("log"))
    out = {"tool": "autoliver", "ok": ok, "error": None if ok else f"exit {r['returncode']}, see {r.get('log')}",
           "configuration": config, "patch_size": r["patch_size"], "batch_size": r["batch_size"],
           "loader_workers": args.loader_workers, "warmup": per_epoch, "iters": args.iters, "bench_train": r,
           "process": {k: r.get(k) for k in ("wall_s", "cpu_s", "peak_tree_rss", "peak_tree_pss", "peak_single_rss")},
           "cpu_share": r["cpu_s"] / r["wall_s"] if r.get("wall_s") else None,
           "loadavg_start": list(load0), "loadavg_end": list(load1)}
    cfg = replace(cfg, patch_size=tuple(patch), batch_size=batch)
    out["network"] = {"n_stages": cfg.n_stages, "features_per_stage": list(cfg.features_per_stage),
                      "strides": [list(s) for s in cfg.strides], "parameters": autoliver_parameters(cfg)}
    if ok:
        s_per_iter = 1.0 / r["iterations_per_s"]
        wait = (r.get("data_wait_share") or 0.0) * s_per_iter
        out.update(s_per_iter=s_per_iter, its_per_s=r["iterations_per_s"], step_s_per_iter=s_per_iter - wait,
                   loader_wait_s_per_iter=wait, train_samples_per_s=r.get("samples_per_s"))
    splits = scratch / "results" / name / "splits.json"
    cases = json.loads(splits.read_text())[0]["train"] if splits.is_file() else list_cases(ws / "preprocessed" / name / cfg.data_identifier)
    out.update(measure_autoliver_loader(ws, name, cfg, list(cases), args.loader_workers, args.loader_batches))
    return out


# ----------------------------------------------------------------------------- report

METRICS = (  # label, key path, format, ratio sense (nnU-Net / autoliver)
    ("seconds per iteration", ("s_per_iter",), lambda v: f"{v:.3f} s"),
    ("iterations per second", ("its_per_s",), lambda v: f"{v:.3f}"),
    ("train step alone, per iteration", ("step_s_per_iter",), lambda v: f"{v:.3f} s"),
    ("wait for the batch, per iteration", ("loader_wait_s_per_iter",), lambda v: f"{v:.3f} s"),
    ("loader alone, samples/s", ("loader_samples_per_s",), lambda v: f"{v:.2f}"),
    ("peak RSS, process tree sum", ("process", "peak_tree_rss"), human_bytes),
    ("peak PSS, process tree sum", ("process", "peak_tree_pss"), human_bytes),
    ("peak RSS, single process", ("process", "peak_single_rss"), human_bytes),
    ("network parameters", ("network", "parameters"), lambda v: f"{v / 1e6:.2f} M"),
    ("CPU share (cpu s / wall s)", ("cpu_share",), lambda v: f"{v:.2f}"),
)
# metrics given a ratio: for times, memory and size nnU-Net / autoliver; for rates (marked True)
# autoliver / nnU-Net; so above 1 means autoliver is faster or leaner either way
RATIO_KEYS = {"s_per_iter": False, "its_per_s": True, "step_s_per_iter": False, "loader_samples_per_s": True,
              "peak_tree_rss": False, "peak_tree_pss": False, "peak_single_rss": False, "parameters": False}


def _get(d: dict | None, path: tuple[str, ...]):
    for k in path:
        if not isinstance(d, dict):
            return None
        d = d.get(k)
    return d


def ratios(per_tool: dict) -> dict[str, float | None]:
    a, b = per_tool.get("nnunet"), per_tool.get("autoliver")
    if not (a and b and a.get("ok") and b.get("ok")):
        return {}
    out = {}
    for _, path, _ in METRICS:
        if path[-1] in RATIO_KEYS:
            va, vb = _get(a, path), _get(b, path)
            if RATIO_KEYS[path[-1]]:
                va, vb = vb, va
            out[path[-1]] = va / vb if isinstance(va, (int, float)) and isinstance(vb, (int, float)) and vb else None
    return out


def table(per_tool: dict, ratio: dict) -> str:
    tools = [t for t in TOOLS if t in per_tool]
    header = ["metric", *(TOOL_NAMES[t] for t in tools), *(["autoliver advantage"] if ratio else [])]
    rows = [header]
    for label, path, fmt in METRICS:
        row = [label]
        for t in tools:
            v = _get(per_tool[t], path)
            row.append(fmt(v) if v is not None else "n/a")
        if ratio:
            r = ratio.get(path[-1])
            row.append(f"{r:.2f}x" if r is not None else "")
        rows.append(row)
    rows.append(["load average start -> end", *(
        f"{per_tool[t]['loadavg_start'][0]:.1f} -> {per_tool[t]['loadavg_end'][0]:.1f}" for t in tools), *([""] if ratio else [])])
    rows.append(["status", *("ok" if per_tool[t].get("ok") else f"FAILED: {per_tool[t].get('error')}"[:60] for t in tools),
                 *([""] if ratio else [])])
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def print_report(report: dict) -> None:
    s = report["settings"]
    for config, r in report["configurations"].items():
        r["ratios"] = ratios(r["results"])  # recomputed: a report written by an older version prints alike
        print(f"\n{config}: patch {'x'.join(map(str, r['patch_size']))}, batch {r['batch_size']}, {s['threads']} torch threads, "
              f"{s['loader_workers']} loader workers, {s['warmup']} warm-up + {s['iters']} timed iterations\n")
        print(table(r["results"], r["ratios"]))
    print("\nautoliver advantage: nnU-Net / autoliver for times and memory, autoliver / nnU-Net for rates "
          "(above 1: autoliver faster or leaner)")
    la0, la1 = report["loadavg_start"], report.get("loadavg_end", [float("nan")])
    print(f"load average (1 min) {la0[0]:.2f} at start, {la1[0]:.2f} at end on {report['machine']['cpus']} CPUs")


# ----------------------------------------------------------------------------- main

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", type=Path, help="raw data, both tools' preprocessed data and the logs (default: a new "
                   "temporary folder); preprocessed data made there from the same settings is reused")
    p.add_argument("--out", type=Path, help="results JSON (default: WORKDIR/bench_train_vs_nnunet.json)")
    p.add_argument("--tools", nargs="+", choices=TOOLS, default=list(TOOLS))
    p.add_argument("--configs", nargs="+", choices=sorted(NNUNET_PLANS), default=["3d_fullres", "2d"])
    p.add_argument("--patch-3d", type=int, nargs=3, metavar=("Z", "Y", "X"),
                   help="3d_fullres patch for both tools (default: autoliver's CPU plan's)")
    p.add_argument("--batch-3d", type=int, help="3d_fullres batch size (default: autoliver's CPU plan's)")
    p.add_argument("--patch-2d", type=int, nargs=2, metavar=("Y", "X"), help="2d patch for both tools (default: autoliver's CPU plan's)")
    p.add_argument("--batch-2d", type=int, help="2d batch size (default: autoliver's CPU plan's)")
    p.add_argument("--warmup", type=int, default=5, help="untimed iterations first; also autoliver's iterations per "
                   "epoch (default: %(default)s)")
    p.add_argument("--iters", type=int, default=10, help="timed iterations, a multiple of --warmup (default: %(default)s)")
    p.add_argument("--loader-batches", type=int, default=10, help="batches timed for the loader alone (default: %(default)s)")
    p.add_argument("--threads", type=int, default=2, help="torch threads in both (default: %(default)s)")
    p.add_argument("--loader-workers", type=int, default=2, help="loader worker processes in both (default: %(default)s)")
    p.add_argument("--nnunet-venv", type=Path, default=Path(os.environ.get(NNUNET_VENV_ENV, DEFAULT_NNUNET_VENV)),
                   help=f"virtual environment with nnunetv2 (default: ${NNUNET_VENV_ENV}, else REPO/.venv-nnunet)")
    p.add_argument("--autoliver-cmd", help="command that runs autoliver for preprocessing (default: the `autoliver` "
                   "script next to this Python, else `python -m autoliver.cli`)")
    p.add_argument("--n-phantoms", type=int, default=2, help="LiTS-size phantoms added to the real cases (default: %(default)s)")
    p.add_argument("--phantom-slices", type=int, default=460, help="phantom slices (default: %(default)s)")
    p.add_argument("--phantom-size", type=int, default=512, help="phantom in-plane size (default: %(default)s)")
    p.add_argument("--phantom-spacing", type=float, nargs=3, default=[1.0, 0.77, 0.77], metavar=("Z", "Y", "X"))
    p.add_argument("--seed", type=int, default=0, help="phantom seed (default: %(default)s)")
    p.add_argument("--dataset-id", type=int, default=901)
    p.add_argument("--dataset-name", default="LiverBench")
    p.add_argument("--poll", type=float, default=0.2, help="memory polling interval in s (default: %(default)s)")
    p.add_argument("--timeout", type=float, default=1800, help="kill a run after this many seconds (default: %(default)s)")
    p.add_argument("--show", type=Path, metavar="JSON", help="print the tables of a results JSON written before, run nothing")
    a = p.parse_args(argv)
    if min(a.batch_3d or 1, a.batch_2d or 1, a.iters, a.loader_batches, a.threads, a.warmup) < 1 or a.loader_workers < 0:
        p.error("batch sizes, --iters, --warmup, --loader-batches and --threads must be >= 1; --loader-workers >= 0")
    if a.iters % a.warmup:
        p.error("--iters must be a multiple of --warmup (autoliver times whole epochs of --warmup iterations)")
    return a


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.show:
        print_report(json.loads(args.show.read_text()))
        return 0
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # torch's thread count in every process both tools start
    work = (args.workdir or Path(tempfile.mkdtemp(prefix="autoliver-bench-train-"))).resolve()
    work.mkdir(parents=True, exist_ok=True)
    out_json = args.out or work / "bench_train_vs_nnunet.json"
    venv = args.nnunet_venv.expanduser().resolve()
    if "nnunet" in args.tools:
        ensure_nnunet(venv, False, "", [])

    name = f"Dataset{args.dataset_id:03d}_{args.dataset_name}"
    raw_root = work / "raw"
    shape = (args.phantom_slices, args.phantom_size, args.phantom_size)
    dataset = build_dataset(raw_root, name, args.n_phantoms, shape, tuple(args.phantom_spacing), args.seed)
    recipe = json.loads((raw_root / f".{name}.recipe.json").read_text())

    report: dict = {
        "benchmark": "train_vs_nnunet",
        "machine": {"cpus": os.cpu_count(), "ram_bytes": psutil.virtual_memory().total, "platform": platform.platform(),
                    "python": platform.python_version()},
        "settings": {k: getattr(args, k) for k in ("threads", "loader_workers", "warmup", "iters", "loader_batches")},
        "dataset": {"name": name, "cases": describe_dataset(dataset), "recipe": recipe},
        "versions": {},
        "loadavg_start": list(os.getloadavg()),
        "configurations": {},
    }
    pre = None
    if "nnunet" in args.tools:
        pre = prepare_nnunet(venv, raw_root, args.dataset_id, name, work, args.configs, recipe, args.timeout)
        report["versions"]["nnunet"] = package_versions(venv / "bin" / "python", ("nnunetv2", "torch", "numpy", "batchgenerators"))
    cmd = shlex.split(args.autoliver_cmd) if args.autoliver_cmd else default_autoliver_cmd()
    ws = prepare_autoliver(cmd, dataset, work, args.configs, recipe, args.timeout)  # its CPU plan gives the default sizes
    report["versions"]["autoliver"] = package_versions(Path(sys.executable), ("autoliver", "torch", "numpy", "batchgenerators"))
    given = {"3d_fullres": (args.patch_3d, args.batch_3d), "2d": (args.patch_2d, args.batch_2d)}
    setups = {}
    for c in args.configs:
        cfg = autoliver_config(ws, name, c)
        setups[c] = (list(given[c][0] or cfg.patch_size), int(given[c][1] or cfg.batch_size))

    for config in args.configs:
        patch, batch = setups[config]
        per_tool: dict = {}
        if "nnunet" in args.tools:
            per_tool["nnunet"] = run_nnunet_probe(venv, pre, work, name, config, patch, batch, args)
        if "autoliver" in args.tools:
            per_tool["autoliver"] = run_autoliver_side(ws, work, name, config, patch, batch, args)
        report["configurations"][config] = {"patch_size": patch, "batch_size": batch, "results": per_tool,
                                            "ratios": ratios(per_tool)}
        out_json.parent.mkdir(parents=True, exist_ok=True)
        out_json.write_text(json.dumps(report, indent=2) + "\n")  # partial results survive a later failure
    report["loadavg_end"] = list(os.getloadavg())
    out_json.write_text(json.dumps(report, indent=2) + "\n")

    print_report(report)
    print(f"results: {out_json}")
    ok = all(t.get("ok") for r in report["configurations"].values() for t in r["results"].values())
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
