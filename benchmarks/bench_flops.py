"""Achieved GFLOP/s of the 3d_fullres network's forward pass on this CPU, and float32 against
bfloat16 autocast (seconds, agreement of the labels).

FLOPs are counted with ``torch.utils.flop_counter.FlopCounterMode`` (convolutions and matrix
products, 2 FLOPs per multiply-add) for one patch (batch 1); the forward is timed over
``--reps`` runs after a warm-up. The bf16 comparison runs the same network (trained weights
from ``-m``, else random) on a patch of a real CT case (lits117_128cube, preprocessed with the
model's plans; a small tile, since emulated bf16 is slow) and compares the argmax labels. Prints a table and writes JSON (``--out``).

    python benchmarks/bench_flops.py -m WORKSPACE/results/DATASET --out flops.json

Measured on the 2-core AVX2 development machine (torch 2 threads) under a load average of
11-14 from other jobs, so the wall-clock figures are a floor, not the CPU's capability: the
3d_fullres network (16..256 features, 5.5 M parameters), patch 48 x 80 x 64: 28.3 GFLOP per
patch, 18.4 s -> 1.5 GFLOP/s wall. bf16 autocast against float32 on a 16 x 32 x 32 tile of
lits117_128cube: 115.8 s against 3.8 s (30x slower: no native bf16), labels equal on 99.988 %
of the voxels (liver Dice bf16 vs fp32 0.995). ``auto`` therefore keeps float32 here. On an
H100 float16 autocast gave the same Dice as float32 to 1e-4 (bench_predict_roi.py).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from autoliver import examples
from autoliver.evaluate.overlap import case_dice
from autoliver.infer.precision import cpu_flags, cpu_has_native_bf16, resolve_precision
from autoliver.infer.predictor import load_model, preprocess_for
from autoliver.io.images import read_image


def timed(fn, reps: int, cpu: list | None = None) -> float:
    """Mean wall seconds of ``fn`` over ``reps`` runs after a warm-up; ``cpu`` receives the
    mean CPU seconds of this process (all threads): on a shared machine the wall time counts
    other processes' turns, the CPU time does not."""
    fn()  # warm-up
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(max(1, reps)):
        fn()
    if cpu is not None:
        cpu.append((time.process_time() - c0) / max(1, reps))
    return (time.perf_counter() - t0) / max(1, reps)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-m", "--model-dir", required=True, type=Path)
    ap.add_argument("-c", "--configuration", default="3d_fullres")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--bf16-reps", type=int, default=1)
    ap.add_argument("--bf16-scale", type=int, default=2, help="bf16 tile = network stride product x this (default: %(default)s)")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    model = load_model(args.model_dir, args.configuration, device="cpu", precision="fp32")
    net = model.folds[0].network
    patch = tuple(model.configuration.patch_size)
    x = torch.randn(1, 1, *patch)
    with torch.inference_mode():
        counter = FlopCounterMode(display=False)
        with counter:
            net(x)
        flops = counter.get_total_flops()
        cpu: list[float] = []
        seconds = timed(lambda: net(x), args.reps, cpu)
    params = sum(p.numel() for p in net.parameters())
    report = {"machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "load_avg": os.getloadavg(),
                          "native_bf16": cpu_has_native_bf16(), "auto_precision": resolve_precision("auto", "cpu"),
                          "isa": str(getattr(torch.backends.cpu, "get_cpu_capability", lambda: "?")()),
                          "avx512": any(f.startswith("avx512") for f in cpu_flags())},
              "network": {"configuration": args.configuration, "patch": list(patch), "features": list(model.configuration.features_per_stage),
                          "params": params, "gflop_per_patch": round(flops / 1e9, 2)},
              "fp32": {"seconds_per_patch": round(seconds, 3), "gflop_per_s": round(flops / 1e9 / seconds, 1),
                       "cpu_seconds_per_patch": round(cpu[0], 3), "gflop_per_cpu_s": round(flops / 1e9 / cpu[0], 1)}}
    print(f"{args.configuration} patch {patch}: {flops / 1e9:.1f} GFLOP, fp32 {seconds:.2f} s -> {flops / 1e9 / seconds:.1f} GFLOP/s wall, "
          f"{flops / 1e9 / cpu[0]:.1f} GFLOP per CPU-second ({torch.get_num_threads()} threads, load {os.getloadavg()[0]:.1f})", flush=True)
    # fp32 against bf16 autocast on a patch of real CT
    image, geometry = read_image(examples.image_path("lits117_128cube"))
    data = preprocess_for(model, image, geometry)[model.configuration.data_identifier][0]
    # bf16 autocast is emulated (slow) on CPUs without native bf16: a small tile, the smallest
    # the network's strides allow times ``--bf16-scale``
    strides = np.prod(np.asarray(model.configuration.strides), axis=0)
    patch = tuple(int(min(p, s * args.bf16_scale)) for p, s in zip(patch, strides))
    tile = np.zeros(patch, np.float32) + model.pad_value
    sub = tuple(slice(0, min(d, p)) for d, p in zip(data.shape, patch))
    tile[sub] = data[sub]
    xt = torch.from_numpy(tile)[None, None]
    out = {}
    with torch.inference_mode():
        for name, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
            def run():
                with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
                    return net(xt).float()

            reps = args.reps if dtype is None else args.bf16_reps
            out[name] = (timed(run, reps), run().argmax(1)[0].numpy().astype(np.uint8))
    agree = float(np.mean(out["fp32"][1] == out["bf16"][1]))
    dice = case_dice(out["bf16"][1], out["fp32"][1])
    report["fp32_vs_bf16"] = {"tile_of": "lits117_128cube", "tile": list(patch), "fp32_s": round(out["fp32"][0], 3), "bf16_s": round(out["bf16"][0], 3),
                              "slowdown": round(out["bf16"][0] / out["fp32"][0], 1), "voxel_agreement": round(agree, 5),
                              "dice_bf16_vs_fp32": {k: round(v, 4) for k, v in dice.items()}}
    print(f"fp32 {out['fp32'][0]:.2f} s, bf16 {out['bf16'][0]:.2f} s per patch (x{out['bf16'][0] / out['fp32'][0]:.1f}); "
          f"labels agree on {100 * agree:.3f}% of voxels, Dice bf16 vs fp32 {dice}", flush=True)
    args.out.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
