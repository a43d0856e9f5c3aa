"""Dense 3D CRF (autoliver.postprocess.crf.dense_crf): runtime, peak memory and Dice per case.

Cases (each a liver box + margin, as the CRF sees it with roi="liver"):

- ``phantom_lits``: a synthetic CT (autoliver.examples.phantom) at 1.0 x 0.77 x 0.77 mm, cropped to
  the liver's bounding box + 10 mm: a LiTS-size liver crop (~150 x 300 x 260 voxels);
- ``lits117_128cube``, ``chaos_ct_sample``: the real CT examples shipped with autoliver.

Probabilities are synthetic, derived from the reference labels, in two regimes:

- ``noisy``: softmax(2 * one-hot + 1.2 * noise), noise Gaussian-smoothed over 1.5 voxels
  (blobby errors everywhere, a weak model);
- ``sharp``: softmax(6 * one-hot blurred by 1.5 mm) (a confident model whose only errors
  are at the boundaries: where a strong CNN is).

Each run happens in a fresh child process that loads the crop from a temporary .npy, so
the reported peak RSS (VmHWM) minus the peak after loading is the CRF's own memory.
``--pydensecrf2-python PATH`` also runs the same crops through pydensecrf2's DenseCRF (a
Python that has it installed) with the same kernels, for comparison.

    python benchmarks/bench_crf.py --out crf_bench.json [--quick] [--pydensecrf2-python PY]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

PARAMS = {"n_iterations": 5, "spatial_sigma_mm": 2.0, "spatial_weight": 1.0, "bilateral_sigma_mm": 10.0,
          "bilateral_sigma_intensity": 0.25, "bilateral_weight": 3.0}  # dense_crf's defaults
# the preprocessing's CT normalisation with LiTS-like foreground statistics (clip to the
# 0.5 / 99.5 % foreground percentiles, z-score with the foreground mean and std)
CLIP_HU, LIVER_HU_MEAN, LIVER_HU_STD = (-17.0, 201.0), 99.4, 39.4
C = 3


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    s = np.count_nonzero(a) + np.count_nonzero(b)
    return 1.0 if s == 0 else 2.0 * np.count_nonzero(a & b) / s


def _scores(labels: np.ndarray, truth: np.ndarray) -> dict:
    return {"liver": _dice(labels >= 1, truth >= 1), "tumour": _dice(labels == 2, truth == 2)}


def _peak_rss() -> int:
    """Peak resident memory of this process image in bytes: VmHWM (reset by exec, unlike
    ru_maxrss, which a child inherits from the parent it was forked from) where Linux has it."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def child(npz: str, backend: str) -> None:
    """Run one CRF on a saved crop; print one JSON line. Imports autoliver only for 'own'."""
    d = np.load(npz)
    probs, image, truth, spacing = d["probs"], d["image"], d["truth"], tuple(float(s) for s in d["spacing"])
    if backend == "own":
        from autoliver.postprocess.crf import dense_crf
    else:
        import pydensecrf.densecrf as dcrf
        from pydensecrf.utils import create_pairwise_bilateral, create_pairwise_gaussian
    rss0 = _peak_rss()  # the peak so far: interpreter, imports and loaded arrays
    ru = resource.getrusage(resource.RUSAGE_SELF)
    cpu0 = ru.ru_utime + ru.ru_stime
    t0 = time.perf_counter()
    if backend == "own":
        out = dense_crf(probs, image, spacing, roi=None, **PARAMS)
    else:
        crf = dcrf.DenseCRF(int(np.prod(image.shape)), probs.shape[0])
        crf.setUnaryEnergy(np.ascontiguousarray(-np.log(np.maximum(probs, 1e-6)).reshape(probs.shape[0], -1)))
        crf.addPairwiseEnergy(create_pairwise_gaussian(tuple(PARAMS["spatial_sigma_mm"] / s for s in spacing), image.shape),
                              compat=PARAMS["spatial_weight"])
        feats = create_pairwise_bilateral(tuple(PARAMS["bilateral_sigma_mm"] / s for s in spacing),
                                          (PARAMS["bilateral_sigma_intensity"],), image[..., None], chdim=3)
        crf.addPairwiseEnergy(feats, compat=PARAMS["bilateral_weight"])
        out = np.array(crf.inference(PARAMS["n_iterations"])).reshape(probs.shape)
    wall = time.perf_counter() - t0
    ru = resource.getrusage(resource.RUSAGE_SELF)
    cpu = ru.ru_utime + ru.ru_stime - cpu0
    peak = _peak_rss()
    print(json.dumps({"wall_s": wall, "cpu_s": cpu, "peak_extra_mb": (peak - rss0) / 2**20, "peak_rss_mb": peak / 2**20,
                      "after": _scores(out.argmax(0), truth)}))


def _probabilities(truth: np.ndarray, spacing, regime: str, rng: np.random.Generator) -> np.ndarray:
    from scipy import ndimage

    onehot = np.stack([(truth == c) for c in range(C)]).astype(np.float32)
    if regime == "noisy":
        noise = rng.standard_normal(onehot.shape, dtype=np.float32)
        for c in range(C):
            noise[c] = ndimage.gaussian_filter(noise[c], 1.5)
        noise /= noise.std()
        logits = 2.0 * onehot + 1.2 * noise
    else:
        sigma = tuple(1.5 / s for s in spacing)
        logits = 6.0 * np.stack([ndimage.gaussian_filter(o, sigma) for o in onehot])
    logits -= logits.max(0)
    np.exp(logits, out=logits)
    logits /= logits.sum(0)
    return logits


def _crop_liver(image: np.ndarray, truth: np.ndarray, spacing, margin_mm: float = 10.0):
    idx = np.argwhere(truth >= 1)
    lo, hi = idx.min(0), idx.max(0) + 1
    grow = [int(np.ceil(margin_mm / s)) for s in spacing]
    box = tuple(slice(max(0, a - g), min(n, b + g)) for a, b, g, n in zip(lo, hi, grow, truth.shape))
    return image[box], truth[box]


def load_cases(quick: bool, rng: np.random.Generator) -> dict:
    from autoliver import examples
    from autoliver.examples.phantom import make_phantom
    from autoliver.io.images import read_image

    cases = {}
    shape = (120, 256, 256) if quick else (220, 512, 512)
    spacing = (1.0, 0.77, 0.77) if not quick else (2.0, 1.5, 1.5)
    img, lab = make_phantom(shape, spacing, rng, n_tumours=3)
    cases["phantom_lits"] = (*_crop_liver(img, lab, spacing), spacing)
    for name in ("lits117_128cube", "chaos_ct_sample"):
        img, geo = read_image(examples.image_path(name))
        lab, _ = read_image(examples.label_path(name))
        sp = tuple(float(s) for s in geo.spacing)
        cases[name] = (*_crop_liver(img, np.asarray(lab, np.uint8), sp), sp)
    return cases


def _cases_with_probabilities(quick: bool, rng: np.random.Generator):
    for name, (img, truth, spacing) in load_cases(quick, rng).items():
        image = (np.clip(img.astype(np.float32), *CLIP_HU) - LIVER_HU_MEAN) / LIVER_HU_STD
        for regime in ("noisy", "sharp"):
            yield name, regime, image, truth, spacing, _probabilities(truth, spacing, regime, rng)


def grid_scores(args: argparse.Namespace, rng: np.random.Generator) -> None:
    from autoliver.postprocess.crf import CRF_PARAM_GRID, dense_crf

    rows = []
    for name, regime, image, truth, spacing, probs in _cases_with_probabilities(args.quick, rng):
        before = _scores(probs.argmax(0), truth)
        for i, params in enumerate(CRF_PARAM_GRID):
            t0 = time.perf_counter()
            after = _scores(dense_crf(probs, image, spacing, roi=None, **params).argmax(0), truth)
            rows.append({"case": name, "regime": regime, "grid_index": i, "params": params, "before": before,
                         "after": after, "wall_s": time.perf_counter() - t0})
            print(f"{name:16s} {regime:5s} grid[{i}]  liver {before['liver']:.4f} -> {after['liver']:.4f}  "
                  f"tumour {before['tumour']:.4f} -> {after['tumour']:.4f}", flush=True)
    args.out.write_text(json.dumps({"seed": args.seed, "quick": args.quick, "grid": rows}, indent=1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("crf_bench.json"))
    ap.add_argument("--quick", action="store_true", help="a small phantom instead of the LiTS-size one")
    ap.add_argument("--pydensecrf2-python", default=None, help="a Python with pydensecrf2 installed")
    ap.add_argument("--grid", action="store_true",
                    help="instead: Dice of every CRF_PARAM_GRID entry on each case and regime (in-process)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--child", nargs=2, metavar=("NPZ", "BACKEND"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(*args.child)
        return
    rng = np.random.default_rng(args.seed)
    if args.grid:
        grid_scores(args, rng)
        return
    backends = [("own", sys.executable)] + ([("pydensecrf2", args.pydensecrf2_python)] if args.pydensecrf2_python else [])
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, regime, image, truth, spacing, probs in _cases_with_probabilities(args.quick, rng):
            npz = Path(tmp) / f"{name}_{regime}.npz"
            np.savez(npz, probs=probs, image=image, truth=truth, spacing=np.asarray(spacing))
            before = _scores(probs.argmax(0), truth)
            for backend, python in backends:
                res = subprocess.run([python, __file__, "--child", str(npz), backend],
                                     capture_output=True, text=True, check=True)
                r = json.loads(res.stdout.strip().splitlines()[-1])
                rows.append({"case": name, "regime": regime, "backend": backend, "shape": list(truth.shape),
                             "spacing": list(spacing), "voxels": int(truth.size), "before": before, **r})
                print(f"{name:16s} {regime:5s} {backend:11s} {'x'.join(map(str, truth.shape)):>12s} "
                      f"{r['wall_s']:7.1f} s {r['cpu_s']:7.1f} cpu-s {r['peak_extra_mb']:7.0f} MB  liver {before['liver']:.4f} -> "
                      f"{r['after']['liver']:.4f}  tumour {before['tumour']:.4f} -> {r['after']['tumour']:.4f}",
                      flush=True)
    args.out.write_text(json.dumps({"params": PARAMS, "seed": args.seed, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
