"""One function per stage, used by the CLI and the tests.

Each stage reads only the artefact written by the stage before it and records a hash of it:
fingerprint.json records the raw dataset's input hash, plans.json the fingerprint's, and each
preprocessed folder the plans'. A stale artefact is rebuilt (fingerprint) or refused.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from autoliver.errors import DatasetError, MissingArtefactError, PlanError
from autoliver.io.atomic import write_json
from autoliver.io.dataset import RawDataset
from autoliver.workspace import DATASET_NAME_RE, Workspace, resolve_dataset
from planning.plans import CONFIGURATION_NAMES, Plans

log = logging.getLogger(__name__)

DEFAULT_GPU_MEMORY_GB = 8.0


@dataclass(frozen=True)
class StageOptions:
    """Options shared by the stages: parallel workers, progress bars, redo finished work."""

    n_jobs: int = 1
    progress: bool = True
    overwrite: bool = False


@dataclass
class PreprocessSummary:
    dataset: str
    fingerprint_path: Path
    plans_path: Path
    folders: dict[str, Path] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    cases: dict[str, dict] = field(default_factory=dict)


def validate(dataset_spec: str | Path, workspace: Workspace, options: StageOptions = StageOptions()) -> RawDataset:
    """Check a raw dataset completely; raise one DatasetError listing every problem."""
    from autoliver.validate import validate_dataset

    root = resolve_dataset(dataset_spec, workspace)
    dataset, problems = validate_dataset(root, n_jobs=options.n_jobs, progress=options.progress)
    if problems or dataset is None:
        raise DatasetError(problems)
    log.info("%s: %d training and %d test cases, all valid", root, len(dataset.training), len(dataset.test))
    return dataset


def convert(source_format: str, source: str | Path, output: str | Path, workspace: Workspace, overwrite: bool = False, progress: bool = True) -> Path:
    """Convert an MSD Task03 or LiTS folder into a raw dataset.

    ``output`` is a path, or a bare ``DatasetNNN_Name`` that goes under the workspace's raw/.
    """
    from autoliver.io.convert import convert_lits, convert_msd

    out = Path(output)
    if len(out.parts) == 1 and DATASET_NAME_RE.match(out.name):
        out = workspace.raw / out.name
    converters = {"msd": convert_msd, "lits": convert_lits}
    if source_format not in converters:
        raise ValueError(f"unknown source format {source_format!r}; choose one of {sorted(converters)}")
    return converters[source_format](Path(source), out, overwrite=overwrite, progress=progress)


def fingerprint(dataset: RawDataset, workspace: Workspace, options: StageOptions = StageOptions()) -> tuple[dict, Path]:
    """Write (or reuse) ``preprocessed/<dataset>/fingerprint.json``.

    An existing fingerprint is reused when its input hash matches the dataset's files.
    """
    from autoliver.fingerprint import dataset_input_hash, extract_fingerprint
    from planning.fingerprint import load_fingerprint

    path = workspace.preprocessed(dataset.name) / "fingerprint.json"
    input_hash = dataset_input_hash(dataset)
    if path.is_file() and not options.overwrite:
        existing = load_fingerprint(path)
        if existing.get("input_hash") == input_hash:
            log.info("fingerprint up to date: %s", path)
            return existing, path
        log.info("dataset changed since %s was written: measuring it again", path)
    fp = extract_fingerprint(dataset, n_jobs=options.n_jobs, progress=options.progress)
    write_json(path, fp)
    log.info("wrote %s", path)
    return fp, path


def detect_gpu_memory_gb() -> float | None:
    """Total memory of the first CUDA device in GB, or None without one."""
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a core dependency
        return None
    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_properties(0).total_memory / 1024**3


def machine_ram_gb() -> float:
    import psutil

    return psutil.virtual_memory().total / 1024**3


def plan(fp: dict, device: str = "gpu", gpu_memory_gb: float | None = None) -> Plans:
    """Plan every configuration for a GPU budget (flag, detected, else 8 GB) or this machine's RAM."""
    from planning.planner import plan_experiment

    if device not in ("gpu", "cpu"):
        raise ValueError(f"device must be 'gpu' or 'cpu', got {device!r}")
    if gpu_memory_gb is not None and not gpu_memory_gb > 0:
        raise ValueError(f"--gpu-memory must be a positive number of GB, got {gpu_memory_gb}")
    if device == "gpu":
        budget = gpu_memory_gb or detect_gpu_memory_gb() or DEFAULT_GPU_MEMORY_GB
        return plan_experiment(fp, memory_gb=budget, device="gpu")
    return plan_experiment(fp, device="cpu", cpu_ram_gb=machine_ram_gb())


def write_plans(plans: Plans, path: Path) -> None:
    write_json(path, plans.to_json())
    log.info("wrote %s", path)


def load_plans(workspace: Workspace, dataset_name: str) -> Plans:
    path = workspace.preprocessed(dataset_name) / "plans.json"
    if not path.is_file():
        raise MissingArtefactError(f"{path}: not found; run `autoliver plan_and_preprocess {dataset_name}` first")
    return Plans.load(path)


def plan_and_preprocess(
    dataset_spec: str | Path,
    workspace: Workspace,
    configurations: list[str] | None = None,
    device: str = "gpu",
    gpu_memory_gb: float | None = None,
    options: StageOptions = StageOptions(),
) -> PreprocessSummary:
    """validate -> fingerprint -> plans -> preprocessed data for the chosen configurations."""
    from autoliver.preprocess.runner import preprocess_dataset

    t0 = time.perf_counter()
    dataset = validate(dataset_spec, workspace, options)
    t_validate = time.perf_counter()
    fp, fp_path = fingerprint(dataset, workspace, options)
    t_fp = time.perf_counter()
    plans = plan(fp, device=device, gpu_memory_gb=gpu_memory_gb)
    plans_path = workspace.preprocessed(dataset.name) / "plans.json"
    write_plans(plans, plans_path)

    wanted = list(configurations) if configurations else list(plans.configurations)
    unknown = [c for c in wanted if c not in plans.configurations]
    if unknown:
        known = ", ".join(plans.configurations)
        hint = " (3d_lowres and 3d_cascade_fullres are planned only for images much larger than the patch)" if set(unknown) & {"3d_lowres", "3d_cascade_fullres"} else ""
        raise PlanError(f"configuration(s) {', '.join(unknown)} not in {plans_path}; planned: {known}{hint}")
    data_ids = sorted({plans.configurations[c].data_identifier for c in wanted})
    out_root = workspace.preprocessed(dataset.name)
    result = preprocess_dataset(
        dataset, plans, out_root, data_identifiers=data_ids, n_jobs=options.n_jobs, overwrite=options.overwrite, progress=options.progress
    )
    t_end = time.perf_counter()
    summary = PreprocessSummary(dataset.name, fp_path, plans_path)
    summary.folders = {d: out_root / d for d in data_ids}
    summary.seconds = {"validate": t_validate - t0, "fingerprint": t_fp - t_validate, "preprocess": t_end - t_fp, "total": t_end - t0}
    summary.cases = result if isinstance(result, dict) else {}
    return summary


__all__ = [
    "CONFIGURATION_NAMES",
    "StageOptions",
    "validate",
    "convert",
    "fingerprint",
    "plan",
    "write_plans",
    "load_plans",
    "plan_and_preprocess",
]
