"""``find_best_configuration``: score the candidates, choose one, decide its post-processing
and write ``inference_plan.json``."""

from __future__ import annotations

import datetime
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from autoliver.core.artefacts import InferencePlan, PostprocessStep
from autoliver.io.inference_plan import inference_plan_path, write_inference_plan
from autoliver.selection.cv import CVSource, discover
from autoliver.selection.decide import DECISION_RULE, decide_postprocessing
from autoliver.selection.ensemble import SCORE_RULE, TIE_TOLERANCE, candidate_sets, choose, rank, ranking_table, score_candidates

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SelectionResult:
    plan: InferencePlan
    path: Path
    ranking: tuple[dict, ...]
    chosen: str
    skipped: dict[str, str]  # configurations left out, with what is missing

    def table(self) -> str:
        return ranking_table(self.ranking, self.chosen)


def postprocessing_table(steps: Sequence[PostprocessStep]) -> str:
    """One line per post-processing step: decision, parameters, CV Dice before -> after."""
    lines = []
    for s in steps:
        cv = s.evidence.get("cv")
        params = ", ".join(f"{k}={v}" for k, v in s.params.items()) or "-"
        if not cv:
            lines.append(f"  {s.name:<24} {'n/a':<4} {s.evidence.get('note', '')}")
            continue
        b, a = cv["before"], cv["after"]
        change = ", ".join(f"{n} {b[n]:.4f} -> {a[n]:.4f} ({a[n] - b[n]:+.5f})" for n in ("liver", "tumour"))
        lines.append(f"  {s.name:<24} {'on' if s.enabled else 'off':<4} {change}  [{params}; {cv.get('seconds_per_case', 0.0):.3f} s/case]")
    return "\n".join(lines)


def find_best_configuration(preprocessed_dir: str | Path, results_dir: str | Path, configurations: Sequence[str] | None = None,
                            progress: bool = True, crf_grid: Sequence[Mapping] | None = None, write: bool = True,
                            created: str | None = None) -> SelectionResult:
    """Choose the best configuration or ensemble and its post-processing on cross-validation.

    Writes ``results_dir/inference_plan.json`` (unless ``write`` is False). ``crf_grid``
    overrides the CRF module's parameter grid (an empty list skips the CRF).
    """
    source: CVSource = discover(preprocessed_dir, results_dir, configurations)
    candidates = candidate_sets(source.configurations)
    log.info("%s: %d configuration(s) (%s), %d candidate(s), %d cases", source.dataset, len(source.configurations),
             ", ".join(source.configurations), len(candidates), len(source.cases))
    per_candidate = score_candidates(source, candidates, progress=progress)
    ranking = rank(per_candidate, source.configurations)
    best = choose(ranking)
    members = tuple(best["configurations"])
    steps, raw = decide_postprocessing(source, members, crf_grid=crf_grid, progress=progress)
    folds = {c: list(source.folds[c]) for c in source.folds if c in members or (c == "3d_lowres" and "3d_cascade_fullres" in members)}
    evidence = {
        "ranking": ranking,
        "chosen": best["candidate"],
        "n_cases": len(source.cases),
        "cases": list(source.cases),
        "score": SCORE_RULE,
        "tie_tolerance": TIE_TOLERANCE,
        "postprocessing_rule": DECISION_RULE,
        "scoring_grid": {"data_identifier": source.reference_id, "spacing_mm": list(source.spacing)},
        "left_out": dict(source.skipped),
        "per_case": {best["candidate"]: per_candidate[best["candidate"]]},
        "raw_mean": raw,
    }
    plan = InferencePlan(
        dataset=source.dataset, plans_hash=source.plans.selection_hash(members), configurations=members,
        folds={k: tuple(v) for k, v in folds.items()}, postprocessing=tuple(steps), evidence=evidence,
        created=created or datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    )
    path = inference_plan_path(source.results_dir)
    if write:
        write_inference_plan(path, plan)
        log.info("wrote %s", path)
    return SelectionResult(plan, path, tuple(ranking), best["candidate"], dict(source.skipped))
