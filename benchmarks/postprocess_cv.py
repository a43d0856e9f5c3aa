"""Model selection and post-processing on a trained workspace's cross-validation.

For the trained configurations of a dataset (every fold complete; ``--partial``: the folds every
configuration given has finished):

1. every candidate (single configurations and softmax-average ensembles): mean liver and tumour
   Dice (LiTS rule) over the CV cases, and the scoring time;
2. for the chosen candidate, each post-processing step with every parameter set tried: mean
   liver / tumour Dice before and after and the runtime per case; for all cases, the phantoms
   (``phantom_*``) and the real cases, each decided on its own;
3. the runtime of each label-only step on a LiTS-size label map (500 x 512 x 512 at
   1.0 x 0.8 x 0.8 mm, a liver of ~1.8 l with 30 tumours of 2-40 mm; also with 200 tumour
   voxels scattered over the volume, the worst case): the cost at full size.

The workspace is only read (no inference_plan.json is written). ``--quick`` trains a tiny
2-fold 2d cross-validation instead (cached).
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from benchmarks.harness import cache, cases


def add_arguments(p) -> None:
    p.add_argument("--workspace", type=Path, help="trained workspace (required unless --quick)")
    p.add_argument("-d", "--dataset", help="dataset name as under results/")
    p.add_argument("-c", "--configurations", nargs="+")
    p.add_argument("--no-crf", action="store_true", help="skip the CRF even when its module exists")
    p.add_argument("--crf-sets", type=int, help="try only the first N of CRF_PARAM_GRID (the CRF dominates the time)")
    p.add_argument("--crf-subsets", nargs="+", default=["all", "phantoms", "real"], help="case subsets on which the CRF is tried")
    p.add_argument("--skip-lits-size", action="store_true")
    p.add_argument("--partial", action="store_true", help="use only the folds every configuration given with -c has finished")


def partial_source(preprocessed_dir: Path, results_dir: Path, configurations: list[str]):
    """A CV source over the folds that every one of ``configurations`` has finished."""
    from autoliver.core.layout import ModelPaths
    from autoliver.selection.cv import CVSource
    from planning.plans import Plans

    plans = Plans.load(preprocessed_dir / "plans.json")
    splits = json.loads((results_dir / "splits.json").read_text())

    def done(config: str, k: int) -> bool:
        fold = ModelPaths(results_dir).fold(config, k)
        return fold.metrics.is_file() and all(fold.validation_case(c, ".npz").is_file() for c in splits[k]["val"])

    kept = tuple({"train": f["train"], "val": f["val"] if all(done(c, k) for c in configurations) else []} for k, f in enumerate(splits))
    folds = {c: tuple(str(k) for k, f in enumerate(kept) if f["val"]) for c in configurations}
    reference = plans.configurations[configurations[0]].data_identifier
    return CVSource(results_dir.name, preprocessed_dir, results_dir, plans, kept, tuple(configurations), folds, {}, reference)


def lits_size_labels(rng: np.random.Generator, shape=(500, 512, 512), spacing=(1.0, 0.8, 0.8), specks: bool = False) -> np.ndarray:
    """A liver ellipsoid with 30 tumours and a detached liver blob; ``specks``: also 200 scattered tumour voxels."""
    seg = np.zeros(shape, np.uint8)
    centre, radii = np.array(shape) // 2, np.array([90.0, 80.0, 60.0]) / np.array(spacing)  # mm -> voxels

    def ball(c, r, value):
        lo, hi = np.maximum(0, (c - r).astype(int)), np.minimum(shape, (c + r).astype(int) + 1)
        z, y, x = np.ogrid[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
        seg[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]][((z - c[0]) / r[0]) ** 2 + ((y - c[1]) / r[1]) ** 2 + ((x - c[2]) / r[2]) ** 2 <= 1] = value

    ball(centre, radii, 1)
    for _ in range(30):
        r_mm = rng.uniform(1.0, 20.0)
        ball(centre + rng.uniform(-0.6, 0.6, 3) * radii, r_mm / np.array(spacing), 2)
    seg[40:60, 40:70, 40:70] = 1  # a detached false liver
    if specks:
        at = rng.integers(0, np.array(shape), size=(200, 3))
        seg[at[:, 0], at[:, 1], at[:, 2]] = 2
    return seg


def tiny_cv(ctx) -> Path:
    """A workspace with a 2-fold cross-validation of the tiny 2d model (cached)."""
    src = cases.tiny_workspace(ctx)

    def build(folder: Path) -> None:
        import shutil

        from autoliver.preprocess.storage import list_cases

        shutil.copytree(src / "preprocessed", folder / "preprocessed")
        ids = sorted(list_cases(folder / "preprocessed" / cases.TINY_DATASET / "fullres"))
        splits = folder / "splits.json"
        splits.write_text(json.dumps([{"train": ids[k::2], "val": ids[1 - k::2]} for k in (0, 1)]))
        for k in (0, 1):
            cases.train_tiny(folder, cases.TINY_DATASET, "2d", fold=k, threads=ctx.threads, splits=splits, validation=True)

    return cache.entry(ctx, "tiny_cv", {"workspace": src.name}, build)


def run(ctx) -> dict:
    from autoliver.core.layout import Workspace
    from autoliver.postprocess.apply import LABEL_STEPS, apply_label_step, crf_module
    from autoliver.selection.cv import discover
    from autoliver.selection.decide import LABEL_GRIDS, decide_postprocessing
    from autoliver.selection.ensemble import candidate_sets, choose, rank, score_candidates

    a = ctx.args
    if ctx.quick:
        ws, dataset, configs = Workspace(tiny_cv(ctx)), cases.TINY_DATASET, ["2d"]
    elif a.workspace and a.dataset:
        ws, dataset, configs = Workspace(a.workspace.resolve()), a.dataset, a.configurations
    else:
        raise SystemExit("postprocess_cv needs --workspace WS -d DATASET (a trained cross-validation), or --quick")
    if a.partial:
        source = partial_source(ws.preprocessed(dataset), ws.results(dataset), configs)
    else:
        source = discover(ws.preprocessed(dataset), ws.results(dataset), configs)
    for config, message in source.skipped.items():
        ctx.note(f"left out {config}: {message}")
    candidates = candidate_sets(source.configurations)
    t0 = time.perf_counter()
    ranking = rank(score_candidates(source, candidates, progress=False), source.configurations)
    t_score = time.perf_counter() - t0
    best = choose(ranking)
    rows = [{"table": f"candidates ({len(source.cases)} CV cases, scored in {t_score:.1f} s)", "candidate": r["candidate"],
             "liver Dice": r["liver"], "tumour Dice": r["tumour"], "score": r["score"], "chosen": r["candidate"] == best["candidate"]} for r in ranking]
    subsets = {"all": lambda c: True, "phantoms": lambda c: c.startswith("phantom_"), "real": lambda c: not c.startswith("phantom_")}
    crf = crf_module()
    crf_grid = [] if a.no_crf or crf is None else list(crf.CRF_PARAM_GRID)[: ctx.pick(a.crf_sets, 1) or None]
    post = {}
    for label, keep in list(subsets.items())[: ctx.pick(None, 1)]:
        part = replace(source, splits=tuple({"train": f["train"], "val": [c for c in f["val"] if keep(c)]} for f in source.splits))
        if not part.cases:
            continue
        t0 = time.perf_counter()
        steps, raw = decide_postprocessing(part, best["configurations"], crf_grid=crf_grid if label in a.crf_subsets else [], progress=False)
        post[label] = {"cases": list(part.cases), "raw": raw, "steps": [s.to_json() for s in steps], "seconds": time.perf_counter() - t0}
        table = f"post-processing of {best['candidate']} on {label} ({len(part.cases)} cases)"
        for s in steps:
            cv = s.evidence.get("cv")
            if not cv:
                rows.append({"table": table, "step": s.name, "params": s.evidence.get("note", "n/a")})
            for v in (cv or {}).get("variants", []):
                chosen = v["params"] == dict(s.params)
                rows.append({"table": table, "step": s.name, "params": json.dumps(v["params"]), "chosen": chosen, "applied": chosen and s.enabled,
                             "liver Dice before": cv["before"]["liver"], "liver Dice after": v["liver"], "tumour Dice before": cv["before"]["tumour"],
                             "tumour Dice after": v["tumour"], **({"seconds per case": cv.get("seconds_per_case")} if chosen else {})})
    if not a.skip_lits_size:
        shape = ctx.pick((500, 512, 512), (100, 128, 128))
        for specks in (False, True):
            seg = lits_size_labels(np.random.default_rng(0), shape=shape, specks=specks)
            for name in LABEL_STEPS:
                t0 = time.perf_counter()
                apply_label_step(seg, (1.0, 0.8, 0.8), name, LABEL_GRIDS[name][-1])
                rows.append({"table": f"label-only steps on a {' x '.join(map(str, shape))} label map (strongest parameters)", "step": name,
                             "params": json.dumps(LABEL_GRIDS[name][-1]), "labels": "+ 200 scattered specks" if specks else "liver + tumours",
                             "seconds": time.perf_counter() - t0})
    return {"rows": rows, "dataset": dataset, "cases": list(source.cases), "ranking": ranking, "chosen": best["candidate"], "postprocessing": post}
