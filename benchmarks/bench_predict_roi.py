"""ROI-first inference against whole-volume inference: seconds per case and Dice.

For each case (real CT shipped in autoliver.examples, and LiTS-size phantoms: 512 x 512 x
``--slices`` at 1.0 x 0.77 x 0.77 mm from autoliver.examples.phantom, seeds unlike the training
phantoms') and each configuration, ``predict_case`` runs with the ROI on and off (TTA on,
step 0.5) and the label map is scored against the reference (liver = labels 1 + 2, tumour =
label 2, LiTS rule for empty masks). With ``--memory``, each configuration also predicts a
512 x 512 x ``--memory-slices`` phantom through ``autoliver predict`` in a subprocess (ROI on,
and with --save-probabilities) while its peak RSS is polled.

    python benchmarks/bench_predict_roi.py -m WORKSPACE/results/DATASET -c 2d 3d_fullres \
        --out roi.json [--memory]

Writes JSON (``--out``) and prints a table. Timings are wall-clock on this machine with
whatever else runs on it: note the load.

Measured (models: 2d and 3d_fullres trained 2 and 3 minutes on one H100 on the 9 cases of
``autoliver example_dataset --phantoms 4``, fold ``all``, with the CPU plan's networks
narrowed to 16..256 features; the real cases were training cases, the LiTS-size phantoms
(512 x 512 x 400, 1.0 x 0.77 x 0.77 mm) were not). Fullres grid 2.5 x 1.6 x 1.6 mm; ROI
margin 20 mm; step 0.5. Dice liver / tumour, ROI off / on.

The ROI pass runs exactly the whole volume's tiles that reach into the box, so inside the box
the result is the whole-volume result (voxel agreement 1.0 for 2d; the rest of the grid is
background instead of scattered false positives).

H100 host (16 cores), float16 autocast, TTA on; seconds per case including preprocessing
and export (each about 0.3-1.5 s on a LiTS-size case):

==========  ======================  =====  =====  =====  =====  ===============  ===============
config      case                    off s  on s   ROI %  x      liver Dice       tumour Dice
==========  ======================  =====  =====  =====  =====  ===============  ===============
2d          lits117_128cube          0.3    0.3   100    0.97   0.9515 / 0.9515  0.8493 / 0.8493
2d          totalseg_example_ct_sm   0.8    0.8    62    0.94   0.9562 / 0.9562  1.0 / 1.0
2d          lits_phantom_0           3.3    2.3    34    1.44   0.9885 / 0.9885  0.9481 / 0.9481
2d          lits_phantom_1           2.6    1.9    34    1.38   0.9890 / 0.9890  0.9661 / 0.9661
3d_fullres  lits117_128cube          0.2    0.3   100    0.86   0.9453 / 0.9453  0.8150 / 0.8150
3d_fullres  totalseg_example_ct_sm   1.3    1.2    53    1.02   0.8699 / 0.9214  0.0 / 0.0
3d_fullres  lits_phantom_0           6.1    6.4    67    0.95   0.6089 / 0.6855  0.9172 / 0.9172
3d_fullres  lits_phantom_1           5.5    6.7    77    0.83   0.7018 / 0.7023  0.9130 / 0.9130
==========  ======================  =====  =====  =====  =====  ===============  ===============

CPU, 2 threads of that host (float32; TTA off to keep it short: with TTA the accurate pass
costs 4x (2d) / 8x (3d) more and the coarse pass the same, so the ROI gains more):

==========  ======================  =====  =====  =====  =====  ===============  =================================
config      case                    off s  on s   ROI %  x      liver Dice       network s off -> coarse + on
==========  ======================  =====  =====  =====  =====  ===============  =================================
2d          totalseg_example_ct_sm   4.0    4.1    62    0.98   0.9533 / 0.9534  3.65 -> 0.95 + 2.84
2d          lits_phantom_0           9.0    6.8    34    1.33   0.9875 / 0.9875  6.81 -> 2.05 + 3.31
3d_fullres  totalseg_example_ct_sm   8.0   11.3    53    0.71   0.8629 / 0.9201  7.60 -> 3.91 + 7.17
3d_fullres  lits_phantom_0          31.4   42.0    67    0.75   0.5933 / 0.6546  27.8 -> 9.38 + 29.9
==========  ======================  =====  =====  =====  =====  ===============  =================================

The ROI never costs accuracy here (identical inside the box; liver Dice up where the network
had false positives far from the liver). It pays when the liver's box is a small part of the
grid (2d: 34 %: 1.3-1.45x per case, 2x in the network); with this weakly trained 3d model the
coarse pass finds liver-like false positives, the box covers 67-77 % of the grid and nearly
every tile still reaches into it, so the coarse pass is a loss (up to 25 % without TTA, 5-17 %
with it). On this 2-core development machine, under a load average of 11-14 from other jobs,
the 2d model took 79-94 s for lits117_128cube with TTA whatever the ROI (the box is the whole
grid there).

Peak RSS of ``autoliver predict`` on a 512 x 512 x 600 phantom (1.0 x 0.77 x 0.77 mm, an
uncompressed NIfTI of 315 MB), CPU, ROI on (``--memory``, TTA off: TTA does not change the
memory): 2d 1.41 GiB, 2d with --save-probabilities (a 943 MB float16 result) 1.53 GiB,
3d_fullres 1.57 GiB.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from autoliver import examples
from autoliver.evaluate.overlap import case_dice
from autoliver.examples.dataset import phantom_geometry
from autoliver.examples.phantom import make_phantom
from autoliver.infer.pipeline import predict_case
from autoliver.infer.predictor import load_model
from autoliver.io.images import Geometry, read_image, write_image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _measure import measure_command  # noqa: E402

LITS_SPACING = (1.0, 0.77, 0.77)
REAL_CASES = ("lits117_128cube", "chaos_ct_sample", "totalseg_example_ct_sm")


def lits_phantom(slices: int, seed: int) -> tuple[np.ndarray, np.ndarray, Geometry]:
    image, label = make_phantom((slices, 512, 512), LITS_SPACING, np.random.default_rng(seed), n_tumours=3)
    geometry = phantom_geometry((slices, 512, 512), LITS_SPACING)
    return image, label, geometry


def real_cases(names, cache: Path | None) -> dict:
    """The shipped real cases; ``cache``: an npz to read them from / write them to (machines
    without an image reader)."""
    if cache is not None and cache.is_file():
        z = np.load(cache)
        return {n: (z[f"{n}/image"], z[f"{n}/label"], Geometry.from_json(json.loads(str(z[f"{n}/geometry"])))) for n in names}
    out = {}
    for name in names:
        image, geometry = read_image(examples.image_path(name))
        label, _ = read_image(examples.label_path(name), dtype=np.uint8)
        out[name] = (image, label, geometry)
    if cache is not None:
        np.savez_compressed(cache, **{f"{n}/{k}": v for n, (im, lab, g) in out.items()
                                      for k, v in (("image", im), ("label", lab), ("geometry", json.dumps(g.to_json())))})
    return out


def cases(args) -> dict:
    out = real_cases(args.real, args.cache)
    for k in range(args.phantoms):
        out[f"lits_phantom_{k}"] = lits_phantom(args.slices, 1000 + k)
    return out


def measure(model, image, label, geometry, roi: bool, tta: bool = True) -> dict:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    pred = predict_case(model, image, geometry, tta=tta, step=0.5, roi=roi)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    return {"seconds": round(seconds, 2), "timings": {k: round(v, 2) for k, v in pred.timings.items()},
            "dice": {k: round(v, 4) for k, v in case_dice(pred.seg, label).items()},
            "roi": pred.info["roi"], "seg": pred.seg}


def peak_rss(command: list[str], log_path: Path) -> dict:
    """Run ``command``; its process tree's peak memory (benchmarks/_measure.py, polled every 50 ms)."""
    m = measure_command(command, log_path=log_path, poll_s=0.05)
    return {"peak_rss_gib": round(m.peak_tree_rss / 2**30, 3), "peak_single_rss_gib": round(m.peak_single_rss / 2**30, 3),
            "seconds": round(m.wall_s, 1), "rc": m.returncode}


def memory_runs(args) -> dict:
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        image, _, geometry = lits_phantom(args.memory_slices, 7)
        src = Path(tmp) / "big_0000.nii"
        write_image(src, image, geometry)
        del image
        for config in args.configurations:
            for extra in ([], ["--save-probabilities"]):
                out = Path(tmp) / f"out_{config}_{len(extra)}"
                cmd = [sys.executable, "-m", "autoliver.cli", "predict", "-i", str(src), "-o", str(out), "-m", str(args.model_dir),
                       "-c", config, "--device", "cpu", "--no-progress", *(["--no-tta"] if args.no_tta else []), *extra]
                key = f"{config}{' +probabilities' if extra else ''}"
                results[key] = peak_rss(cmd, Path(tmp) / f"log_{config}_{len(extra)}.txt")
                print(f"memory {key}: {results[key]['peak_rss_gib']} GiB peak RSS, {results[key]['seconds']} s", flush=True)
    return results


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-m", "--model-dir", required=True, type=Path)
    ap.add_argument("-c", "--configurations", nargs="+", default=["2d", "3d_fullres"])
    ap.add_argument("--real", nargs="*", default=list(REAL_CASES))
    ap.add_argument("--phantoms", type=int, default=1)
    ap.add_argument("--slices", type=int, default=400)
    ap.add_argument("--memory", action="store_true")
    ap.add_argument("--memory-slices", type=int, default=600)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--no-tta", action="store_true", help="mirroring TTA off (default: on)")
    ap.add_argument("--cache", type=Path, help="npz of the real cases (read if present, else written)")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    tta = not args.no_tta
    device = torch.cuda.get_device_name(0) if args.device == "cuda" else f"cpu x{os.cpu_count()}"
    report = {"machine": {"device": device, "load_avg_start": os.getloadavg(), "torch_threads": torch.get_num_threads()},
              "settings": {"tta": tta, "step": 0.5, "margin_mm": 20.0, "precision": args.precision}, "cases": {}}
    data = cases(args)
    for config in args.configurations:
        model = load_model(args.model_dir, config, device=args.device, precision=args.precision)
        if args.device == "cuda":  # warm-up (kernels, allocator)
            predict_case(model, *(lambda t: (t[0][:64, :128, :128].copy(), Geometry((64, 128, 128), t[2].spacing, t[2].origin, t[2].direction)))(next(iter(data.values()))), tta=False, roi=False)
        for name, (image, label, geometry) in data.items():
            off = measure(model, image, label, geometry, roi=False, tta=tta)
            on = measure(model, image, label, geometry, roi=True, tta=tta)
            agree = float(np.mean(off.pop("seg") == on.pop("seg")))
            row = {"shape": list(geometry.shape), "spacing": list(geometry.spacing), "roi_off": off, "roi_on": on,
                   "speedup": round(off["seconds"] / on["seconds"], 2), "voxel_agreement": round(agree, 6)}
            report["cases"].setdefault(config, {})[name] = row
            print(f"{config:11s} {name:24s} off {off['seconds']:7.1f} s liver {off['dice']['liver']:.4f} tumour {off['dice']['tumour']:.4f} | "
                  f"on {on['seconds']:7.1f} s liver {on['dice']['liver']:.4f} tumour {on['dice']['tumour']:.4f} "
                  f"(ROI {100 * (on['roi'] or {}).get('fraction', 1):.0f}% of the grid) x{row['speedup']}", flush=True)
            args.out.write_text(json.dumps(report, indent=2))
    if args.memory:
        report["memory"] = memory_runs(args)
    report["machine"]["load_avg_end"] = os.getloadavg()
    args.out.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
