"""Dense 3D CRF (``autoliver.postprocess.crf.dense_crf``): runtime, peak memory and Dice per case.

Cases, each a liver box + 10 mm (what the CRF sees with roi="liver"): ``phantom_lits``, a
synthetic CT at 1.0 x 0.77 x 0.77 mm (a LiTS-size liver crop, ~150 x 300 x 260 voxels), and the
real ``lits117_128cube`` and ``chaos_ct_sample``. Probabilities are synthetic, from the
reference labels, in two regimes: ``noisy`` (softmax(2 * one-hot + 1.2 * noise smoothed over
1.5 voxels): blobby errors everywhere, a weak model) and ``sharp`` (softmax(6 * one-hot blurred
by 1.5 mm): errors only at the boundaries, a strong model).

Each run is a fresh child process that loads the crop from an .npz, so its peak (VmHWM) minus
its peak after loading is the CRF's own memory. ``--pydensecrf2-python PY`` also runs the crops
through pydensecrf2's DenseCRF (in PY, a Python that has it) with the same kernels. ``--grid``
instead scores every ``CRF_PARAM_GRID`` entry on each case and regime (in this process).
"""

from __future__ import annotations

import resource
import time

import numpy as np

from benchmarks.harness import cases  # also imported by pydensecrf2's Python: numpy only

PARAMS = {"n_iterations": 5, "spatial_sigma_mm": 2.0, "spatial_weight": 1.0, "bilateral_sigma_mm": 10.0,
          "bilateral_sigma_intensity": 0.25, "bilateral_weight": 3.0}  # dense_crf's defaults
# the preprocessing's CT normalisation with LiTS-like foreground statistics
CLIP_HU, LIVER_HU_MEAN, LIVER_HU_STD = (-17.0, 201.0), 99.4, 39.4


def add_arguments(p) -> None:
    p.add_argument("--pydensecrf2-python", help="a Python with pydensecrf2 installed: also run its DenseCRF")
    p.add_argument("--grid", action="store_true", help="instead: Dice of every CRF_PARAM_GRID entry on each case and regime")
    p.add_argument("--seed", type=int, default=0)


def crf_child(npz: str, backend: str, out: str) -> dict:
    """One CRF on a saved crop, in a fresh process (autoliver imported only for 'own'); labels to ``out``."""
    from benchmarks.child import peak_rss_bytes

    d = np.load(npz)
    probs, image, spacing = d["probs"], d["image"], tuple(float(s) for s in d["spacing"])
    if backend == "own":
        from autoliver.postprocess.crf import dense_crf
    else:
        import pydensecrf.densecrf as dcrf
        from pydensecrf.utils import create_pairwise_bilateral, create_pairwise_gaussian
    loaded = peak_rss_bytes()[0]  # interpreter, imports and arrays
    ru = resource.getrusage(resource.RUSAGE_SELF)
    t0, cpu0 = time.perf_counter(), ru.ru_utime + ru.ru_stime
    if backend == "own":
        result = dense_crf(probs, image, spacing, roi=None, **PARAMS)
    else:
        crf = dcrf.DenseCRF(int(np.prod(image.shape)), probs.shape[0])
        crf.setUnaryEnergy(np.ascontiguousarray(-np.log(np.maximum(probs, 1e-6)).reshape(probs.shape[0], -1)))
        crf.addPairwiseEnergy(create_pairwise_gaussian(tuple(PARAMS["spatial_sigma_mm"] / s for s in spacing), image.shape), compat=PARAMS["spatial_weight"])
        crf.addPairwiseEnergy(create_pairwise_bilateral(tuple(PARAMS["bilateral_sigma_mm"] / s for s in spacing), (PARAMS["bilateral_sigma_intensity"],),
                                                        image[..., None], chdim=3), compat=PARAMS["bilateral_weight"])
        result = np.array(crf.inference(PARAMS["n_iterations"])).reshape(probs.shape)
    wall = time.perf_counter() - t0
    ru = resource.getrusage(resource.RUSAGE_SELF)
    np.save(out, result.argmax(0).astype(np.uint8))
    return {"wall_s": wall, "cpu_s": ru.ru_utime + ru.ru_stime - cpu0, "peak_after_load": loaded}


def probabilities(truth: np.ndarray, spacing, regime: str, rng: np.random.Generator) -> np.ndarray:
    from scipy import ndimage

    onehot = np.stack([(truth == c) for c in range(3)]).astype(np.float32)
    if regime == "noisy":
        noise = rng.standard_normal(onehot.shape, dtype=np.float32)
        for c in range(3):
            noise[c] = ndimage.gaussian_filter(noise[c], 1.5)
        logits = 2.0 * onehot + 1.2 * noise / noise.std()
    else:
        logits = 6.0 * np.stack([ndimage.gaussian_filter(o, tuple(1.5 / s for s in spacing)) for o in onehot])
    logits = np.exp(logits - logits.max(0))
    return logits / logits.sum(0)


def crops(ctx, rng: np.random.Generator):
    """(name, regime, normalised image, labels, spacing, probabilities) of every case and regime."""
    shape, spacing = ctx.pick((220, 512, 512), (32, 64, 64)), ctx.pick(cases.LITS_SPACING, (6.0, 4.5, 4.5))
    data = {"phantom_lits": cases.phantom(shape, spacing, rng)}
    for name in ctx.pick(("lits117_128cube", "chaos_ct_sample"), ()):
        data[name] = cases.real_case(name, ctx)
    for name, (img, lab, geo) in data.items():
        sp = tuple(float(s) for s in geo.spacing)
        idx = np.argwhere(lab >= 1)
        grow = [int(np.ceil(10.0 / s)) for s in sp]
        box = tuple(slice(max(0, a - g), min(n, b + g)) for a, b, g, n in zip(idx.min(0), idx.max(0) + 1, grow, lab.shape))
        image = (np.clip(img[box].astype(np.float32), *CLIP_HU) - LIVER_HU_MEAN) / LIVER_HU_STD
        for regime in ("noisy", "sharp"):
            yield name, regime, image, lab[box], sp, probabilities(lab[box], sp, regime, rng)


def run(ctx) -> dict:
    from autoliver.evaluate.overlap import case_dice
    from benchmarks.harness import measure

    a = ctx.args
    rng = np.random.default_rng(a.seed)
    if a.grid:
        return grid_scores(ctx, rng)
    backends = [("own", None), *([("pydensecrf2", a.pydensecrf2_python)] if a.pydensecrf2_python and not ctx.quick else [])]
    rows = []
    for name, regime, image, truth, spacing, probs in crops(ctx, rng):
        npz = ctx.workdir / f"{name}_{regime}.npz"
        np.savez(npz, probs=probs, image=image, spacing=np.asarray(spacing))
        before = case_dice(probs.argmax(0).astype(np.uint8), truth)
        for backend, python in backends:
            out = ctx.workdir / f"{name}_{regime}_{backend}.npy"
            m = measure.run_child("benchmarks.crf:crf_child", kwargs={"npz": str(npz), "backend": backend, "out": str(out)}, python=python,
                                  threads=ctx.threads, poll_s=None, timeout_s=ctx.timeout, log_path=ctx.workdir / f"{name}_{regime}_{backend}.log")
            r = m["value"] or {}
            after = case_dice(np.load(out), truth) if m["ok"] else {"liver": None, "tumour": None}
            rows.append({"case": name, "regime": regime, "backend": backend, "shape": list(truth.shape), "ok": m["ok"], "seconds": r.get("wall_s"),
                         "CPU seconds": r.get("cpu_s"), "CRF's own peak (MiB)": measure.mib(m["peak_rss"] - r["peak_after_load"]) if r else None,
                         "process peak (MiB)": measure.mib(m["peak_rss"]), "liver Dice before": before["liver"], "liver Dice after": after["liver"],
                         "tumour Dice before": before["tumour"], "tumour Dice after": after["tumour"]})
            ctx.checkpoint({"rows": rows})
    return {"rows": rows, "params": PARAMS, "ok": all(r["ok"] for r in rows)}


def grid_scores(ctx, rng) -> dict:
    from autoliver.evaluate.overlap import case_dice
    from autoliver.postprocess.crf import CRF_PARAM_GRID, dense_crf

    rows = []
    for name, regime, image, truth, spacing, probs in crops(ctx, rng):
        before = case_dice(probs.argmax(0).astype(np.uint8), truth)
        for i, params in enumerate(CRF_PARAM_GRID[: ctx.pick(None, 1)]):
            t0 = time.perf_counter()
            after = case_dice(dense_crf(probs, image, spacing, roi=None, **params).argmax(0).astype(np.uint8), truth)
            rows.append({"case": name, "regime": regime, "grid index": i, "params": str(params), "seconds": time.perf_counter() - t0,
                         "liver Dice before": before["liver"], "liver Dice after": after["liver"],
                         "tumour Dice before": before["tumour"], "tumour Dice after": after["tumour"]})
    return {"rows": rows}
