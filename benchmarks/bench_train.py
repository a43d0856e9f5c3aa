"""autoliver's side of the training benchmark: iterations/s, data-loader samples/s, peak RSS.

``measure_autoliver_training(...)`` trains a configuration for a few short epochs as a
subprocess (the CLI, as a user runs it), measured as a process tree (``_measure``), and reads
the per-epoch records from its log.jsonl. The first epoch holds the start-up (worker
processes, first allocations) and is reported apart; iterations/s is taken over the later
epochs. The loader is measured on its own in this process (batches/s without a network).
Patch and batch size can be overridden, so both tools can be run at the same sizes: the
overrides go into a copy of plans.json in a scratch workspace whose data folders link to the
original preprocessed data.

    python benchmarks/bench_train.py --workspace WS -d Dataset900_LiverPhantom -c 3d_fullres \
        --patch 48 128 128 --batch 2 --iters 5 --epochs 3 --out bench_train.json
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _measure import human_bytes, measure_command  # noqa: E402

log = logging.getLogger("bench_train")


def _scratch_workspace(workspace: Path, dataset: str, configuration: str, scratch: Path,
                       patch: tuple[int, ...] | None, batch: int | None) -> Path:
    """A workspace whose plans.json has the overridden patch/batch; data folders are symlinks."""
    from autoliver.api import write_plans
    from planning.plans import Plans

    src = Path(workspace) / "preprocessed" / dataset
    dst = scratch / "preprocessed" / dataset
    shutil.rmtree(scratch, ignore_errors=True)
    dst.mkdir(parents=True)
    for child in src.iterdir():
        if child.is_dir():
            (dst / child.name).symlink_to(child.resolve(), target_is_directory=True)
        elif child.name != "plans.json":
            shutil.copy2(child, dst / child.name)
    plans = Plans.load(src / "plans.json")
    cfg = plans.configurations[configuration]
    if patch is not None:
        if len(patch) != len(cfg.patch_size):
            raise ValueError(f"--patch needs {len(cfg.patch_size)} values for {configuration}, got {patch}")
        cfg = replace(cfg, patch_size=tuple(patch))
    if batch is not None:
        cfg = replace(cfg, batch_size=int(batch))
    write_plans(replace(plans, configurations={**plans.configurations, configuration: cfg}), dst / "plans.json")
    return scratch


def measure_loader(workspace: Path, dataset: str, configuration: str, n_workers: int, n_batches: int = 10, seed: int = 0) -> dict:
    """Training-loader throughput alone: samples/s over ``n_batches`` after the first."""
    from autoliver.data.loader import make_train_loader
    from autoliver.preprocess.storage import list_cases
    from planning.plans import Plans

    pre = Path(workspace) / "preprocessed" / dataset
    cfg = Plans.load(pre / "plans.json").configurations[configuration]
    folder = pre / cfg.data_identifier
    with make_train_loader(folder, list_cases(folder), cfg, seed=seed, n_workers=n_workers) as loader:
        next(loader)
        t0 = time.perf_counter()
        for _ in range(n_batches):
            next(loader)
        seconds = time.perf_counter() - t0
    return {"batches": n_batches, "batch_size": cfg.batch_size, "seconds": seconds, "samples_per_s": n_batches * cfg.batch_size / seconds}


def measure_autoliver_training(workspace: Path, dataset: str, configuration: str = "3d_fullres", *, fold: int | str = 0,
                               epochs: int = 3, iters_per_epoch: int = 5, n_workers: int = 2, device: str = "cpu",
                               patch: tuple[int, ...] | None = None, batch: int | None = None, scratch: Path | None = None,
                               autoliver_cmd: list[str] | None = None, poll_s: float = 0.2, timeout_s: float | None = None,
                               loader_batches: int = 10) -> dict:
    """Train ``epochs`` x ``iters_per_epoch`` iterations from the CLI and measure them.

    Returns a JSON-able dict: iterations_per_s and samples_per_s (epochs after the first),
    first-epoch seconds, the loader's own samples/s, the data-wait share, peak RSS/PSS of the
    process tree, wall and CPU time, and the run's settings. ``scratch`` (default: a folder
    next to the workspace) receives the run's workspace copy and results.
    """
    workspace = Path(workspace)
    scratch = Path(scratch) if scratch is not None else workspace.parent / f".bench_train_{configuration}"
    ws = _scratch_workspace(workspace, dataset, configuration, scratch, patch, batch)
    cmd = [*(autoliver_cmd or [sys.executable, "-m", "autoliver.cli"]), "train", "-d", dataset, configuration, str(fold),
           "--workspace", str(ws), "--epochs", str(epochs), "--iters-per-epoch", str(iters_per_epoch), "--val-iters", "0",
           "--no-validation", "--device", device, "-np", str(n_workers), "--no-progress"]
    log.info("autoliver: %s", " ".join(cmd))
    m = measure_command(cmd, log_path=scratch / "train.log", poll_s=poll_s, timeout_s=timeout_s)
    out_dir = ws / "results" / dataset / configuration / f"fold_{fold}"
    records = [json.loads(line) for line in (out_dir / "log.jsonl").read_text().splitlines()] if (out_dir / "log.jsonl").is_file() else []
    later = records[1:] or records
    train_s = sum(r["train_s"] for r in later)
    iters = sum(r["iters"] for r in later)
    from planning.plans import Plans

    cfg = Plans.load(ws / "preprocessed" / dataset / "plans.json").configurations[configuration]
    result = {
        "tool": "autoliver", "configuration": configuration, "device": device, "patch_size": list(cfg.patch_size),
        "batch_size": cfg.batch_size, "epochs": epochs, "iters_per_epoch": iters_per_epoch, "n_workers": n_workers,
        "returncode": m.returncode, "wall_s": m.wall_s, "cpu_s": m.cpu_s,
        "peak_tree_rss": m.peak_tree_rss, "peak_tree_pss": m.peak_tree_pss, "peak_single_rss": m.peak_single_rss,
        "first_epoch_s": records[0]["epoch_s"] if records else None,
        "iterations_per_s": iters / train_s if train_s else None,
        "samples_per_s": sum(r["samples"] for r in later) / train_s if train_s else None,
        "data_wait_share": sum(r["data_wait_share"] * r["train_s"] for r in later) / train_s if train_s else None,
        "log": str(scratch / "train.log"),
    }
    if loader_batches:
        result["loader"] = measure_loader(ws, dataset, configuration, n_workers, loader_batches)
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workspace", required=True, help="workspace with the preprocessed dataset")
    p.add_argument("-d", "--dataset", required=True)
    p.add_argument("-c", "--configuration", default="3d_fullres")
    p.add_argument("--patch", type=int, nargs="+", help="patch size override")
    p.add_argument("--batch", type=int, help="batch size override")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--iters", type=int, default=5, help="iterations per epoch")
    p.add_argument("-np", "--workers", type=int, default=2)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    p.add_argument("--out", help="write the results as JSON here")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    r = measure_autoliver_training(Path(args.workspace), args.dataset, args.configuration, epochs=args.epochs,
                                   iters_per_epoch=args.iters, n_workers=args.workers, device=args.device,
                                   patch=tuple(args.patch) if args.patch else None, batch=args.batch)
    print(f"{r['configuration']} patch {r['patch_size']} batch {r['batch_size']} on {r['device']}:")
    print(f"  iterations/s {r['iterations_per_s']:.4f}  samples/s {r['samples_per_s']:.3f}  (first epoch {r['first_epoch_s']:.1f} s)")
    if "loader" in r:
        print(f"  loader alone: {r['loader']['samples_per_s']:.2f} samples/s; data-wait share in training {r['data_wait_share']:.3f}")
    print(f"  peak RSS (tree) {human_bytes(r['peak_tree_rss'])}, PSS {human_bytes(r['peak_tree_pss'])}, single process {human_bytes(r['peak_single_rss'])}")
    if args.out:
        Path(args.out).write_text(json.dumps(r, indent=2))
    return 0 if r["returncode"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
