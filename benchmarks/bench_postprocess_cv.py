"""Model selection and post-processing on a trained workspace's cross-validation.

For the trained configurations of a dataset (every fold complete), prints:

1. every candidate (single configurations and softmax-average ensembles): mean liver and
   tumour Dice (LiTS rule) over the CV cases, and the scoring time;
2. for the chosen candidate, each post-processing step with every parameter set tried: the
   mean liver / tumour Dice before and after, and its runtime per case; separately for all
   cases, the phantoms (``phantom_*``) and the real cases, each decided on its own;
3. the runtime of each label-only step on a LiTS-size label map (512 x 512 x 500 at
   0.8 x 0.8 x 1.0 mm, a liver of ~1.8 l with 30 tumours of 2-40 mm): the cost at full size.

    python benchmarks/bench_postprocess_cv.py --workspace WS -d DATASET [-c CONFIG ...] [--out FILE.json]
        [--no-crf | --crf-sets N] [--crf-subsets all phantoms real] [--skip-lits-size] [--partial -c CONFIG ...]

Writes everything to ``--out`` (default: ``bench_postprocess_cv.json`` in the results folder).
The workspace is read only (no inference_plan.json is written). Timings move with the load.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from autoliver.core.layout import Workspace
from autoliver.postprocess.apply import LABEL_STEPS, apply_label_step, crf_module
from autoliver.selection.cv import discover
from autoliver.selection.decide import decide_postprocessing
from autoliver.selection.ensemble import candidate_sets, choose, rank, ranking_table, score_candidates
from autoliver.selection.select import postprocessing_table


def partial_source(preprocessed_dir: Path, results_dir: Path, configurations: list[str]):
    """A CV source over the folds that every one of ``configurations`` has finished (a
    partial cross-validation, for measuring while training goes on)."""
    import json

    from autoliver.selection.cv import CVSource
    from planning.plans import Plans

    plans = Plans.load(preprocessed_dir / "plans.json")
    splits = json.loads((results_dir / "splits.json").read_text())

    def done(config: str, k: int) -> bool:
        fold = results_dir / config / f"fold_{k}"
        return (fold / "metrics.json").is_file() and all((fold / "validation" / f"{c}.npz").is_file() for c in splits[k]["val"])

    kept = tuple({"train": f["train"], "val": f["val"] if all(done(c, k) for c in configurations) else []} for k, f in enumerate(splits))
    folds = {c: tuple(str(k) for k, f in enumerate(kept) if f["val"]) for c in configurations}
    reference = plans.configurations[configurations[0]].data_identifier
    return CVSource(results_dir.name, preprocessed_dir, results_dir, plans, kept, tuple(configurations), folds, {}, reference)


def subset(source, keep) -> object:
    """The CV source restricted to the validation cases for which ``keep(case)`` is true."""
    splits = tuple({"train": f["train"], "val": [c for c in f["val"] if keep(c)]} for f in source.splits)
    return replace(source, splits=splits)


def lits_size_labels(rng: np.random.Generator, shape=(500, 512, 512), spacing=(1.0, 0.8, 0.8), specks: bool = False) -> np.ndarray:
    """A liver ellipsoid with tumours and a detached liver blob; with ``specks`` also 200 tumour
    voxels scattered over the whole volume (the worst case: every bounding box is the volume)."""
    seg = np.zeros(shape, np.uint8)
    zc, yc, xc = shape[0] // 2, shape[1] // 2, shape[2] // 2
    radii = np.array([90.0, 80.0, 60.0]) / np.array(spacing)  # mm -> voxels (z, y, x)
    lo = [int(c - r) for c, r in zip((zc, yc, xc), radii)]
    hi = [int(c + r) + 1 for c, r in zip((zc, yc, xc), radii)]
    zz, yy, xx = np.ogrid[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
    inside = ((zz - zc) / radii[0]) ** 2 + ((yy - yc) / radii[1]) ** 2 + ((xx - xc) / radii[2]) ** 2 <= 1
    seg[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]][inside] = 1
    for _ in range(30):
        r_mm = rng.uniform(1.0, 20.0)
        c = np.array([zc, yc, xc]) + rng.uniform(-0.6, 0.6, 3) * radii
        r = r_mm / np.array(spacing)
        a = np.maximum(0, (c - r).astype(int))
        b = np.minimum(shape, (c + r).astype(int) + 1)
        z, y, x = np.ogrid[a[0]:b[0], a[1]:b[1], a[2]:b[2]]
        ball = ((z - c[0]) / r[0]) ** 2 + ((y - c[1]) / r[1]) ** 2 + ((x - c[2]) / r[2]) ** 2 <= 1
        seg[a[0]:b[0], a[1]:b[1], a[2]:b[2]][ball] = 2
    seg[40:60, 40:70, 40:70] = 1  # a detached false liver
    if specks:
        at = rng.integers(0, np.array(shape), size=(200, 3))
        seg[at[:, 0], at[:, 1], at[:, 2]] = 2
    return seg


def time_label_steps(repeats: int = 1) -> list[dict]:
    from autoliver.selection.decide import LABEL_GRIDS

    spacing = (1.0, 0.8, 0.8)
    rows = []
    for specks in (False, True):
        seg = lits_size_labels(np.random.default_rng(0), spacing=spacing, specks=specks)
        for name in LABEL_STEPS:
            params = LABEL_GRIDS[name][-1]
            best = min(_timed(lambda: apply_label_step(seg, spacing, name, params)) for _ in range(repeats))
            rows.append({"step": name, "params": params, "shape": list(seg.shape), "scattered_specks": specks, "seconds": best})
    return rows


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workspace", required=True)
    parser.add_argument("-d", "--dataset", required=True, help="dataset name as under results/")
    parser.add_argument("-c", "--configurations", nargs="+")
    parser.add_argument("--out")
    parser.add_argument("--no-crf", action="store_true", help="skip the CRF even when its module exists")
    parser.add_argument("--crf-sets", type=int, help="try only the first N of CRF_PARAM_GRID (the CRF dominates the time)")
    parser.add_argument("--crf-subsets", nargs="+", default=["all", "phantoms", "real"], help="case subsets on which the CRF is tried")
    parser.add_argument("--skip-lits-size", action="store_true")
    parser.add_argument("--partial", action="store_true", help="use only the folds every configuration given with -c has finished")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    ws = Workspace(Path(args.workspace).resolve())
    if args.partial:
        source = partial_source(ws.preprocessed(args.dataset), ws.results(args.dataset), args.configurations)
        print(f"partial cross-validation: folds {', '.join(next(iter(source.folds.values())))} of {len(source.splits)}")
    else:
        source = discover(ws.preprocessed(args.dataset), ws.results(args.dataset), args.configurations)
    for config, message in source.skipped.items():
        print(f"left out {config}: {message}")
    candidates = candidate_sets(source.configurations)
    t0 = time.perf_counter()
    per_candidate = score_candidates(source, candidates, progress=False)
    t_score = time.perf_counter() - t0
    ranking = rank(per_candidate, source.configurations)
    best = choose(ranking)
    print(f"\n{len(source.cases)} CV cases, {len(candidates)} candidates, scored in {t_score:.1f} s ({t_score / len(source.cases):.2f} s/case)")
    print(ranking_table(ranking, best["candidate"]))
    result = {"dataset": args.dataset, "cases": list(source.cases), "ranking": ranking, "chosen": best["candidate"],
              "scoring_seconds": t_score, "postprocessing": {}}
    subsets = {"all": lambda c: True, "phantoms": lambda c: c.startswith("phantom_"), "real": lambda c: not c.startswith("phantom_")}
    crf = crf_module()
    crf_grid = [] if args.no_crf or crf is None else list(crf.CRF_PARAM_GRID)[: args.crf_sets or None]
    for label, keep in subsets.items():
        part = subset(source, keep)
        if not part.cases:
            continue
        t0 = time.perf_counter()
        grid = crf_grid if label in args.crf_subsets else []
        steps, raw = decide_postprocessing(part, best["configurations"], crf_grid=grid, progress=False)
        seconds = time.perf_counter() - t0
        print(f"\npost-processing of {best['candidate']} on {label} ({len(part.cases)} cases; raw liver {raw['liver']:.4f}, "
              f"tumour {raw['tumour']:.4f}; decided in {seconds:.1f} s)")
        print(postprocessing_table(steps))
        for s in steps:
            for v in (s["cv"] or {}).get("variants", []):
                print(f"      {s['name']:<24} {json.dumps(v['params']):<28} liver {v['liver']:.4f}  tumour {v['tumour']:.4f}")
        result["postprocessing"][label] = {"cases": list(part.cases), "raw": raw, "steps": steps, "seconds": seconds}
    if not args.skip_lits_size:
        rows = time_label_steps()
        print("\nlabel-only steps on a 500 x 512 x 512 label map (strongest parameters):")
        for r in rows:
            kind = "+ 200 scattered specks" if r["scattered_specks"] else "liver + tumours"
            print(f"  {r['step']:<24} {json.dumps(r['params']):<28} {kind:<24} {r['seconds']:.2f} s")
        result["lits_size_seconds"] = rows
    out = Path(args.out) if args.out else ws.results(args.dataset) / "bench_postprocess_cv.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
