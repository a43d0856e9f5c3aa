"""Achieved GFLOP/s of a configuration's network forward pass on this CPU, and float32 against
bfloat16 autocast (seconds, agreement of the labels).

FLOPs are counted with ``torch.utils.flop_counter.FlopCounterMode`` (convolutions and matrix
products, 2 FLOPs per multiply-add) for one patch (batch 1); the forward is timed over
``--reps`` runs after a warm-up, wall and CPU time (on a shared machine the wall time counts
other processes' turns, the CPU time does not). The bf16 comparison runs the same network
(trained weights from ``-m``) on a patch of a real CT case (lits117_128cube, preprocessed with
the model's plans; a small tile, the network's stride product x ``--bf16-scale``, since emulated
bf16 is slow) and compares the argmax labels. The CPU's flags (native bf16 or not) are in the report.
"""

from __future__ import annotations

import time

import numpy as np

from benchmarks.harness import cases


def add_arguments(p) -> None:
    p.add_argument("-m", "--model-dir", help="trained model folder, results/<dataset> (required unless --quick)")
    p.add_argument("-c", "--configuration", default="3d_fullres")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--bf16-reps", type=int, default=1)
    p.add_argument("--bf16-scale", type=int, default=2, help="bf16 tile = the network's stride product x this (default: %(default)s)")


def timed(fn, reps: int) -> tuple[float, float]:
    """Mean (wall, CPU) seconds of ``fn`` over ``reps`` runs after a warm-up."""
    fn()
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(max(1, reps)):
        fn()
    return (time.perf_counter() - t0) / max(1, reps), (time.process_time() - c0) / max(1, reps)


def run(ctx) -> dict:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from autoliver.evaluate.overlap import case_dice
    from autoliver.infer.precision import cpu_has_native_bf16, resolve_precision
    from autoliver.infer.predictor import load_model, preprocess_for

    a = ctx.args
    if not (ctx.quick or a.model_dir):
        raise SystemExit("flops needs -m MODEL_DIR (a trained results/<dataset> folder), or --quick")
    model = load_model(cases.tiny_model(ctx) if ctx.quick else a.model_dir, a.configuration, device="cpu", precision="fp32")
    net, cfg = model.folds[0].network, model.configuration
    patch = tuple(cfg.patch_size)
    x = torch.randn(1, 1, *patch)
    with torch.inference_mode():
        counter = FlopCounterMode(display=False)
        with counter:
            net(x)
        gflop = counter.get_total_flops() / 1e9
        wall, cpu = timed(lambda: net(x), a.reps)
    # fp32 against bf16 autocast on a tile of real CT, the smallest the strides allow x --bf16-scale
    image, _, geometry = cases.real_case("lits117_128cube", ctx)
    data = preprocess_for(model, image, geometry)[cfg.data_identifier][0]
    strides = np.prod(np.asarray(cfg.strides), axis=0)
    tile_shape = tuple(int(min(p, s * a.bf16_scale)) for p, s in zip(patch, strides))
    tile = np.zeros(tile_shape, np.float32) + model.pad_value
    sub = tuple(slice(0, min(d, p)) for d, p in zip(data.shape, tile_shape))
    tile[sub] = data[sub]
    xt = torch.from_numpy(tile)[None, None]
    out = {}
    with torch.inference_mode():
        for name, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
            def forward(dtype=dtype):
                with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
                    return net(xt).float()

            out[name] = (timed(forward, a.reps if dtype is None else a.bf16_reps)[0], forward().argmax(1)[0].numpy().astype(np.uint8))
    dice = case_dice(out["bf16"][1], out["fp32"][1])
    rows = [{"metric": k, "value": v} for k, v in {
        "GFLOP per patch": gflop, "fp32 seconds per patch (wall)": wall, "fp32 GFLOP/s (wall)": gflop / wall,
        "fp32 CPU seconds per patch": cpu, "fp32 GFLOP per CPU second": gflop / cpu,
        "tile: fp32 seconds": out["fp32"][0], "tile: bf16 seconds": out["bf16"][0], "tile: bf16 / fp32 time": out["bf16"][0] / out["fp32"][0],
        "tile: label agreement bf16 vs fp32": float(np.mean(out["fp32"][1] == out["bf16"][1])),
        "tile: liver Dice bf16 vs fp32": dice["liver"], "tile: tumour Dice bf16 vs fp32": dice["tumour"]}.items()]
    return {"rows": rows, "network": {"configuration": a.configuration, "patch": list(patch), "features": list(cfg.features_per_stage),
                                      "parameters": sum(p.numel() for p in net.parameters())},
            "tile": list(tile_shape), "native_bf16": cpu_has_native_bf16(), "auto_precision": resolve_precision("auto", "cpu")}
