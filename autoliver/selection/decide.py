"""Greedy post-processing decisions on the chosen candidate's cross-validation predictions.

Steps are tried in order: ``dense_crf`` (when ``autoliver.postprocess.crf`` exists; its
``CRF_PARAM_GRID``), then the label-only steps with the parameter grids below. For each step
every parameter set is applied to the current predictions of all cases; the step is enabled
with the best parameter set (highest score, the first in grid order on a tie) that lowers
neither the mean liver nor the mean tumour Dice and raises at least one. Enabled steps change
the predictions the next step starts from. Grids go from the mildest setting to the
strongest, so ties keep the mildest.

The label maps of all cases are kept in memory blosc2-compressed (a label map compresses
about a thousandfold); probabilities are streamed one case at a time.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence

import blosc2
import numpy as np
from tqdm import tqdm

from autoliver.core.artefacts import CRF_STEP, PostprocessStep
from autoliver.evaluate.overlap import case_dice
from autoliver.postprocess.apply import apply_label_step, crf_module, crf_refine
from autoliver.selection.cv import CVSource, load_image, load_reference
from autoliver.selection.ensemble import candidate_probabilities, mean_dice, score

log = logging.getLogger(__name__)

LABEL_GRIDS: dict[str, tuple[dict, ...]] = {
    "largest_liver_component": ({"then_liver": False}, {"then_liver": True}),
    "tumour_inside_liver": ({"dilation_mm": 10.0}, {"dilation_mm": 5.0}, {"dilation_mm": 2.0}),
    "min_tumour_volume": tuple({"min_volume_mm3": v} for v in (10.0, 50.0, 100.0, 250.0, 500.0)),
}
DECISION_RULE = "enabled when it lowers neither mean liver nor mean tumour Dice and raises at least one"


def _pack(seg: np.ndarray) -> bytes:
    return blosc2.pack_array2(np.ascontiguousarray(seg, dtype=np.uint8))


def _unpack(blob: bytes) -> np.ndarray:
    return blosc2.unpack_array2(blob)


def helps(before: Mapping[str, float], after: Mapping[str, float]) -> bool:
    """The decision rule (means rounded to 1e-12 so float noise decides nothing)."""
    b = {k: round(float(before[k]), 12) for k in ("liver", "tumour")}
    a = {k: round(float(after[k]), 12) for k in ("liver", "tumour")}
    return all(a[k] >= b[k] for k in a) and any(a[k] > b[k] for k in a)


def choose_variant(before: Mapping[str, float], variants: Sequence[Mapping]) -> tuple[int, bool]:
    """(index of the chosen parameter set, enabled) from variants with "liver"/"tumour" means."""
    passing = [i for i, v in enumerate(variants) if helps(before, v)]
    pool = passing or list(range(len(variants)))
    best = max(pool, key=lambda i: (round(score(variants[i]), 12), -i))
    return best, bool(passing)


def _step_record(name: str, before: Mapping[str, float], variants: list[dict], seconds: list[float]) -> tuple[PostprocessStep, int, bool]:
    index, enabled = choose_variant(before, variants)
    chosen = variants[index]
    record = PostprocessStep(name, enabled, dict(chosen["params"]), {"cv": {
            "before": {k: float(before[k]) for k in ("liver", "tumour")},
            "after": {k: float(chosen[k]) for k in ("liver", "tumour")},
            "variants": [{"params": dict(v["params"]), "liver": v["liver"], "tumour": v["tumour"]} for v in variants],
            "seconds_per_case": float(seconds[index]),
        },
    })
    log.info("%s %s %s: liver %.4f -> %.4f, tumour %.4f -> %.4f", name, "enabled" if enabled else "not kept", chosen["params"],
             before["liver"], chosen["liver"], before["tumour"], chosen["tumour"])
    return record, index, enabled


def decide_postprocessing(source: CVSource, members: Sequence[str], crf_grid: Sequence[Mapping] | None = None,
                          label_grids: Mapping[str, Sequence[Mapping]] = LABEL_GRIDS, progress: bool = True,
                          clock: Callable[[], float] = time.perf_counter) -> tuple[list[PostprocessStep], dict[str, float]]:
    """(the "postprocessing" list of inference_plan.json, mean Dice of the raw predictions).

    ``crf_grid`` None: the crf module's ``CRF_PARAM_GRID`` when the module exists, else the
    CRF step is recorded as unavailable. An empty grid skips it the same way.
    """
    module = crf_module()
    if crf_grid is None:
        crf_grid = list(getattr(module, "CRF_PARAM_GRID", [])) if module is not None else []
    spacing = source.spacing
    refs: dict[str, bytes] = {}
    current: dict[str, bytes] = {}
    crf_out: list[dict[str, bytes]] = [{} for _ in crf_grid]
    crf_dice: list[dict[str, dict]] = [{} for _ in crf_grid]
    crf_seconds = [0.0 for _ in crf_grid]
    raw_dice: dict[str, dict] = {}
    for case in tqdm(source.cases, desc="predictions" + (" + CRF" if crf_grid else ""), unit="case", disable=not progress):
        ref = load_reference(source, case)
        probs = candidate_probabilities(source, members, case, ref.shape)
        seg = probs.argmax(0).astype(np.uint8)
        refs[case], current[case] = _pack(ref), _pack(seg)
        raw_dice[case] = case_dice(seg, ref)
        if crf_grid:
            image = load_image(source, case)
            for i, params in enumerate(crf_grid):
                t0 = clock()
                out = crf_refine(probs, image, spacing, params, seg=seg)
                crf_seconds[i] += clock() - t0
                crf_out[i][case] = _pack(out)
                crf_dice[i][case] = case_dice(out, ref)
        del probs
    n = max(1, len(source.cases))
    before = mean_dice(raw_dice)
    raw = dict(before)
    steps = []
    if crf_grid:
        variants = [{"params": dict(p), **mean_dice(crf_dice[i])} for i, p in enumerate(crf_grid)]
        record, index, enabled = _step_record(CRF_STEP, before, variants, [s / n for s in crf_seconds])
        steps.append(record)
        if enabled:
            current, before = crf_out[index], {k: variants[index][k] for k in ("liver", "tumour")}
    else:
        steps.append(PostprocessStep(CRF_STEP, False, {}, {"cv": None,
                     "note": "not evaluated: autoliver.postprocess.crf is not available" if module is None else "not evaluated (no CRF parameter set given, e.g. --no-crf)"}))
    del crf_out
    for name, grid in label_grids.items():
        outputs: list[dict[str, bytes]] = []
        variants, seconds = [], []
        for params in grid:
            out, per_case, spent = {}, {}, 0.0
            for case in source.cases:
                seg = _unpack(current[case])
                t0 = clock()
                new = apply_label_step(seg, spacing, name, params)
                spent += clock() - t0
                out[case] = _pack(new)
                per_case[case] = case_dice(new, _unpack(refs[case]))
            outputs.append(out)
            variants.append({"params": dict(params), **mean_dice(per_case)})
            seconds.append(spent / n)
        record, index, enabled = _step_record(name, before, variants, seconds)
        steps.append(record)
        if enabled:
            current, before = outputs[index], {k: variants[index][k] for k in ("liver", "tumour")}
    return steps, raw
