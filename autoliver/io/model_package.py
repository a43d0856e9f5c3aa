"""Model packages: one zip that carries a trained model to another machine.

```
manifest.json                           format, versions, per-file sha256, configurations, hashes, model card
plans.json                              the plans the networks were trained with
inference_plan.json                     (when it covers the packaged configurations and folds)
dataset.json                            the training dataset's description
<configuration>/fold_<k>/checkpoint_final.pt   weights-only checkpoint (or _best / _latest if training did not finish)
<configuration>/fold_<k>/metrics.json          the fold's cross-validation Dice (when present)
```

A packaged checkpoint keeps what prediction needs (weights, network family and classes,
configuration, plans hash, epoch) and drops the optimiser, random-generator states and history.
Installed, the package is a model folder that ``autoliver.infer.predictor.load_model`` reads
as it reads ``results/<dataset>/``.

``install_package`` trusts nothing: the zip is read with ``autoliver.io.archive`` (escaping
names, links, bombs and damaged members refused), the manifest must be of a known format, the
members must be exactly the files it lists, and every file must match its sha256 before the
unpacked folder is moved into place. Installing the same package again changes nothing.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
import zipfile
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path

import torch

from autoliver import __version__
from autoliver.core.artefacts import FoldMetrics, InferencePlan
from autoliver.core.errors import AutoliverError, MissingArtefactError, UsageError
from autoliver.core.layout import CHECKPOINTS, DATASET_JSON, INFERENCE_PLAN, METRICS, PLANS, ModelPaths, fold_name, fold_of, plain_name
from autoliver.io.archive import DEFAULT_LIMITS, ArchiveLimits, open_checked, read_member, safe_extract
from autoliver.io.atomic import atomic_path
from autoliver.io.checkpoint import load_checkpoint, save_checkpoint
from autoliver.io.jsonfile import read_json
from autoliver.io.model_card import INTENDED_USE, model_card
from planning.hashing import json_default
from planning.plans import Plans

log = logging.getLogger(__name__)

PACKAGE_FORMAT = "autoliver-model-package"
PACKAGE_FORMAT_VERSION = 1
MANIFEST = "manifest.json"
MAX_MANIFEST_BYTES = 16 << 20
KEPT_STATE = ("epoch", "weights", "plans_hash", "network", "configuration", "dataset", "fold", "stopped_early")
_FIXED_TIME = (1980, 1, 1, 0, 0, 0)  # member timestamps: the same content gives the same bytes


class ModelPackageError(AutoliverError):
    """A model package is malformed, tampered with, or cannot be installed where asked."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while data := f.read(1 << 20):
            h.update(data)
    return h.hexdigest()


# ----------------------------------------------------------------------------- export
def _trained_folds(paths: ModelPaths, configuration: str) -> list[str]:
    folds = [fold_of(p.name) for p in paths.fold_dirs(configuration) if any((p / n).is_file() for n in CHECKPOINTS)]
    numbered = sorted((f for f in folds if f.isdigit()), key=int)
    return numbered + [f for f in folds if not f.isdigit()]


def select_folds(model_dir: Path, plans: Plans, plan: InferencePlan | None, configurations: Sequence[str] | None,
                 folds: Sequence[str | int] | None) -> dict[str, list[str]]:
    """configuration -> folds to package: the given ones (default: the inference plan's, else
    every trained configuration), each with the given folds (default: the plan's, else every
    trained fold), plus the stages they depend on (cascade input, liver stage)."""
    paths = ModelPaths(model_dir)
    if configurations:
        chosen = list(dict.fromkeys(configurations))
    elif plan is not None:
        chosen = list(plan.configurations)
    else:
        chosen = [c for c in plans.ordered_configurations() if _trained_folds(paths, c)]
    unknown = [c for c in chosen if c not in plans.configurations]
    if unknown:
        raise UsageError(f"configuration(s) {', '.join(unknown)} not in {model_dir / PLANS}; planned: {', '.join(plans.configurations)}")
    if not chosen:
        raise MissingArtefactError(f"{model_dir}: no trained configuration to export; run `autoliver train -d {model_dir.name} CONFIG FOLD` first")
    wanted_folds = [fold_of(fold_name(f)) for f in folds] if folds else None
    selection: dict[str, list[str]] = {}
    queue = list(chosen)
    while queue:
        name = queue.pop(0)
        if name in selection:
            continue
        trained = _trained_folds(paths, name)
        want = wanted_folds or (list(plan.folds.get(name, ())) if plan is not None and not configurations else None) or trained
        if name not in chosen and not set(want) <= set(trained):  # a dependency: its own folds when it lacks the wanted ones
            want = trained
        missing = [f for f in want if f not in trained]
        if missing or not want:
            fold = missing[0] if missing else "FOLD"
            raise MissingArtefactError(f"{paths.configuration(name)}: fold(s) {', '.join(missing) or '(none trained)'} not trained; "
                                       f"run `autoliver train -d {model_dir.name} {name} {fold}` first")
        selection[name] = want
        config = plans.configurations[name]
        queue += [d for d in (config.previous_stage, config.liver_stage) if d]
    return selection


def _slim_checkpoint(source: Path, dest: Path) -> tuple[str, int]:
    state = load_checkpoint(source, map_location="cpu")
    save_checkpoint(dest, {k: state[k] for k in KEPT_STATE if k in state})
    return source.name, int(state["epoch"])


def _fold_metrics(path: Path) -> FoldMetrics | None:
    if not path.is_file():
        return None
    try:
        return FoldMetrics.from_json(read_json(path), str(path))
    except AutoliverError as exc:
        log.warning("%s left out of the model card: %s", path, exc)
        return None


def _stage(model_dir: Path, staging: Path, selection: Mapping[str, Sequence[str]], plan_path: Path | None) -> tuple[dict, dict]:
    """Copy/slim everything into ``staging``; returns (per-configuration fold info, metrics)."""
    paths = ModelPaths(model_dir)
    folds_info: dict[str, dict] = {}
    metrics: dict[str, dict[str, FoldMetrics | None]] = {}
    for name, folds in selection.items():
        folds_info[name], metrics[name] = {}, {}
        for fold in folds:
            fold_paths = paths.fold(name, fold)
            source = next(p for p in fold_paths.checkpoints() if p.is_file())
            if source.name != CHECKPOINTS[0]:
                log.warning("%s: no %s; packaging %s (training did not finish)", fold_paths.root, CHECKPOINTS[0], source.name)
            rel = Path(name) / fold_name(fold)
            (staging / rel).mkdir(parents=True, exist_ok=True)
            checkpoint, epoch = _slim_checkpoint(source, staging / rel / source.name)
            metrics[name][fold] = m = _fold_metrics(fold_paths.metrics)
            if m is not None:
                (staging / rel / METRICS).write_bytes(fold_paths.metrics.read_bytes())
            folds_info[name][fold] = {"checkpoint": checkpoint, "epoch": epoch}
    if plan_path is not None:
        (staging / INFERENCE_PLAN).write_bytes(plan_path.read_bytes())
    return folds_info, metrics


def _plan_fits(plan: InferencePlan | None, selection: Mapping[str, Sequence[str]]) -> bool:
    return plan is not None and all(c in selection and set(plan.folds.get(c, ())) <= set(selection[c]) for c in plan.configurations)


def _write_zip(staging: Path, output: Path, manifest: dict) -> None:
    files = sorted(p for p in staging.rglob("*") if p.is_file())
    with atomic_path(output, suffix=".zip") as tmp, zipfile.ZipFile(tmp, "w") as zf:
        zf.writestr(_info(MANIFEST, zipfile.ZIP_DEFLATED), (json.dumps(manifest, indent=2, default=json_default) + "\n").encode("utf-8"))
        for path in files:
            name = path.relative_to(staging).as_posix()
            method = zipfile.ZIP_STORED if path.suffix == ".pt" else zipfile.ZIP_DEFLATED  # checkpoints are zips already
            with open(path, "rb") as src, zf.open(_info(name, method), "w", force_zip64=True) as dst:
                while data := src.read(1 << 20):
                    dst.write(data)


def _info(name: str, method: int) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name, date_time=_FIXED_TIME)
    info.compress_type = method
    info.external_attr = 0o100644 << 16
    return info


def export_package(model_dir: str | Path, output: str | Path, dataset_json: Mapping | None = None, fingerprint: Mapping | None = None,
                   configurations: Sequence[str] | None = None, folds: Sequence[str | int] | None = None, name: str | None = None,
                   overwrite: bool = False, created: str | None = None, intended_use: str = INTENDED_USE) -> Path:
    """Write the model package ``output`` (a .zip, atomically) from the model folder
    ``model_dir`` (``results/<dataset>/``); returns its path. See the module docstring."""
    model_dir, output = Path(model_dir), Path(output).expanduser()
    if output.suffix.lower() != ".zip":
        raise UsageError(f"{output}: a model package must be a .zip file")
    if output.exists() and not overwrite:
        raise FileExistsError(f"{output}: exists; remove it or pass --overwrite")
    plans_path = ModelPaths(model_dir).plans
    if not plans_path.is_file():
        raise MissingArtefactError(f"{model_dir}: no plans.json; train a fold first with `autoliver train -d {model_dir.name} CONFIG FOLD`")
    plans = Plans.load(plans_path)
    plan_path = ModelPaths(model_dir).inference_plan
    plan = InferencePlan.from_json(read_json(plan_path), str(plan_path)) if plan_path.is_file() else None
    selection = select_folds(model_dir, plans, plan, configurations, folds)
    if plan is not None and not _plan_fits(plan, selection):
        log.warning("%s left out of the package: it uses configurations or folds not exported (%s); predict will need -c/-f",
                    plan_path, ", ".join(plan.configurations))
        plan = None
    package_name = plain_name(name or plans.dataset_name, "package name")
    output.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{output.name}.", dir=output.parent) as tmp:
        staging = Path(tmp)
        (staging / PLANS).write_bytes(plans_path.read_bytes())
        dj = dict(dataset_json) if dataset_json is not None else {"name": plans.dataset_name, "labels": plans.labels,
                                                                   "note": "rebuilt from plans.json: the raw dataset.json was not found"}
        (staging / DATASET_JSON).write_text(json.dumps(dj, indent=2, default=json_default) + "\n", encoding="utf-8")
        folds_info, metrics = _stage(model_dir, staging, selection, plan_path if plan is not None else None)
        files = {p.relative_to(staging).as_posix(): {"sha256": sha256_file(p), "bytes": p.stat().st_size}
                 for p in sorted(staging.rglob("*")) if p.is_file()}
        manifest = {
            "format": PACKAGE_FORMAT,
            "format_version": PACKAGE_FORMAT_VERSION,
            "name": package_name,
            "dataset": plans.dataset_name,
            "created": created or datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "autoliver_version": __version__,
            "torch_version": torch.__version__,
            "plans_hash": plans.plans_hash,
            "configurations": {c: _configuration_entry(plans, c, folds_info[c]) for c in selection},
            "data_hashes": {i: plans.data_hash(i) for i in sorted({plans.configurations[c].data_identifier for c in selection})},
            "files": files,
            "model_card": model_card(plans.dataset_name, dataset_json, fingerprint, plans.labels, metrics, plan, intended_use),
        }
        _write_zip(staging, output, manifest)
    log.info("wrote %s (%s)", output, ", ".join(f"{c} folds {' '.join(f)}" for c, f in selection.items()))
    return output


def _configuration_entry(plans: Plans, name: str, folds: Mapping[str, dict]) -> dict:
    c = plans.configurations[name]
    return {"recipe": c.recipe, "inherits_from": c.inherits_from, "network": c.network, "network_dims": c.network_dims, "stage": c.stage,
            "data_identifier": c.data_identifier, "configuration_hash": plans.configuration_hash(name), "folds": dict(folds)}


# ----------------------------------------------------------------------------- install
def _parse_manifest(data: bytes, source: str) -> dict:
    fix = "export the model again with `autoliver export_model`"
    try:
        manifest = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:  # ValueError: JSON errors, huge integers
        raise ModelPackageError(f"{source}: manifest.json is not valid JSON ({type(exc).__name__}); {fix}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != PACKAGE_FORMAT:
        raise ModelPackageError(f"{source}: not an autoliver model package (manifest format {manifest.get('format') if isinstance(manifest, dict) else None!r}); {fix}")
    version = manifest.get("format_version")
    if not isinstance(version, int) or version < 1:
        raise ModelPackageError(f"{source}: manifest format_version {version!r} is not valid; {fix}")
    if version > PACKAGE_FORMAT_VERSION:
        raise ModelPackageError(f"{source}: package format {version} was written by a newer autoliver ({manifest.get('autoliver_version')}); "
                                f"this one ({__version__}) reads format {PACKAGE_FORMAT_VERSION}: upgrade autoliver")
    files = manifest.get("files")
    if not isinstance(files, dict) or PLANS not in files or not all(
            isinstance(v, dict) and isinstance(v.get("sha256"), str) and isinstance(v.get("bytes"), int) for v in files.values()):
        raise ModelPackageError(f"{source}: manifest.json lists no valid files (each needs sha256 and bytes, plans.json among them); {fix}")
    for rel in files:
        for part in str(rel).split("/"):
            plain_name(part, "packaged file name", f"{source}: manifest.json")
    if not isinstance(manifest.get("configurations"), dict) or not manifest["configurations"]:
        raise ModelPackageError(f"{source}: manifest.json names no configuration; {fix}")
    plain_name(manifest.get("name"), "package name", f"{source}: manifest.json")
    return manifest


def read_manifest(package: str | Path, limits: ArchiveLimits = DEFAULT_LIMITS) -> tuple[dict, bytes]:
    """(the checked manifest, its bytes) of a package; ModelPackageError or ArchiveError otherwise."""
    package = Path(package)
    members = {m.name: m for m in open_checked(package, limits)}
    if MANIFEST not in members:
        raise ModelPackageError(f"{package}: no manifest.json; not an autoliver model package (make one with `autoliver export_model`)")
    data = read_member(package, members[MANIFEST], MAX_MANIFEST_BYTES)
    manifest = _parse_manifest(data, str(package))
    files = {n for n, m in members.items() if not m.is_dir}
    unexpected, missing = sorted(files - set(manifest["files"]) - {MANIFEST}), sorted(set(manifest["files"]) - files)
    problems = [f"{package}: member {n!r} is not listed in manifest.json; refused (the package was altered)" for n in unexpected]
    problems += [f"{package}: {n} is listed in manifest.json but missing from the package; export it again" for n in missing]
    if problems:
        raise ModelPackageError("; ".join(problems))
    return manifest, data


def verify_folder(folder: Path, manifest: Mapping, source: str) -> None:
    """Every file of ``manifest`` in ``folder`` with its size and sha256, nothing else, and
    plans.json giving the configuration hashes the manifest records; ModelPackageError otherwise."""
    problems = []
    for rel, entry in manifest["files"].items():
        path = folder / rel
        if not path.is_file():
            problems.append(f"{source}: {rel} missing")
        elif path.stat().st_size != entry["bytes"] or sha256_file(path) != entry["sha256"]:
            problems.append(f"{source}: member {rel!r} does not match its sha256 in manifest.json (tampered with or damaged); refused")
    extra = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() and p.relative_to(folder).as_posix() not in manifest["files"])
    problems += [f"{source}: {rel} is not part of the package" for rel in extra if rel != MANIFEST]
    if not problems:
        plans = Plans.load(folder / PLANS)
        for name, entry in manifest["configurations"].items():
            if name not in plans.configurations or plans.configuration_hash(name) != entry.get("configuration_hash"):
                problems.append(f"{source}: configuration {name!r} of manifest.json does not match the packaged plans.json; refused")
    if problems:
        raise ModelPackageError(problems[0] if len(problems) == 1 else f"{len(problems)} problems:\n" + "\n".join(f"  - {p}" for p in problems))


def _installed(target: Path, manifest: dict, manifest_bytes: bytes, source: str) -> bool:
    if not (target / MANIFEST).is_file() or (target / MANIFEST).read_bytes() != manifest_bytes:
        return False
    try:
        verify_folder(target, manifest, str(target))
    except AutoliverError as exc:
        log.warning("%s: the installed copy of %s differs from it (%s); installing again", target, source, exc)
        return False
    return True


def install_package(package: str | Path, target: str | Path, limits: ArchiveLimits = DEFAULT_LIMITS, overwrite: bool = False) -> Path:
    """Check and unpack ``package`` into the model folder ``target``; return it. The same
    package already installed there is left as it is; another model there is replaced only
    with ``overwrite``."""
    package, target = Path(package).expanduser(), Path(target).expanduser()
    manifest, manifest_bytes = read_manifest(package, limits)
    if _installed(target, manifest, manifest_bytes, str(package)):
        log.info("%s: already installed in %s", package, target)
        return target
    same_package = (target / MANIFEST).is_file() and (target / MANIFEST).read_bytes() == manifest_bytes  # damaged: repaired
    if target.exists() and (not target.is_dir() or any(target.iterdir())) and not (overwrite or same_package):
        raise ModelPackageError(f"{target}: exists and holds something other than {package}; remove it, choose another place, or overwrite it")

    def check(folder: Path) -> None:
        if (folder / MANIFEST).read_bytes() != manifest_bytes:
            raise ModelPackageError(f"{package}: manifest.json changed while it was unpacked; try again")
        verify_folder(folder, manifest, str(package))

    safe_extract(package, target, limits, check=check)  # ArchiveError for an unsafe or damaged zip
    log.info("installed %s in %s", package, target)
    return target


def resolve_model_package(path: str | Path, cache_dir: str | Path, limits: ArchiveLimits = DEFAULT_LIMITS) -> Path:
    """A model folder for ``path``: a folder is returned as it is; a package is installed
    (once) into ``cache_dir/<first 16 hex digits of its sha256>`` and that folder returned."""
    path = Path(path).expanduser()
    if path.is_dir():
        return path
    if not path.is_file():
        raise MissingArtefactError(f"{path}: no model folder or model package there")
    digest = sha256_file(path)
    return install_package(path, Path(cache_dir) / digest[:16], limits, overwrite=True)


def is_model_package(path: str | Path) -> bool:
    """Whether ``path`` is a zip with a manifest.json at its root (an autoliver model package,
    not, e.g., another tool's model export); nothing is extracted or verified here."""
    path = Path(path).expanduser()
    if not path.is_file() or not zipfile.is_zipfile(path):
        return False
    try:
        with zipfile.ZipFile(path) as zf:
            return MANIFEST in zf.namelist()
    except (zipfile.BadZipFile, OSError):
        return False


def package_name(package: str | Path) -> str:
    """The name a package installs under by default (``manifest.json`` -> ``name``)."""
    return str(read_manifest(package)[0]["name"])


__all__ = ["MANIFEST", "PACKAGE_FORMAT_VERSION", "ModelPackageError", "export_package", "install_package", "is_model_package", "package_name", "read_manifest",
           "resolve_model_package", "select_folds", "sha256_file", "verify_folder"]
