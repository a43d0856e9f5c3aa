"""Training data loader throughput (samples/s, augmentation on) against the network's training step.

A LiTS-size phantom dataset (``--cases`` of ``--shape`` at 1.0 x 0.78 x 0.78 mm) is preprocessed
with autoliver's CPU plan (cached); the loader is timed by ``harness.loader``'s rule with 0, 1
and 2 worker processes for the plan's 3d_fullres, a 64 x 128 x 128 patch at batch 2 and the
plan's 2d; then the plan's U-Net's train step (forward, cross-entropy on the full-resolution
output, backward, SGD step) at the same patch and batch. The loader keeps up when its
samples/s exceed the network's. Numbers move with the machine's load.
"""

from __future__ import annotations

import time

import numpy as np

from benchmarks.harness import cache, cases
from benchmarks.harness.loader import autoliver_loader


def add_arguments(p) -> None:
    p.add_argument("--cases", type=int, default=2)
    p.add_argument("--shape", type=int, nargs=3, default=[400, 512, 512])
    p.add_argument("--batches", type=int, default=10, help="timed batches per setting (default: %(default)s)")
    p.add_argument("--net-steps", type=int, default=3, help="timed train steps after one warm-up (default: %(default)s)")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])


def network_rate(config, n_steps: int) -> float:
    """Train-step samples/s of the configuration's U-Net at its patch and batch."""
    import torch

    from autoliver.nets import build_network, net_spec

    model = build_network("unet", net_spec(config))
    opt = torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.99, nesterov=True)
    x = torch.randn((config.batch_size, config.in_slices) + tuple(config.patch_size))
    y = torch.randint(0, 3, (config.batch_size,) + tuple(config.patch_size))

    def step() -> None:
        out = model(x)
        loss = torch.nn.functional.cross_entropy(out[0] if isinstance(out, (list, tuple)) else out, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step()  # warm-up
    t0 = time.perf_counter()
    for _ in range(n_steps):
        step()
    return n_steps * config.batch_size / (time.perf_counter() - t0)


def run(ctx) -> dict:
    from autoliver.api import StageOptions, plan_and_preprocess
    from autoliver.core.layout import Workspace
    from autoliver.examples.phantom import write_phantom_dataset
    from autoliver.preprocess.storage import list_cases

    a = ctx.args
    if ctx.quick:
        ws, name = cases.tiny_workspace(ctx), cases.TINY_DATASET
    else:
        name = "Dataset901_LoaderBench"

        def build(folder):
            root = write_phantom_dataset(Workspace(folder).raw, a.cases, np.random.default_rng(0), shape=tuple(a.shape), spacing=(1.0, 0.78, 0.78),
                                         dataset_name=name, n_tumours=(2, 5), vary=0.0)
            plan_and_preprocess(root, Workspace(folder), configurations=["2d", "3d_fullres"], device="cpu", options=StageOptions(n_jobs=1, progress=False))

        ws = cache.entry(ctx, "loader_workspace", {"cases": a.cases, "shape": a.shape}, build)
    plans = cases.load_plans(ws, name)
    c3, c2 = plans.configurations["3d_fullres"], plans.configurations["2d"]
    configs = [c3, cases.shrink(c3, (64, 128, 128), 2), c2] if not ctx.quick else [c3, c2]
    rows = []
    for cfg in configs:
        folder = ws / "preprocessed" / name / cfg.data_identifier
        label = f"{cfg.name} {'x'.join(map(str, cfg.patch_size))} b{cfg.batch_size}"
        for w in ctx.pick(a.workers, [0, 1]):
            r = autoliver_loader(folder, list_cases(folder), cfg, w, ctx.pick(a.batches, 2))
            rows.append({"configuration": label, "what": f"loader, {w} workers", "samples/s": r["loader_samples_per_s"], "tumour share": r["tumour_share"]})
        rows.append({"configuration": label, "what": "U-Net train step", "samples/s": network_rate(cfg, ctx.pick(a.net_steps, 1))})
        ctx.checkpoint({"rows": rows})
    return {"rows": rows}
