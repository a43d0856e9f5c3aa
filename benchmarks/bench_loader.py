"""Training data loader throughput (samples/s) against the network's training step.

Builds a LiTS-size phantom dataset (512 x 512 in plane, a few hundred slices, ~0.8 mm),
preprocesses it with ``autoliver.api.plan_and_preprocess`` (CPU plan) into a workspace, then
measures the loader with 0, 1 and 2 worker processes (augmentation on) for a 3D
configuration (the plan's 3d_fullres and a 64 x 128 x 128 patch) and the 2d configuration;
then, when ``autoliver.nets`` is available, the 3D U-Net's train step (forward, Dice-free
cross-entropy on the full-resolution output, backward, SGD step) at the same patch and batch.
The loader keeps up when its samples/s exceed the network's.

    python benchmarks/bench_loader.py [--cases 2] [--shape 400 512 512] [--batches 10] [--workspace DIR]

Prints a table and writes ``bench_loader.json`` in the workspace. Numbers move with the
machine's load; run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from autoliver.api import StageOptions, plan_and_preprocess
from autoliver.core.layout import Workspace
from autoliver.data import make_train_loader
from autoliver.examples.phantom import write_phantom_dataset
from autoliver.preprocess.storage import list_cases
from planning.plans import Plans


def prepare(workspace: Path, n_cases: int, shape: tuple[int, int, int]) -> tuple[Plans, Path]:
    ws = Workspace(workspace)
    name = "Dataset901_LoaderBench"
    plans_path = ws.preprocessed(name) / "plans.json"
    if not plans_path.is_file():
        root = write_phantom_dataset(ws.raw, n_cases, np.random.default_rng(0), shape=shape,
                                     spacing=(1.0, 0.78, 0.78), dataset_name=name, n_tumours=(2, 5), vary=0.0)
        t0 = time.perf_counter()
        plan_and_preprocess(root, ws, configurations=["2d", "3d_fullres"], device="cpu",
                            options=StageOptions(n_jobs=1, progress=False))
        print(f"preprocessed {n_cases} cases of {shape} in {time.perf_counter() - t0:.0f} s")
    plans = Plans.load(plans_path)
    return plans, ws.preprocessed(name) / plans.configurations["3d_fullres"].data_identifier


def loader_rate(folder: Path, config, workers: int, n_batches: int) -> tuple[float, float]:
    """(samples/s, tumour share) over ``n_batches`` after a first (warm-up) batch."""
    cases = list_cases(folder)
    with make_train_loader(folder, cases, config, seed=0, n_workers=workers) as loader:
        next(loader)  # worker start-up and case opening
        t0 = time.perf_counter()
        for _ in range(n_batches):
            next(loader)
        dt = time.perf_counter() - t0
        stats = loader.stats()
    return n_batches * config.batch_size / dt, stats.tumour_share


def network_rate(config, n_steps: int) -> float | None:
    """Train-step samples/s of the plan's U-Net at the configuration's patch and batch, or None."""
    try:
        from autoliver.nets import build_network, net_spec
    except ImportError:
        return None
    model = build_network("unet", net_spec(config))
    opt = torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.99, nesterov=True)
    x = torch.randn((config.batch_size, config.in_slices) + tuple(config.patch_size))
    y = torch.randint(0, 3, (config.batch_size,) + tuple(config.patch_size))

    def step() -> None:
        out = model(x)
        out = out[0] if isinstance(out, (list, tuple)) else out
        loss = torch.nn.functional.cross_entropy(out, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step()  # warm-up
    t0 = time.perf_counter()
    for _ in range(n_steps):
        step()
    return n_steps * config.batch_size / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=int, default=2)
    ap.add_argument("--shape", type=int, nargs=3, default=(400, 512, 512))
    ap.add_argument("--batches", type=int, default=10)
    ap.add_argument("--net-steps", type=int, default=3)
    ap.add_argument("--workers", type=int, nargs="+", default=(0, 1, 2))
    ap.add_argument("--workspace", type=Path, default=None, help="reuse a workspace (default: a temporary one)")
    args = ap.parse_args()
    tmp = None
    if args.workspace is None:
        tmp = tempfile.TemporaryDirectory(prefix="bench_loader_")
        args.workspace = Path(tmp.name)
    plans, folder = prepare(args.workspace, args.cases, tuple(args.shape))
    c3 = plans.configurations["3d_fullres"]
    configs = {
        f"3d_fullres {tuple(c3.patch_size)} b{c3.batch_size}": c3,
        "3d (64, 128, 128) b2": replace(c3, patch_size=(64, 128, 128), batch_size=2),
        f"2d {tuple(plans.configurations['2d'].patch_size)} b{plans.configurations['2d'].batch_size}": plans.configurations["2d"],
    }
    rows = []
    for label, config in configs.items():
        rates = {}
        for w in args.workers:
            rate, tumour = loader_rate(folder, config, w, args.batches)
            rates[w] = rate
            print(f"  {label}: {w} workers {rate:.2f} samples/s (tumour share {tumour:.2f})", flush=True)
        net = network_rate(config, args.net_steps)
        rows.append({"config": label, "loader_samples_per_s": rates, "tumour_share": tumour, "net_samples_per_s": net})
    head = f"{'configuration':<32}" + "".join(f"{f'{w} workers':>12}" for w in args.workers) + f"{'net step':>12}"
    print("\nloader samples/s (augmentation on) vs the U-Net's train-step samples/s, "
          f"torch threads {torch.get_num_threads()}\n" + head)
    for r in rows:
        net = f"{r['net_samples_per_s']:.2f}" if r["net_samples_per_s"] else "n/a"
        print(f"{r['config']:<32}" + "".join(f"{r['loader_samples_per_s'][w]:>12.2f}" for w in args.workers) + f"{net:>12}")
    out = args.workspace / "bench_loader.json"
    out.write_text(json.dumps(rows, indent=2))
    if tmp is None:
        print(f"wrote {out}")
    else:
        tmp.cleanup()


if __name__ == "__main__":
    main()
