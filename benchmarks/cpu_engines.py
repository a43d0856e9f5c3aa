"""CPU inference engines side by side: torch float32, ONNX Runtime and OpenVINO
(``autoliver.infer.engines``), per network: seconds per sliding-window patch, seconds per case,
export and cached-load time, peak memory, agreement with torch and achieved GFLOP/s.

Networks (``--networks``): autoliver's CPU plans of a LiTS-like dataset at 2.5 x 1.6 x 1.6 mm
(``cpu_3d``: 3d_fullres, patch 32 x 80 x 96, 32..320 features; ``cpu_2d``: 2d, patch 224 x 256,
8 slices per call, 32..512), and nnU-Net v2's LiTS 3d_fullres network (``nnunet_3d``: 128^3,
32..320, as planned for an 8 GB GPU); random weights, seeded. ``-m MODEL_DIR -c CONFIG ...`` adds
the trained networks of a model folder (``trained_<config>``: fold 0; their exports are cached
next to the checkpoint, as ``autoliver predict`` would).

Each (network, engine) runs in a fresh child process (its own peak RSS): the engine is built
(export + check against torch, into an empty cache), built again (the cached load), timed on a
seeded random patch batch (warm-up, then ``--reps`` calls: the median), then runs the sliding
window (step 0.5, no TTA) over a case: the real CT case lits117_128cube, CT-normalised and
resampled to the network's ``case shape`` (trained networks: preprocessed with their own plans).
Agreement is measured against torch float32: the largest logit difference on the patch batch,
argmax agreement on it, and label agreement over the case. GFLOP per patch are counted by
``torch.utils.flop_counter`` (2 per multiply-add, direct convolution) on the meta device, so
a runtime that convolves with fewer operations (Winograd) shows an effective rate; the peak is
the best float32 matmul (4096^2) at the same thread count, measured before every network. Engine variants: ``NAME:bf16`` (torch autocast /
OpenVINO's precision hint), ``openvino:THROUGHPUT`` (its other performance hint). Engines whose
runtime is not installed are skipped with a note.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import numpy as np

from benchmarks.harness import cases, measure

NETWORKS = {
    "cpu_3d": {"plan": "cpu", "configuration": "3d_fullres", "case_shape": (80, 192, 192)},
    "cpu_2d": {"plan": "cpu", "configuration": "2d", "case_shape": (48, 192, 192)},
    "nnunet_3d": {"plan": "gpu", "configuration": "3d_fullres", "case_shape": (128, 192, 192)},
}
QUICK = {"3d_fullres": {"patch": (16, 32, 32), "features": (4, 8, 16)}, "2d": {"patch": (32, 32), "features": (4, 8, 16)}}
QUICK_CASE = (24, 48, 48)
ENGINES = ("torch", "onnxruntime", "openvino")
CT = {"lo": -17.0, "hi": 201.0, "mean": 99.4, "std": 39.4}  # the fingerprint's foreground statistics (LiTS-like)


def add_arguments(p) -> None:
    p.add_argument("--networks", nargs="+", default=list(NETWORKS), choices=list(NETWORKS))
    p.add_argument("--engines", nargs="+", default=list(ENGINES),
                   help="torch, onnxruntime, openvino, and variants NAME:bf16, openvino:THROUGHPUT (default: %(default)s)")
    p.add_argument("-m", "--model-dir", help="also the trained networks of this model folder (results/<dataset>)")
    p.add_argument("-c", "--configurations", nargs="+", default=["2d", "3d_fullres"], help="with -m (default: %(default)s)")
    p.add_argument("--reps", type=int, default=3, help="timed calls per engine after a warm-up (default: %(default)s)")
    p.add_argument("--no-case", action="store_true", help="skip the whole-case sliding window")


def fingerprint(spacing, shape, n_cases: int) -> dict:
    pct = {str(p): list(spacing) for p in (5, 10, 50, 90, 95)}
    return {"dataset_name": "Dataset990_EngineBench", "n_cases": n_cases, "labels": {"background": 0, "liver": 1, "tumour": 2},
            "spacing": {"median": list(spacing), "percentiles": pct},
            "shape_after_crop": {"median": list(shape), "percentiles": {k: list(shape) for k in pct}},
            "intensity": {"foreground": {"mean": CT["mean"], "std": CT["std"], "percentile_00_5": CT["lo"], "percentile_99_5": CT["hi"]}}}


def planned_configuration(plan: str, name: str, quick: bool):
    from planning.planner import plan_experiment

    if plan == "cpu":
        plans = plan_experiment(fingerprint((2.5, 1.6, 1.6), (80, 200, 240), 9), device="cpu", cpu_ram_gb=16)
    else:
        plans = plan_experiment(fingerprint((1.0, 0.768, 0.768), (482, 512, 512), 131), memory_gb=8.0)
    cfg = plans.configurations[name]
    return cases.shrink(cfg, **QUICK[name]) if quick else cfg


def _network(spec: dict):
    """(network in eval mode, configuration, checkpoint or None) of a network spec."""
    import torch

    from autoliver.nets.registry import build_network, net_spec
    if spec.get("model_dir"):
        from autoliver.infer.predictor import load_model

        model = load_model(spec["model_dir"], spec["configuration"], device="cpu", precision="fp32")
        return model.folds[0].network, model.configuration, model.folds[0].checkpoint
    config = planned_configuration(spec["plan"], spec["configuration"], spec["quick"])
    torch.manual_seed(0)
    net = build_network("unet", net_spec(config, 3))
    net.deep_supervision = False
    return net.eval(), config, None


def _factory(engine: str, threads: int):
    from autoliver.infer.engine_backends import OnnxRuntime, OpenVino
    from autoliver.infer.engines import EngineFactory

    name, _, variant = engine.partition(":")
    precision = variant if variant in ("bf16", "fp16") else "fp32"
    runtimes = {"onnxruntime": OnnxRuntime(), "openvino": OpenVino(variant if variant in ("LATENCY", "THROUGHPUT") else "LATENCY")}
    return EngineFactory(name, "cpu", threads=threads, precision=precision, runtimes=runtimes)


def measure_engine(network: dict, engine: str, threads: int, reps: int, case: str | None, out: str, cache_dir: str) -> dict:
    """One (network, engine) in this process: build, cached build, per-call time, whole case (child side)."""
    import torch

    from autoliver.infer.engines import engine_input_shape
    from autoliver.infer.sliding_window import argmax_labels
    from autoliver.infer.volume import predict_volume

    torch.set_num_threads(threads)
    net, config, checkpoint = _network(network)
    shape = engine_input_shape(config)
    builds = []
    for _ in range(2):  # the export (into an empty cache), then the cached load
        t0 = time.perf_counter()
        eng = _factory(engine, threads).build(net, shape, checkpoint, cache_dir=None if checkpoint else cache_dir)
        builds.append(time.perf_counter() - t0)
    if eng.fallback:
        raise RuntimeError(eng.fallback)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    times = []
    with torch.inference_mode():
        logits = eng(x)
        for _ in range(max(1, reps)):
            t0 = time.perf_counter()
            eng(x)
            times.append(time.perf_counter() - t0)
        result = {"engine": eng.name, "entry": str(eng.entry) if eng.entry else None, "input_shape": list(shape),
                  "build_s": builds[0], "cached_build_s": builds[1], "call_s": statistics.median(times), "call_times": times,
                  "patches_per_call": shape[0]}
        labels = None
        if case:
            data = np.load(case)["data"]
            t0 = time.perf_counter()
            probs = predict_volume(eng, data, config, 3, torch.device("cpu"), step=0.5)
            result["case_s"] = time.perf_counter() - t0
            result["case_shape"] = list(data.shape)
            labels = argmax_labels(probs)
    np.savez(out, logits=logits.float().numpy(), **({"labels": labels} if labels is not None else {}))
    return result


def gflop_per_patch(config) -> float:
    """GFLOP of one forward pass of one patch (batch 1), counted on the meta device."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from autoliver.nets.registry import build_network, net_spec

    with torch.device("meta"):
        net = build_network("unet", net_spec(config, 3))
        net.deep_supervision = False
        net.eval()
        x = torch.empty(1, int(config.in_slices), *config.patch_size)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        net(x)
    return counter.get_total_flops() / 1e9


def peak_gflops(threads: int, n: int, reps: int) -> float:
    """Best float32 matmul rate (GFLOP/s) of an n x n product at ``threads`` threads."""
    import torch

    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9


def case_array(ctx, spec: dict, config, shape) -> Path:
    """The case volume of a network (see the module doc), as ``data`` in an .npz under the work folder."""
    from scipy import ndimage

    path = ctx.path("cases") / f"{spec['label']}.npz"
    image, _, geometry = cases.real_case("lits117_128cube", ctx)
    if spec.get("model_dir"):
        from autoliver.infer.predictor import load_model, preprocess_for

        model = load_model(spec["model_dir"], spec["configuration"], device="cpu", precision="fp32")
        data = preprocess_for(model, image, geometry)[config.data_identifier][0]
    else:
        norm = (np.clip(image.astype(np.float32), CT["lo"], CT["hi"]) - CT["mean"]) / CT["std"]
        data = ndimage.zoom(norm, [t / s for t, s in zip(shape, norm.shape)], order=1)
    np.savez(path, data=np.ascontiguousarray(data, dtype=np.float32))
    return path


def network_specs(ctx) -> list[dict]:
    a = ctx.args
    specs = []
    for label in ctx.pick(a.networks, [n for n in a.networks if n != "nnunet_3d"]):  # quick: nnunet_3d shrinks to cpu_3d's size
        n = NETWORKS[label]
        cfg = planned_configuration(n["plan"], n["configuration"], ctx.quick)
        specs.append({"label": label, "plan": n["plan"], "configuration": n["configuration"], "quick": ctx.quick, "_config": cfg,
                      "case_shape": QUICK_CASE if ctx.quick else n["case_shape"]})
    if a.model_dir:
        from autoliver.infer.predictor import load_model

        for c in a.configurations:
            cfg = load_model(a.model_dir, c, device="cpu", precision="fp32").configuration
            specs.append({"label": f"trained_{c}", "model_dir": str(Path(a.model_dir).resolve()), "configuration": c, "_config": cfg})
    return specs


def installed_engines(ctx, engines) -> list[str]:
    from autoliver.infer.engines import runtime_installed

    keep = []
    for e in engines:
        if runtime_installed(e.partition(":")[0]):
            keep.append(e)
        else:
            ctx.note(f"engine {e} skipped: its runtime is not installed (pip install 'autoliver[fast-cpu]')")
    return keep


def agreement(ref: dict, other: dict) -> dict:
    out = {"max |logit diff| vs torch": float(np.max(np.abs(ref["logits"] - other["logits"]))),
           "patch argmax agreement %": 100 * float(np.mean(ref["logits"].argmax(1) == other["logits"].argmax(1)))}
    if "labels" in ref and "labels" in other:
        out["case label agreement %"] = 100 * float(np.mean(ref["labels"] == other["labels"]))
    return out


def run(ctx) -> dict:
    a = ctx.args
    engines = installed_engines(ctx, a.engines if "torch" in a.engines else ["torch", *a.engines])
    peaks = [peak_gflops(ctx.threads, ctx.pick(4096, 1024), ctx.pick(5, 3))]
    rows, details = [], {"networks": {}}
    for spec in network_specs(ctx):
        cfg = spec.pop("_config")
        peaks.append(peak_gflops(ctx.threads, ctx.pick(4096, 1024), ctx.pick(5, 3)))  # again: the load of other jobs moves it
        peak = max(peaks)
        gflop = gflop_per_patch(cfg)
        case = None if a.no_case else str(case_array(ctx, spec, cfg, spec.get("case_shape")))
        child_spec = {k: v for k, v in spec.items() if k != "case_shape"}
        results, arrays = {}, {}
        for engine in engines:
            out = ctx.path("outputs") / f"{spec['label']}_{engine.replace(':', '_')}.npz"
            cache_dir = ctx.path("engine_cache", fresh=True)
            m = measure.run_child("benchmarks.cpu_engines:measure_engine", threads=ctx.threads, poll_s=None, timeout_s=ctx.timeout,
                                  kwargs={"network": child_spec, "engine": engine, "threads": ctx.threads, "reps": ctx.pick(a.reps, 1),
                                          "case": case, "out": str(out), "cache_dir": str(cache_dir)},
                                  log_path=ctx.path("logs") / f"{spec['label']}_{engine.replace(':', '_')}.log")
            if not m["ok"]:
                ctx.note(f"{spec['label']} / {engine} failed: {m['error']}")
                continue
            results[engine] = {**m["value"], "peak_rss": m["peak_rss"]}
            z = np.load(out)
            arrays[engine] = {k: z[k] for k in z.files}
        base = results.get("torch")
        for engine, r in results.items():
            per_patch = r["call_s"] / r["patches_per_call"]
            row = {"network": spec["label"], "engine": engine, "patch": "x".join(map(str, cfg.patch_size)),
                   "s / patch": per_patch, "speed-up vs torch": base["call_s"] / r["call_s"] if base else None,
                   "s / case": r.get("case_s"), "export + check s": r["build_s"], "cached load s": r["cached_build_s"],
                   "peak RSS MiB": measure.mib(r["peak_rss"]), "GFLOP / patch": gflop, "GFLOP/s": gflop / per_patch,
                   "% of peak": 100 * gflop / per_patch / peak}
            if "torch" in arrays and engine != "torch":
                row.update(agreement(arrays["torch"], arrays[engine]))
            rows.append({k: v for k, v in row.items() if v is not None})
        details["peak_gflops_fp32_matmul"] = {"best": peak, "measured": peaks}
        details["networks"][spec["label"]] = {"patch": list(cfg.patch_size), "features": list(cfg.features_per_stage),
                                             "gflop_per_patch": gflop, "results": results}
        ctx.checkpoint({"rows": rows, **details})
    return {"rows": rows, **details, "ok": bool(rows)}
