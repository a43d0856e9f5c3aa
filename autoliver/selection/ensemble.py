"""Score every candidate (each configuration alone and every ensemble of two or more: equal
softmax averages) on the cross-validation cases, case by case.

Per case, the members' probabilities are loaded once (in the scoring grid) and every
candidate's argmax is scored against the reference with the LiTS Dice rule (both empty: 1);
only the per-case Dice values are kept, so memory is one case's probabilities per
configuration. The score of a candidate is the mean of its mean liver and mean tumour Dice.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
from tqdm import tqdm

from autoliver.evaluate.overlap import case_dice
from autoliver.selection.cv import CVSource, load_probabilities, load_reference

log = logging.getLogger(__name__)

SEPARATOR = "+"
# a larger ensemble must beat the best smaller one by more than this to be chosen
TIE_TOLERANCE = 1e-4
SCORE_RULE = "mean of liver and tumour Dice (LiTS rule: both empty scores 1), mean over cases"


def candidate_sets(configurations: Sequence[str]) -> list[tuple[str, ...]]:
    """Every non-empty subset of ``configurations`` (in their order), smaller ones first."""
    return [combo for n in range(1, len(configurations) + 1) for combo in itertools.combinations(configurations, n)]


def candidate_name(members: Iterable[str]) -> str:
    return SEPARATOR.join(members)


def members_of(name: str) -> tuple[str, ...]:
    return tuple(name.split(SEPARATOR))


def ensemble_probabilities(probs: Mapping[str, np.ndarray], members: Sequence[str]) -> np.ndarray:
    """Equal-weight softmax average of ``members`` (float32 (C, Z, Y, X))."""
    if len(members) == 1:
        return probs[members[0]]
    out = np.array(probs[members[0]], dtype=np.float32, copy=True)
    for m in members[1:]:
        out += probs[m]
    out /= np.float32(len(members))
    return out


def candidate_probabilities(source: CVSource, members: Sequence[str], case: str, shape: Sequence[int]) -> np.ndarray:
    """One candidate's cross-validation softmax of ``case`` in the scoring grid."""
    return ensemble_probabilities({m: load_probabilities(source, m, case, shape) for m in members}, members)


def mean_dice(per_case: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """Mean liver and tumour Dice over cases (sorted, so the sum is reproducible)."""
    keys = sorted(per_case)
    return {n: float(np.mean([per_case[k][n] for k in keys])) for n in ("liver", "tumour")}


def score(means: Mapping[str, float]) -> float:
    return 0.5 * (float(means["liver"]) + float(means["tumour"]))


def score_candidates(source: CVSource, candidates: Sequence[tuple[str, ...]], progress: bool = True) -> dict[str, dict[str, dict[str, float]]]:
    """{candidate name: {case: {"liver": dice, "tumour": dice}}}, streamed case by case."""
    needed = sorted({m for c in candidates for m in c}, key=list(source.configurations).index)
    out: dict[str, dict[str, dict[str, float]]] = {candidate_name(c): {} for c in candidates}
    for case in tqdm(source.cases, desc="score candidates", unit="case", disable=not progress):
        ref = load_reference(source, case)
        probs = {m: load_probabilities(source, m, case, ref.shape) for m in needed}
        for members in candidates:
            pred = ensemble_probabilities(probs, members).argmax(0).astype(np.uint8)
            out[candidate_name(members)][case] = case_dice(pred, ref)
        del probs
    return out


def rank(per_candidate: Mapping[str, Mapping[str, Mapping[str, float]]], order: Sequence[str]) -> list[dict]:
    """Candidates best first: score, then fewer models, then ``order`` (configuration preference)."""
    rows = []
    for name, per_case in per_candidate.items():
        means = mean_dice(per_case)
        members = members_of(name)
        rows.append({"candidate": name, "configurations": list(members), "liver": means["liver"], "tumour": means["tumour"],
                     "score": score(means), "n_models": len(members)})
    rows.sort(key=lambda r: (-round(r["score"], 12), r["n_models"], [list(order).index(m) for m in r["configurations"]]))
    return rows


def choose(ranking: Sequence[Mapping], tolerance: float = TIE_TOLERANCE) -> Mapping:
    """The best candidate, preferring fewer models unless more beat them by ``tolerance``."""
    if not ranking:
        raise ValueError("no candidate to choose from")
    best = ranking[0]["score"]
    close = [r for r in ranking if r["score"] >= best - tolerance]
    fewest = min(r["n_models"] for r in close)
    return next(r for r in close if r["n_models"] == fewest)


def ranking_table(ranking: Sequence[Mapping], chosen: str | None = None) -> str:
    """The ranked table the CLI prints."""
    width = max([len("candidate")] + [len(r["candidate"]) for r in ranking])
    lines = [f"  {'#':>2}  {'candidate':<{width}}  {'liver':>7}  {'tumour':>7}  {'score':>7}"]
    for i, r in enumerate(ranking, start=1):
        mark = "*" if r["candidate"] == chosen else " "
        lines.append(f"{mark} {i:>2}  {r['candidate']:<{width}}  {r['liver']:7.4f}  {r['tumour']:7.4f}  {r['score']:7.4f}")
    return "\n".join(lines)
