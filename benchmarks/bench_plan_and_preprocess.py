"""Side by side: nnU-Net v2 `nnUNetv2_plan_and_preprocess` against `autoliver plan_and_preprocess`.

Both run as subprocesses on the same raw dataset (the real example cases shipped with
autoliver plus LiTS-size synthetic phantoms), with the same number of worker processes,
from empty output folders. For each: wall time, CPU time, peak memory of the whole process
tree (summed RSS and PSS, and the largest single process), and the disk footprint of what
it wrote. Prints a table with the ratios nnU-Net / autoliver and writes a JSON of results.

    python benchmarks/bench_plan_and_preprocess.py --out results.json            # full size
    python benchmarks/bench_plan_and_preprocess.py --n-phantoms 1 --phantom-slices 64  # quick

nnU-Net v2 lives in its own virtual environment (--nnunet-venv; created with --setup).
See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _measure import RunMeasurement, disk_usage, disk_usage_by_child, human_bytes, measure_command  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
NNUNET_VENV_ENV = "NNUNET_VENV"
DEFAULT_NNUNET_VENV = REPO_ROOT / ".venv-nnunet"
NNUNET_CONFIGS = ("2d", "3d_fullres", "3d_lowres")
TOOL_NAMES = {"nnunet": "nnU-Net v2", "autoliver": "autoliver"}

log = logging.getLogger("bench_plan_and_preprocess")


# ----------------------------------------------------------------------------- set-up

def nnunet_entry(venv: Path, name: str) -> Path:
    return venv / "bin" / name


def ensure_nnunet(venv: Path, setup: bool, torch_spec: str, pip_args: list[str]) -> None:
    """Check nnU-Net v2 is installed in ``venv``; with ``setup``, create the venv and install it."""
    if nnunet_entry(venv, "nnUNetv2_plan_and_preprocess").exists():
        return
    if not setup:
        raise SystemExit(
            f"nnU-Net v2 not found in {venv} (no bin/nnUNetv2_plan_and_preprocess); pass --setup to create "
            f"that virtual environment and install {torch_spec} and nnunetv2 into it, or point --nnunet-venv "
            f"(or ${NNUNET_VENV_ENV}) to an existing one"
        )
    if not (venv / "bin" / "python").exists():
        log.info("creating virtual environment %s", venv)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    cmd = [str(venv / "bin" / "python"), "-m", "pip", "install", *pip_args, torch_spec, "nnunetv2"]
    log.info("installing: %s", shlex.join(cmd))
    subprocess.run(cmd, check=True)


def package_versions(python: Path, packages: tuple[str, ...]) -> dict[str, str | None]:
    code = (
        "import importlib.metadata as m, json, sys\n"
        "out = {}\n"
        "for p in sys.argv[1:]:\n"
        "    try: out[p] = m.version(p)\n"
        "    except m.PackageNotFoundError: out[p] = None\n"
        "print(json.dumps(out))"
    )
    try:
        res = subprocess.run([str(python), "-c", code, *packages], capture_output=True, text=True, check=True)
        return json.loads(res.stdout)
    except (OSError, subprocess.CalledProcessError, json.JSONDecodeError):
        return {p: None for p in packages}


def default_autoliver_cmd() -> list[str]:
    script = Path(sys.executable).parent / "autoliver"
    return [str(script)] if script.exists() else [sys.executable, "-m", "autoliver.cli"]


def build_dataset(raw_root: Path, name: str, n_phantoms: int, shape: tuple[int, int, int],
                  spacing: tuple[float, float, float], seed: int) -> Path:
    """The raw dataset: real example cases + phantoms; reused when built with the same settings."""
    from autoliver.examples.dataset import DEFAULT_REAL_CASES, build_example_dataset

    root = raw_root / name
    recipe = {"real_cases": list(DEFAULT_REAL_CASES), "n_phantoms": n_phantoms, "phantom_shape": list(shape),
              "phantom_spacing": list(spacing), "seed": seed}
    stamp = raw_root / f".{name}.recipe.json"
    if root.is_dir() and stamp.is_file() and json.loads(stamp.read_text()) == recipe:
        log.info("reusing raw dataset %s", root)
        return root
    log.info("building raw dataset %s: %d real cases + %d phantoms %s at %s mm", root, len(DEFAULT_REAL_CASES), n_phantoms, shape, spacing)
    build_example_dataset(root, n_phantoms=n_phantoms, phantom_shape=shape, phantom_spacing=spacing, seed=seed, overwrite=True)
    stamp.write_text(json.dumps(recipe))
    return root


def describe_dataset(root: Path) -> list[dict]:
    from autoliver.io.images import read_header

    cases = []
    for path in sorted((root / "imagesTr").glob("*_0000.nii.gz")):
        geom, _, _ = read_header(path)
        cases.append({"case": path.name[: -len("_0000.nii.gz")], "shape_zyx": list(geom.shape),
                      "spacing_zyx": [round(s, 4) for s in geom.spacing], "bytes": path.stat().st_size})
    return cases


# ----------------------------------------------------------------------------- runs

def fresh(path: Path) -> Path:
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


def run_nnunet(venv: Path, raw_root: Path, dataset_id: int, dataset_name: str, work: Path, n_proc: int,
               poll_s: float, timeout_s: float | None, configurations: tuple[str, ...] = NNUNET_CONFIGS) -> dict:
    pre, res = fresh(work / "nnunet_preprocessed"), fresh(work / "nnunet_results")
    env = {**os.environ, "nnUNet_raw": str(raw_root), "nnUNet_preprocessed": str(pre), "nnUNet_results": str(res)}
    cmd = [str(nnunet_entry(venv, "nnUNetv2_plan_and_preprocess")), "-d", str(dataset_id), "-c", *configurations,
           "-np", str(n_proc), "-npfp", str(n_proc), "--verify_dataset_integrity"]
    log.info("nnU-Net: %s", shlex.join(cmd))
    m = measure_command(cmd, env=env, log_path=work / "nnunet.log", poll_s=poll_s, timeout_s=timeout_s)
    out = pre / dataset_name
    return _result(m, out)


def run_autoliver(autoliver_cmd: list[str], dataset: Path, work: Path, n_proc: int, extra: list[str],
                  poll_s: float, timeout_s: float | None) -> dict:
    ws = fresh(work / "autoliver_workspace")
    cmd = [*autoliver_cmd, "plan_and_preprocess", str(dataset), "--workspace", str(ws), "-np", str(n_proc), *extra]
    log.info("autoliver: %s", shlex.join(cmd))
    m = measure_command(cmd, log_path=work / "autoliver.log", poll_s=poll_s, timeout_s=timeout_s)
    out = ws / "preprocessed" / dataset.name
    return _result(m, out if out.is_dir() else ws)


def _result(m: RunMeasurement, output: Path) -> dict:
    if m.returncode != 0:
        log.error("%s exited with %d; see %s", Path(m.command[0]).name, m.returncode, m.log_path)
    return {**m.to_json(), "output": str(output), "disk_bytes": disk_usage(output) if output.exists() else 0,
            "disk_by_child": disk_usage_by_child(output)}


# ----------------------------------------------------------------------------- report

METRICS = (
    ("wall time", "wall_s", lambda v: f"{v:.1f} s"),
    ("CPU time, process tree", "cpu_s", lambda v: f"{v:.1f} s"),
    ("peak RSS, process tree sum", "peak_tree_rss", human_bytes),
    ("peak PSS, process tree sum", "peak_tree_pss", human_bytes),
    ("peak RSS, single process", "peak_single_rss", human_bytes),
    ("max processes", "max_processes", str),
    ("disk, preprocessed output", "disk_bytes", human_bytes),
)


def ratios(results: dict) -> dict[str, float | None]:
    a, b = results.get("nnunet"), results.get("autoliver")
    if not a or not b:
        return {}
    out = {}
    for _, key, _ in METRICS:
        if key == "max_processes":
            continue
        va, vb = a.get(key), b.get(key)
        out[key] = (va / vb) if isinstance(va, (int, float)) and isinstance(vb, (int, float)) and vb else None
    return out


def table(results: dict, ratio: dict) -> str:
    tools = [t for t in ("nnunet", "autoliver") if t in results]
    header = ["metric", *(TOOL_NAMES[t] for t in tools)]
    if ratio:
        header.append("nnU-Net / autoliver")
    rows = [header]
    for label, key, fmt in METRICS:
        row = [label]
        for t in tools:
            v = results[t].get(key)
            row.append(fmt(v) if v is not None else "n/a")
        if ratio:
            r = ratio.get(key)
            row.append(f"{r:.2f}x" if r is not None else "n/a")
        rows.append(row)
    rows.append(["exit status", *(str(results[t]["returncode"]) for t in tools), *([""] if ratio else [])])
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


# ----------------------------------------------------------------------------- main

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", type=Path, help="where the raw dataset and all outputs go (default: a new temporary folder); "
                   "a raw dataset built there with the same settings is reused")
    p.add_argument("--out", type=Path, help="results JSON (default: WORKDIR/bench_plan_and_preprocess.json)")
    p.add_argument("--tools", nargs="+", choices=["nnunet", "autoliver"], default=["nnunet", "autoliver"])
    p.add_argument("-np", "--n-proc", type=int, default=2, help="worker processes for both tools (default: %(default)s)")
    p.add_argument("--nnunet-venv", type=Path, default=Path(os.environ.get(NNUNET_VENV_ENV, DEFAULT_NNUNET_VENV)),
                   help=f"virtual environment with nnunetv2 (default: ${NNUNET_VENV_ENV}, else REPO/.venv-nnunet)")
    p.add_argument("--setup", action="store_true", help="create --nnunet-venv and install nnU-Net v2 into it if missing")
    p.add_argument("--torch-spec", default="torch==2.13.0", help="torch requirement for --setup (default: %(default)s)")
    p.add_argument("--pip-args", default="", help="extra pip arguments for --setup, e.g. an index for CPU-only torch wheels")
    p.add_argument("--autoliver-cmd", help="command that runs autoliver (default: the `autoliver` script next to this "
                   "Python, else `python -m autoliver.cli`)")
    p.add_argument("--autoliver-args", default="", help="extra arguments for `autoliver plan_and_preprocess`")
    p.add_argument("--n-phantoms", type=int, default=3, help="LiTS-size phantoms added to the real cases (default: %(default)s)")
    p.add_argument("--phantom-slices", type=int, default=460, help="phantom slices (default: %(default)s)")
    p.add_argument("--phantom-size", type=int, default=512, help="phantom in-plane size (default: %(default)s)")
    p.add_argument("--phantom-spacing", type=float, nargs=3, default=[1.0, 0.77, 0.77], metavar=("Z", "Y", "X"),
                   help="phantom spacing in mm (default: 1.0 0.77 0.77)")
    p.add_argument("--seed", type=int, default=0, help="phantom seed (default: %(default)s)")
    p.add_argument("--dataset-id", type=int, default=901, help="nnU-Net dataset id (default: %(default)s)")
    p.add_argument("--dataset-name", default="LiverBench", help="dataset name after DatasetNNN_ (default: %(default)s)")
    p.add_argument("--poll", type=float, default=0.1, help="memory polling interval in s (default: %(default)s)")
    p.add_argument("--timeout", type=float, help="kill a tool after this many seconds")
    p.add_argument("--keep", action="store_true", help="keep the preprocessed outputs (default: delete them after measuring)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.n_proc < 1 or args.n_phantoms < 0 or args.phantom_slices < 1 or args.phantom_size < 1:
        raise SystemExit("-np, --phantom-slices and --phantom-size must be >= 1 and --n-phantoms >= 0")
    work = (args.workdir or Path(tempfile.mkdtemp(prefix="autoliver-bench-"))).resolve()
    work.mkdir(parents=True, exist_ok=True)
    out_json = args.out or work / "bench_plan_and_preprocess.json"
    venv = args.nnunet_venv.expanduser().resolve()
    if "nnunet" in args.tools:
        ensure_nnunet(venv, args.setup, args.torch_spec, shlex.split(args.pip_args))

    name = f"Dataset{args.dataset_id:03d}_{args.dataset_name}"
    raw_root = work / "raw"
    shape = (args.phantom_slices, args.phantom_size, args.phantom_size)
    dataset = build_dataset(raw_root, name, args.n_phantoms, shape, tuple(args.phantom_spacing), args.seed)
    cases = describe_dataset(dataset)

    results: dict = {}
    if "nnunet" in args.tools:
        results["nnunet"] = run_nnunet(venv, raw_root, args.dataset_id, name, work, args.n_proc, args.poll, args.timeout)
        results["nnunet"]["versions"] = package_versions(venv / "bin" / "python", ("nnunetv2", "torch", "numpy", "SimpleITK"))
    if "autoliver" in args.tools:
        cmd = shlex.split(args.autoliver_cmd) if args.autoliver_cmd else default_autoliver_cmd()
        results["autoliver"] = run_autoliver(cmd, dataset, work, args.n_proc, shlex.split(args.autoliver_args), args.poll, args.timeout)
        results["autoliver"]["versions"] = package_versions(Path(sys.executable), ("autoliver", "torch", "numpy", "SimpleITK"))
    ratio = ratios(results)

    report = {
        "benchmark": "plan_and_preprocess",
        "machine": {"cpus": os.cpu_count(), "ram_bytes": psutil.virtual_memory().total, "platform": platform.platform(),
                    "python": platform.python_version()},
        "n_proc": args.n_proc,
        "nnunet_configurations": list(NNUNET_CONFIGS),
        "dataset": {"name": name, "cases": cases, "raw_bytes": disk_usage(dataset), "seed": args.seed},
        "results": results,
        "ratios_nnunet_over_autoliver": ratio,
    }
    out_json.parent.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps(report, indent=2) + "\n")
    if not args.keep:
        for sub in ("nnunet_preprocessed", "autoliver_workspace"):
            shutil.rmtree(work / sub, ignore_errors=True)
    print(f"\nplan_and_preprocess, {len(cases)} cases ({human_bytes(report['dataset']['raw_bytes'])} raw), -np {args.n_proc}\n")
    print(table(results, ratio))
    print(f"\nresults: {out_json}")
    return 0 if all(r["returncode"] == 0 for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
