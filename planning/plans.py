"""plans.json: the experiment plan, kept as JSON with a thin typed accessor.

Configurations share preprocessed data where their spacing is the same: ``2d``, ``2.5d``,
``3d_fullres`` and ``3d_cascade_fullres`` all read the ``fullres`` data folder; ``3d_lowres``
reads ``lowres``. ``data_identifier`` names the folder under ``preprocessed/<dataset>/``.

Axis order everywhere: (z, y, x). A 2D configuration's ``patch_size`` is (y, x).

Besides the planned configurations (``CONFIGURATION_NAMES``), plans.json may hold
configurations that a recipe or a user added (``planning.recipes``): each names the planned
configuration it ``inherits_from`` and overrides only what differs (network family and its
options, training options, stage, patch). A preprocessing option that changes voxel values
gets its own data folder: ``data_preprocessing[data_identifier]`` records the options and
``data_spacings[data_identifier]`` its spacing. Fields left at their defaults are not written,
so plans made before these fields existed keep their hash.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from planning.errors import PlanError
from planning.hashing import hash_json
from planning.jsonio import read_json_file

PLANS_SCHEMA_VERSION = 1
CONFIGURATION_NAMES = ("2d", "2.5d", "3d_fullres", "3d_lowres", "3d_cascade_fullres")
PREFERENCE_ORDER = ("3d_fullres", "3d_cascade_fullres", "2.5d", "2d", "3d_lowres")  # default choice and candidate order
STAGES = ("single", "liver", "tumour")
DEFAULT_NETWORK = "unet"


class PlansFormatError(PlanError, ValueError):
    """plans.json is malformed; the message names the file and the command that makes it."""


@dataclass(frozen=True)
class Normalisation:
    """CT normalisation: clip to [clip_low, clip_high] HU, then (x - mean) / std."""

    scheme: str  # "ct"
    clip_low: float
    clip_high: float
    mean: float
    std: float


@dataclass(frozen=True)
class Configuration:
    name: str
    network_dims: int  # 2 or 3
    data_identifier: str  # preprocessed folder: "fullres" or "lowres"
    spacing: tuple[float, float, float]  # target spacing (z, y, x) mm of the data folder
    median_shape: tuple[int, int, int]  # median case shape at that spacing (z, y, x)
    patch_size: tuple[int, ...]  # (y, x) or (z, y, x)
    batch_size: int
    n_stages: int
    features_per_stage: tuple[int, ...]
    kernel_sizes: tuple[tuple[int, ...], ...]  # per stage
    strides: tuple[tuple[int, ...], ...]  # per stage; the first is all ones
    in_slices: int = 1  # 2.5d: adjacent slices given as channels
    previous_stage: str | None = None  # cascade: the configuration whose prediction is input
    estimated_memory_gb: float = 0.0  # analytic training-memory estimate at this batch size
    extra: dict = field(default_factory=dict)  # free-form notes (rules applied, reasons)
    # --- configurations derived from a planned one (recipes, user variants) ---
    inherits_from: str | None = None  # the planned configuration this one derives from
    recipe: str | None = None  # the recipe that added it
    network: str = DEFAULT_NETWORK  # network family (autoliver.nets registry name)
    network_options: dict = field(default_factory=dict)  # family options (width, dropout, ...)
    training: dict = field(default_factory=dict)  # loss, optimiser, lr, schedule, stopping rule (autoliver.train.options)
    stage: str = "single"  # "single"; or a two-stage design's "liver" / "tumour" stage
    liver_stage: str | None = None  # a tumour stage: the configuration that finds the liver
    roi_margin_mm: float = 10.0  # a tumour stage: margin around the liver's box

    @property
    def derived(self) -> bool:
        return self.inherits_from is not None


@dataclass(frozen=True)
class Plans:
    dataset_name: str
    fingerprint_hash: str
    device: str  # "gpu" or "cpu": what the memory budget refers to
    memory_budget_gb: float
    labels: dict[str, int]
    normalisation: Normalisation
    data_spacings: dict[str, tuple[float, float, float]]  # data_identifier -> spacing
    configurations: dict[str, Configuration]
    schema_version: int = PLANS_SCHEMA_VERSION
    data_preprocessing: dict[str, dict] = field(default_factory=dict)  # data_identifier -> voxel-changing options

    def to_json(self) -> dict:
        d = asdict(self)
        if not d["data_preprocessing"]:
            del d["data_preprocessing"]
        for c in d["configurations"].values():
            for name, default in _OPTIONAL_DEFAULTS.items():
                if c.get(name) == default:
                    del c[name]
        d["plans_hash"] = hash_json({k: v for k, v in d.items() if k != "plans_hash"})
        return d

    @property
    def plans_hash(self) -> str:
        return self.to_json()["plans_hash"]

    def ordered_configurations(self) -> tuple[str, ...]:
        """Planned configurations in preference order, then the derived ones in plan order."""
        planned = [c for c in PREFERENCE_ORDER if c in self.configurations]
        return tuple(planned + [c for c in self.configurations if c not in planned])

    def configuration_hash(self, name: str) -> str:
        """The hash of everything configuration ``name`` is built from: its entry, its data
        folder's spacing and preprocessing options, the normalisation, labels and fingerprint,
        and the stages it depends on. Adding another configuration to the plans leaves it
        unchanged, so trained folds stay valid when a recipe is added."""
        config = self.configurations[name]
        entry = {k: v for k, v in asdict(config).items() if _OPTIONAL_DEFAULTS.get(k, _MISSING) != v}
        ident = config.data_identifier
        depends = [d for d in (config.previous_stage, config.liver_stage) if d]
        return hash_json({
            "configuration": entry, "data_spacing": self.data_spacings.get(ident), "data_preprocessing": self.data_preprocessing.get(ident),
            "normalisation": asdict(self.normalisation), "labels": self.labels, "fingerprint_hash": self.fingerprint_hash,
            "depends": {d: self.configuration_hash(d) for d in depends if d in self.configurations},
        })

    def data_hash(self, data_identifier: str) -> str:
        """The hash of what a preprocessed data folder is made from (spacing, options, normalisation)."""
        return hash_json({"data_spacing": self.data_spacings.get(data_identifier), "data_preprocessing": self.data_preprocessing.get(data_identifier),
                          "normalisation": asdict(self.normalisation), "labels": self.labels, "fingerprint_hash": self.fingerprint_hash})

    def selection_hash(self, names: tuple[str, ...] | list[str]) -> str:
        """The hash of a set of configurations (an inference plan's members)."""
        return hash_json({n: self.configuration_hash(n) for n in sorted(names)})

    def hash_matches(self, recorded: str | None, names: str | tuple[str, ...] | list[str]) -> bool:
        """Whether an artefact's recorded hash fits configuration(s) ``names``: their hash, or
        (artefacts written before per-configuration hashes) the whole plans' hash."""
        if recorded is None:
            return False
        wanted = self.configuration_hash(names) if isinstance(names, str) else self.selection_hash(names)
        return recorded in (wanted, self.plans_hash)

    @classmethod
    def from_json(cls, d: dict, source: str = "plans.json") -> "Plans":
        fix = "re-run `autoliver plan` or `autoliver plan_and_preprocess` to rebuild it"
        if not isinstance(d, dict):
            raise PlansFormatError(f"{source}: not a JSON object; {fix}")
        if d.get("schema_version") != PLANS_SCHEMA_VERSION:
            raise PlansFormatError(f"{source}: schema_version {d.get('schema_version')!r}, expected {PLANS_SCHEMA_VERSION}; {fix}")
        try:
            configs = {}
            for name, c in d["configurations"].items():
                c = dict(c)
                c["spacing"] = tuple(c["spacing"])
                c["median_shape"] = tuple(c["median_shape"])
                c["patch_size"] = tuple(c["patch_size"])
                c["features_per_stage"] = tuple(c["features_per_stage"])
                c["kernel_sizes"] = tuple(tuple(k) for k in c["kernel_sizes"])
                c["strides"] = tuple(tuple(s) for s in c["strides"])
                configs[name] = Configuration(**c)
                if configs[name].stage not in STAGES:
                    raise ValueError(f"configuration {name}: stage {configs[name].stage!r} is not one of {', '.join(STAGES)}")
            norm = Normalisation(**d["normalisation"])
            problems = _problems(norm, configs, d)
            if problems:
                raise ValueError("; ".join(problems))
            return cls(
                dataset_name=str(d["dataset_name"]),
                fingerprint_hash=str(d["fingerprint_hash"]),
                device=str(d["device"]),
                memory_budget_gb=float(d["memory_budget_gb"]),
                labels={str(k): int(v) for k, v in d["labels"].items()},
                normalisation=norm,
                data_spacings={k: tuple(v) for k, v in d["data_spacings"].items()},
                configurations=configs,
                schema_version=d["schema_version"],
                data_preprocessing={str(k): dict(v) for k, v in (d.get("data_preprocessing") or {}).items()},
            )
        except (KeyError, TypeError, ValueError, AttributeError, OverflowError) as exc:
            raise PlansFormatError(f"{source}: malformed ({type(exc).__name__}: {exc}); {fix}") from None

    @classmethod
    def load(cls, path: str | Path) -> "Plans":
        d = read_json_file(path, PlansFormatError, "re-run `autoliver plan` to rebuild it", "run `autoliver plan_and_preprocess` first")
        return cls.from_json(d, str(path))


_MISSING = object()
_OPTIONAL_DEFAULTS: dict[str, object] = {"inherits_from": None, "recipe": None, "network": DEFAULT_NETWORK, "network_options": {}, "training": {},
                      "stage": "single", "liver_stage": None, "roi_margin_mm": 10.0}


def _finite_positive(values) -> bool:
    try:
        return all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0 for v in values)
    except TypeError:
        return False


_BAD_NAME_CHARS = re.compile(r"[/\\\x00-\x1f:*?\"<>|]")  # as autoliver.core.layout.plain_name: names become folder names


def _plain(name: object) -> bool:
    return (isinstance(name, str) and bool(name) and name.strip() == name and not name.startswith(".")
            and not _BAD_NAME_CHARS.search(name) and len(name) <= 200)


def _problems(norm: Normalisation, configs: dict[str, Configuration], d: dict) -> list[str]:
    """What makes a parsed plans.json unusable (values a reader would silently misuse, names
    that would become paths outside the workspace)."""
    out = []
    for key in ("dataset_name", "fingerprint_hash", "device"):
        if not isinstance(d.get(key), str):
            out.append(f"{key} must be a string, got {d.get(key)!r:.60}")
    budget = d.get("memory_budget_gb")
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not math.isfinite(budget) or budget <= 0:
        out.append(f"memory_budget_gb must be a positive number, got {budget!r:.60}")
    labels = d.get("labels")
    if not isinstance(labels, dict) or not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 256 for v in labels.values()):
        out.append(f"labels must map names to label values 0..255, got {labels!r:.80}")
    for ident in list(d.get("data_spacings") or {}) + list(d.get("data_preprocessing") or {}):
        if not _plain(ident):
            out.append(f"data identifier {ident!r:.60} is not a plain folder name")
    if not isinstance(d.get("data_preprocessing") or {}, dict) or not all(isinstance(v, dict) for v in (d.get("data_preprocessing") or {}).values()):
        out.append("data_preprocessing must map data identifiers to option objects")
    numbers = (norm.clip_low, norm.clip_high, norm.mean, norm.std)
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in numbers):
        out.append(f"normalisation values must be finite numbers, got {numbers}")
    elif not (norm.clip_low < norm.clip_high and norm.std > 0):
        out.append(f"normalisation needs clip_low < clip_high and std > 0, got {numbers}")
    for name, c in configs.items():
        if not _plain(name):
            out.append(f"configuration name {name!r:.60} is not a plain name (no folders, no leading dot, no special characters)")
        if not _plain(c.data_identifier):
            out.append(f"configuration {name}: data_identifier {c.data_identifier!r:.60} is not a plain folder name")
        if c.network_dims not in (2, 3) or isinstance(c.network_dims, bool):
            out.append(f"configuration {name}: network_dims {c.network_dims!r:.20} must be 2 or 3")
            continue
        for field_name in ("previous_stage", "liver_stage", "inherits_from"):
            other = getattr(c, field_name)
            if other is not None and other not in configs:
                out.append(f"configuration {name}: {field_name} {other!r:.60} is not a configuration of these plans")
        if not isinstance(c.network, str) or not isinstance(c.network_options, dict) or not isinstance(c.training, dict) or not isinstance(c.extra, dict):
            out.append(f"configuration {name}: network must be a name and network_options, training, extra objects")
        if not isinstance(c.in_slices, int) or isinstance(c.in_slices, bool) or c.in_slices < 1:
            out.append(f"configuration {name}: in_slices {c.in_slices!r:.20} must be a positive integer")
        if not isinstance(c.roi_margin_mm, (int, float)) or isinstance(c.roi_margin_mm, bool) or not math.isfinite(c.roi_margin_mm) or c.roi_margin_mm < 0:
            out.append(f"configuration {name}: roi_margin_mm {c.roi_margin_mm!r:.20} must be a finite number >= 0")
        if not _finite_positive(c.spacing) or len(c.spacing) != 3:
            out.append(f"configuration {name}: spacing {c.spacing} must be three positive numbers")
        if not _finite_positive(c.patch_size) or not all(isinstance(p, int) for p in c.patch_size) or len(c.patch_size) != c.network_dims:
            out.append(f"configuration {name}: patch_size {c.patch_size} must be {c.network_dims} positive integers")
        if not isinstance(c.batch_size, int) or isinstance(c.batch_size, bool) or c.batch_size < 1:
            out.append(f"configuration {name}: batch_size {c.batch_size!r:.20} must be a positive integer")
        if not _finite_positive(c.median_shape) or len(c.median_shape) != 3:
            out.append(f"configuration {name}: median_shape {c.median_shape!r:.60} must be three positive numbers")
        n = c.n_stages
        if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= 16:
            out.append(f"configuration {name}: n_stages {n!r:.20} must be an integer from 1 to 16")
            continue
        if len(c.features_per_stage) != n or not all(isinstance(f, int) and not isinstance(f, bool) and 0 < f <= 4096 for f in c.features_per_stage):
            out.append(f"configuration {name}: features_per_stage {c.features_per_stage!r:.60} must be {n} positive integers")
        for what, rows in (("kernel_sizes", c.kernel_sizes), ("strides", c.strides)):
            if len(rows) != n or not all(len(r) == c.network_dims and all(isinstance(v, int) and not isinstance(v, bool) and 0 < v <= 16 for v in r) for r in rows):
                out.append(f"configuration {name}: {what} {rows!r:.60} must be {n} rows of {c.network_dims} positive integers")
    for ident, spacing in (d.get("data_spacings") or {}).items():
        if not isinstance(spacing, (list, tuple)) or len(spacing) != 3 or not _finite_positive(spacing):
            out.append(f"data_spacings[{ident}] {spacing} must be positive numbers")
    return out
