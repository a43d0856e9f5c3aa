"""Typed artefacts that travel between stages, validated at the JSON boundary.

- :class:`PostprocessStep`: one entry of an inference plan's "postprocessing" list.
- :class:`InferencePlan`: ``results/<dataset>/inference_plan.json`` (what ``predict`` runs by
  default and the cross-validation evidence for it).
- :class:`FoldMetrics`: a fold's ``metrics.json`` (per-case and mean liver/tumour Dice).

Dicts exist only in ``to_json``/``from_json``; everything else passes these frozen objects.
Messages name the file and the command that rebuilds it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from autoliver.core.errors import AutoliverError, PlanError
from autoliver.core.labels import STRUCTURE_NAMES
from autoliver.core.layout import fold_name, plain_name

CRF_STEP = "dense_crf"
LABEL_STEP_NAMES = ("largest_liver_component", "tumour_inside_liver", "min_tumour_volume")
STEP_NAMES = (CRF_STEP, *LABEL_STEP_NAMES)
INFERENCE_PLAN_SCHEMA = 1


@dataclass(frozen=True)
class PostprocessStep:
    """A post-processing step: its name, whether it is applied, its parameters (mm, mm³) and
    the evidence that decided it (``cv``, ``note``: kept for the report, never interpreted)."""

    name: str
    enabled: bool = False
    params: Mapping[str, Any] = field(default_factory=dict)
    evidence: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.name not in STEP_NAMES:
            raise ValueError(f"unknown post-processing step {self.name!r}; known: {', '.join(STEP_NAMES)}")
        if not isinstance(self.params, Mapping):
            raise ValueError(f"post-processing step {self.name}: params must be a mapping, got {self.params!r}")

    def to_json(self) -> dict:
        return {"name": self.name, "enabled": bool(self.enabled), "params": dict(self.params), **dict(self.evidence)}

    @classmethod
    def from_json(cls, d: object, index: int = 0) -> PostprocessStep:
        if isinstance(d, PostprocessStep):
            return d
        if not isinstance(d, Mapping) or d.get("name") not in STEP_NAMES:
            raise ValueError(f"post-processing step {index}: expected {{'name': one of {', '.join(STEP_NAMES)}, 'enabled', 'params'}}, got {d!r}")
        params = d.get("params", {})
        if params is None:
            params = {}
        if not isinstance(params, Mapping):
            raise ValueError(f"post-processing step {index} ({d['name']}): params must be a mapping, got {params!r}")
        evidence = {k: v for k, v in d.items() if k not in ("name", "enabled", "params")}
        return cls(str(d["name"]), bool(d.get("enabled", False)), dict(params), evidence)


def parse_steps(steps: Sequence[PostprocessStep | Mapping]) -> tuple[PostprocessStep, ...]:
    """Steps (objects or their JSON) as :class:`PostprocessStep`, in order; ValueError if malformed."""
    if isinstance(steps, (str, bytes, Mapping)) or not isinstance(steps, Sequence):
        raise ValueError(f"post-processing steps must be a list, got {type(steps).__name__}")
    return tuple(PostprocessStep.from_json(s, i) for i, s in enumerate(steps))


def enabled_steps(steps: Sequence[PostprocessStep | Mapping]) -> tuple[PostprocessStep, ...]:
    """The enabled steps, checked: known names, params a mapping, dense_crf before label steps."""
    out: list[PostprocessStep] = []
    for i, step in enumerate(parse_steps(steps)):
        if step.enabled:
            if step.name == CRF_STEP and out:
                raise ValueError(f"post-processing step {i}: {CRF_STEP} must come before the label-only steps ({', '.join(s.name for s in out)})")
            out.append(step)
    return tuple(out)


@dataclass(frozen=True)
class InferencePlan:
    dataset: str
    plans_hash: str
    configurations: tuple[str, ...]  # one: a single model; more: equal-weight softmax average
    folds: Mapping[str, tuple[str, ...]]
    postprocessing: tuple[PostprocessStep, ...]  # in application order (see autoliver.postprocess)
    evidence: Mapping[str, Any] = field(default_factory=dict)
    created: str = ""
    schema_version: int = INFERENCE_PLAN_SCHEMA

    def to_json(self) -> dict:
        return {
            "schema_version": self.schema_version,
            "dataset": self.dataset,
            "plans_hash": self.plans_hash,
            "configurations": list(self.configurations),
            "folds": {k: list(v) for k, v in self.folds.items()},
            "postprocessing": [s.to_json() for s in self.postprocessing],
            "evidence": dict(self.evidence),
            "created": self.created,
        }

    @property
    def enabled_steps(self) -> tuple[PostprocessStep, ...]:
        return enabled_steps(self.postprocessing)

    @classmethod
    def from_json(cls, d: object, source: str = "inference_plan.json") -> InferencePlan:
        dataset = d.get("dataset", "DATASET") if isinstance(d, Mapping) else "DATASET"
        fix = f"run `autoliver find_best_configuration -d {dataset}` to rebuild it"
        if not isinstance(d, Mapping):
            raise PlanError(f"{source}: not a JSON object; {fix}")
        if d.get("schema_version") != INFERENCE_PLAN_SCHEMA:
            raise PlanError(f"{source}: schema_version {d.get('schema_version')!r}, expected {INFERENCE_PLAN_SCHEMA}; {fix}")
        try:
            if not isinstance(d["configurations"], list) or not isinstance(d["postprocessing"], list):
                raise TypeError("configurations and postprocessing must be lists")
            if not all(isinstance(c, str) for c in d["configurations"]):
                raise TypeError(f"configurations must be names, got {d['configurations']!r:.80}")
            if not isinstance(d["folds"], Mapping) or not all(isinstance(v, list) and all(isinstance(f, (str, int)) and not isinstance(f, bool) for f in v)
                                                             for v in d["folds"].values()):
                raise TypeError(f"folds must map each configuration to a list of folds, got {d['folds']!r:.80}")
            if not isinstance(d.get("evidence") or {}, Mapping):
                raise TypeError(f"evidence must be an object, got {type(d.get('evidence')).__name__}")
            configurations = tuple(d["configurations"])
            folds = {str(k): tuple(str(f) for f in v) for k, v in d["folds"].items()}
            steps = parse_steps(d["postprocessing"])
            plan = cls(dataset=str(d["dataset"]), plans_hash=str(d["plans_hash"]), configurations=configurations, folds=folds,
                       postprocessing=steps, evidence=dict(d.get("evidence") or {}), created=str(d.get("created", "")))
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise PlanError(f"{source}: malformed ({type(exc).__name__}: {exc}); {fix}") from None
        problems = []
        if not configurations:
            problems.append("no configuration")
        problems += [f"configuration {c!r} is not a plain name" for c in configurations if not _is_plain(c)]
        problems += [f"no folds for {c}" for c in configurations if not folds.get(c)]
        problems += [f"fold {f!r:.40} of {c} is not a fold (0, 1, ... or all)" for c in configurations for f in folds.get(c, ()) if not _is_fold(f)]
        try:
            enabled_steps(steps)
        except ValueError as exc:
            problems.append(str(exc))
        if problems:
            raise PlanError(f"{source}: {'; '.join(problems)}; {fix}")
        return plan


@dataclass(frozen=True)
class FoldMetrics:
    """A fold's ``metrics.json``: liver and tumour Dice per validation case and their means."""

    per_case: Mapping[str, Mapping[str, float]]
    extra: Mapping[str, Any] = field(default_factory=dict)
    dice_rule: str = "LiTS: 1 when prediction and reference are both empty"

    @property
    def mean(self) -> dict[str, float | None]:
        values = list(self.per_case.values())
        return {n: (sum(float(v[n]) for v in values) / len(values)) if values else None for n in STRUCTURE_NAMES}

    def to_json(self) -> dict:
        return {"mean": self.mean, "per_case": {k: dict(self.per_case[k]) for k in sorted(self.per_case)},
                "n_cases": len(self.per_case), "dice_rule": self.dice_rule, **dict(self.extra)}

    @classmethod
    def from_json(cls, d: object, source: str = "metrics.json") -> FoldMetrics:
        fix = "train the fold again with `autoliver train`"
        if not isinstance(d, Mapping) or not isinstance(d.get("per_case"), Mapping):
            raise PlanError(f"{source}: not a fold's metrics (no per_case mapping); {fix}")
        bad = [k for k, v in d["per_case"].items() if not isinstance(v, Mapping) or not all(n in v and _is_dice(v[n]) for n in STRUCTURE_NAMES)]
        if bad:
            raise PlanError(f"{source}: per-case Dice of {', '.join(repr(k)[:40] for k in bad[:5])} not a number from 0 to 1 for each of "
                            f"{', '.join(STRUCTURE_NAMES)}; {fix}")
        per_case = {str(k): {n: float(v[n]) for n in STRUCTURE_NAMES if n in v} for k, v in d["per_case"].items()}
        extra = {k: v for k, v in d.items() if k not in ("mean", "per_case", "n_cases", "dice_rule")}
        return cls(per_case, extra, str(d.get("dice_rule", cls.dice_rule)))


def _is_fold(text: str) -> bool:
    try:
        return len(fold_name(text)) <= 16
    except AutoliverError:
        return False


def _is_dice(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0.0 <= value <= 1.0  # NaN fails both comparisons


def _is_plain(name: str) -> bool:
    try:
        plain_name(name)
    except AutoliverError:
        return False
    return True
