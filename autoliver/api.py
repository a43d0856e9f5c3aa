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
from typing import TYPE_CHECKING

from autoliver.core.errors import PlanError, UsageError
from autoliver.core.layout import DATASET_NAME_RE, Workspace, dataset_name, inside, resolve_dataset
from autoliver.io.atomic import write_json
from autoliver.io.dataset import RawDataset
from autoliver.train.options import TrainOptions
from planning.plans import CONFIGURATION_NAMES, Plans

if TYPE_CHECKING:  # prediction imports torch: only when it is used
    from autoliver.infer.runner import PredictOptions, PredictSummary

log = logging.getLogger(__name__)


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
    from autoliver.io.validate import check_dataset

    root = resolve_dataset(dataset_spec, workspace)
    dataset = check_dataset(root, n_jobs=options.n_jobs, progress=options.progress)
    log.info("%s: %d training and %d test cases, all valid", root, len(dataset.training), len(dataset.test))
    return dataset


def convert(source_format: str, source: str | Path, output: str | Path, workspace: Workspace, overwrite: bool = False, progress: bool = True,
            mapping: dict[str, int] | None = None, case_ids: str | None = None) -> Path:
    """Convert an MSD Task03 or LiTS folder, or a folder of DICOM CT series with their DICOM-SEG
    files (``dicom-seg``: segments mapped to labels by ``mapping`` or by their names and codes,
    case ids from ``case_ids``: patient, study, series or index), into a raw dataset.

    ``output`` is a path, or a bare ``DatasetNNN_Name`` that goes under the workspace's raw/.
    """
    from autoliver.io.convert import convert_lits, convert_msd

    out = Path(output)
    if len(out.parts) == 1 and DATASET_NAME_RE.match(out.name):
        out = workspace.raw / out.name
    if source_format == "dicom-seg":
        from autoliver.io.dicom_seg_convert import convert_dicom_seg

        return convert_dicom_seg(Path(source), out, mapping, case_ids=case_ids or "patient", overwrite=overwrite, progress=progress)
    if mapping is not None or case_ids is not None:
        raise UsageError("--mapping and --case-ids go with --from dicom-seg")
    converters = {"msd": convert_msd, "lits": convert_lits}
    if source_format not in converters:
        raise UsageError(f"unknown source format {source_format!r}; choose one of {sorted(converters) + ['dicom-seg']}")
    return converters[source_format](Path(source), out, overwrite=overwrite, progress=progress)


def fingerprint(dataset: RawDataset, workspace: Workspace, options: StageOptions = StageOptions()) -> tuple[dict, Path]:
    """Write (or reuse) ``preprocessed/<dataset>/fingerprint.json``.

    An existing fingerprint is reused when its input hash matches the dataset's files.
    """
    from autoliver.preprocess.fingerprint import dataset_input_hash, extract_fingerprint
    from planning.fingerprint import load_fingerprint

    path = workspace.dataset(dataset.name).fingerprint
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
        raise UsageError(f"device must be 'gpu' or 'cpu', got {device!r}")
    if gpu_memory_gb is not None and not gpu_memory_gb > 0:
        raise UsageError(f"--gpu-memory must be a positive number of GB, got {gpu_memory_gb}")
    if device == "gpu":
        budget = gpu_memory_gb or detect_gpu_memory_gb()  # None: the planner's default (8 GB)
        return plan_experiment(fp, memory_gb=budget, device="gpu")
    return plan_experiment(fp, device="cpu", cpu_ram_gb=machine_ram_gb())


def write_plans(plans: Plans, path: Path) -> None:
    write_json(path, plans.to_json())
    log.info("wrote %s", path)


def load_plans(workspace: Workspace, dataset_spec: str | Path) -> Plans:
    from autoliver.io.plans_file import load_plans as load

    return load(workspace.dataset(dataset_name(dataset_spec, workspace)))


def with_recipes(plans: Plans, recipes: list[str] | tuple[str, ...], overrides: dict | None = None,
                 fingerprint: dict | None = None) -> Plans:
    """``plans`` with each recipe's configurations derived and sized for the plans' memory budget
    (``fingerprint``: its class fractions give median-frequency class weights where a recipe asks)."""
    from autoliver.nets.sizing import size_plans
    from planning.recipes import RECIPES, derive

    for name in recipes:
        if name not in RECIPES:
            raise UsageError(f"unknown recipe {name!r}; shipped: {', '.join(RECIPES)} (see `autoliver recipes`)")
        fractions = (fingerprint or {}).get("class_fractions")
        plans = size_plans(derive(plans, name, overrides, fractions), RECIPES[name].configuration_names)
        for c in RECIPES[name].configuration_names:
            note = plans.configurations[c].extra.get("sizing", "")
            (log.warning if not plans.configurations[c].extra.get("fits_budget", True) else log.info)("%s: %s", c, note)
    return plans


def _recipes_in(path: Path) -> list[str]:
    """The recipes whose configurations an existing plans.json holds (kept when re-planning)."""
    if not path.is_file():
        return []
    try:
        old = Plans.load(path)
    except PlanError:
        return []
    return list(dict.fromkeys(c.recipe for c in old.configurations.values() if c.recipe))


def plan_and_preprocess(
    dataset_spec: str | Path,
    workspace: Workspace,
    configurations: list[str] | None = None,
    device: str = "gpu",
    gpu_memory_gb: float | None = None,
    options: StageOptions = StageOptions(),
    recipes: list[str] | None = None,
) -> PreprocessSummary:
    """validate -> fingerprint -> plans (plus the recipes' configurations) -> preprocessed data
    for the chosen configurations. Recipes added earlier are derived again on the new plan."""
    from autoliver.preprocess.runner import preprocess_dataset

    t0 = time.perf_counter()
    dataset = validate(dataset_spec, workspace, options)
    t_validate = time.perf_counter()
    fp, fp_path = fingerprint(dataset, workspace, options)
    t_fp = time.perf_counter()
    plans_path = workspace.dataset(dataset.name).plans
    kept = _recipes_in(plans_path)
    plans = with_recipes(plan(fp, device=device, gpu_memory_gb=gpu_memory_gb), list(dict.fromkeys(kept + list(recipes or []))),
                         fingerprint=fp)
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
    summary.cases = result
    return summary


def add_configuration(dataset_spec: str | Path, workspace: Workspace, recipes: list[str], overrides: dict | None = None,
                      options: StageOptions = StageOptions()) -> PreprocessSummary:
    """Add recipes' configurations to an already planned dataset and preprocess the data
    folders they need (configurations already there, and their trained folds, stay valid)."""
    from autoliver.io.plans_file import load_plans as load
    from autoliver.preprocess.runner import preprocess_dataset
    from planning.fingerprint import load_fingerprint
    from planning.recipes import RECIPES

    t0 = time.perf_counter()
    dataset = validate(dataset_spec, workspace, options)
    paths = workspace.dataset(dataset.name)
    fp = load_fingerprint(paths.fingerprint) if paths.fingerprint.is_file() else None
    plans = with_recipes(load(paths), recipes, overrides, fingerprint=fp)
    write_plans(plans, paths.plans)
    names = [c for r in recipes for c in RECIPES[r].configuration_names]
    data_ids = sorted({plans.configurations[c].data_identifier for c in names})
    result = preprocess_dataset(dataset, plans, paths.preprocessed, data_identifiers=data_ids, n_jobs=options.n_jobs,
                                overwrite=options.overwrite, progress=options.progress)
    summary = PreprocessSummary(dataset.name, paths.fingerprint, paths.plans)
    summary.folders = {d: paths.data(d) for d in data_ids}
    summary.seconds = {"total": time.perf_counter() - t0}
    summary.cases = result
    return summary


def write_splits(dataset_spec: str | Path, workspace: Workspace, n_folds: int, overwrite: bool = False) -> Path:
    """Write ``results/<dataset>/splits.json`` with ``n_folds`` folds of the raw dataset's training cases."""
    from autoliver.train.splits import write_new_splits

    dataset = validate(dataset_spec, workspace, StageOptions(progress=False))
    _, path = write_new_splits(workspace.dataset(dataset.name).results, [c.case_id for c in dataset.training], n_folds, overwrite)
    return path


def train(dataset_spec: str | Path, configuration: str, fold: int | str, workspace: Workspace, options: TrainOptions | None = None,
          dist=None, components=None):
    """Train one fold of one configuration (see ``autoliver.train.setup.train_fold``)."""
    from autoliver.train.setup import train_fold

    return train_fold(workspace.dataset(dataset_name(dataset_spec, workspace)), configuration, fold, options, dist, components)


def resolve_model_dir(workspace: Workspace, model_dir: str | Path | None = None, dataset_spec: str | Path | None = None) -> Path:
    """``-m MODEL_DIR`` as given, else ``results/<dataset>`` of the workspace for ``-d DATASET``."""
    if (model_dir is None) == (dataset_spec is None):
        raise UsageError("give exactly one of a model folder (-m MODEL_DIR) and a dataset (-d DATASET)")
    if model_dir is not None:
        from autoliver.io.model_package import is_model_package, resolve_model_package

        path = Path(model_dir).expanduser().resolve()
        if not is_model_package(path):
            return path
        if workspace is None:
            raise UsageError(f"{path}: a model package needs a workspace to be installed in (--workspace), or install it first with `autoliver install_model`")
        return resolve_model_package(path, workspace.models / ".cache")
    return workspace.results(dataset_name(dataset_spec, workspace))


def predict(input_path: str | Path, output: str | Path, workspace: Workspace, model_dir: str | Path | None = None,
            dataset_spec: str | Path | None = None, configuration: str | list[str] | None = None, folds: list[str] | None = None,
            device: str = "auto", options: PredictOptions | None = None,
            checkpoint: str = "checkpoint_final.pth") -> PredictSummary:
    """Segment every case of ``input_path`` (file, folder of images, DICOM series folders) into
    ``output``: ``<case>.nii.gz`` in the input's geometry and ``<case>.json`` (the report).

    ``configuration``: one or several (an ensemble: softmax averaged); without it and
    ``folds``, the model folder's inference_plan.json (configurations, folds, post-processing),
    else the first trained configuration. ``options`` is an
    ``autoliver.infer.runner.PredictOptions``; returns a ``PredictSummary`` whose ``failed``
    lists the cases that could not be predicted.

    ``model_dir`` may also be a model trained by nnU-Net v2 (its ``Trainer__Plans__config``
    folder, a folder holding such folders, or its export zip): it is then predicted with
    nnU-Net's own preprocessing and tiling (``autoliver.infer.nnunet_model``), ``checkpoint``
    per fold (default ``checkpoint_final.pth``, else ``checkpoint_best.pth``); ``configuration``
    picks one model when there are several.
    """
    from autoliver.infer.ensemble import load_ensemble
    from autoliver.infer.nnunet_model import is_nnunet_model, load_nnunet_model
    from autoliver.infer.runner import PredictOptions, predict_inputs

    options = options or PredictOptions()
    if model_dir is not None and is_nnunet_model(Path(model_dir).expanduser()):
        configs = [configuration] if isinstance(configuration, str) else list(configuration or [])
        if len(configs) > 1:
            raise UsageError(f"{model_dir}: an nnU-Net model is predicted one configuration at a time; got {', '.join(configs)}")
        model = load_nnunet_model(Path(model_dir).expanduser(), folds, checkpoint, device, configs[0] if configs else None,
                                  options.precision)
        return predict_inputs(model, input_path, output, options)
    ensemble = load_ensemble(resolve_model_dir(workspace, model_dir, dataset_spec), configuration, folds, device, options.precision,
                             engine=options.engine)
    return predict_inputs(ensemble, input_path, output, options)


def report_predictions(predictions: str | Path, images: str | Path, output: str | Path, references: str | Path | None = None,
                       evaluation: str | Path | list[str | Path] | None = None, model_dir: str | Path | None = None,
                       n_jobs: int = 1, progress: bool = True, image_size: int = 320) -> Path:
    """Write the HTML report of a prediction folder (see ``autoliver.report.build``); returns its path.

    ``evaluation``: one or several ``autoliver evaluate`` output folders; without one, metrics
    are computed from ``references`` when given.
    """
    from autoliver.report.build import build_prediction_report
    from autoliver.report.html import write_report

    evaluations = [] if evaluation is None else [evaluation] if isinstance(evaluation, (str, Path)) else list(evaluation)
    data = build_prediction_report(predictions, images, references=references, evaluations=evaluations, model_dir=model_dir,
                                   n_jobs=n_jobs, progress=progress, max_px=image_size)
    return write_report(data, output)


def report_dataset(dataset_spec: str | Path, output: str | Path, workspace: Workspace, model_dir: str | Path | None = None,
                   n_jobs: int = 1, progress: bool = True, image_size: int = 320) -> Path:
    """Write the HTML report of a raw dataset's training cases and labels; returns its path."""
    from autoliver.report.build import build_dataset_report
    from autoliver.report.html import write_report

    data = build_dataset_report(resolve_dataset(dataset_spec, workspace), model_dir=model_dir, n_jobs=n_jobs, progress=progress,
                                max_px=image_size)
    return write_report(data, output)


def evaluate(reference_dir: str | Path, prediction_dir: str | Path, output_dir: str | Path | None = None,
             n_jobs: int = 1, progress: bool = True, missing: str = "error") -> dict:
    """Score predicted label maps against references (liver, tumour, lesion detection, tumour
    burden); write evaluation.csv/json to ``output_dir`` when given; return the evaluation dict.
    ``missing="empty"`` scores a reference case without a prediction as an empty prediction."""
    from autoliver.evaluate import evaluate_folders

    return evaluate_folders(reference_dir, prediction_dir, output_dir, n_jobs=n_jobs, progress=progress, missing=missing)


def submit(prediction_dir: str | Path, output: str | Path, test_dir: str | Path | None = None,
           options: StageOptions = StageOptions()) -> Path:
    """Build a LiTS leaderboard zip (test-segmentation-N.nii) from ``autoliver predict`` output;
    ``test_dir`` (the test-volume-N.nii folder) checks completeness and geometry."""
    from autoliver.evaluate.submit import build_submission

    return build_submission(prediction_dir, output, test_dir, overwrite=options.overwrite, progress=options.progress)


def check_submission(path: str | Path, test_dir: str | Path | None = None, n_cases: int | None = None,
                     options: StageOptions = StageOptions()) -> list[str]:
    """Every problem of a LiTS submission zip or folder (an empty list: valid)."""
    from autoliver.evaluate.submit import check_submission as check

    return check(path, test_dir, n_cases=n_cases, progress=options.progress)


def find_best_configuration(dataset_spec: str | Path, workspace: Workspace, configurations: list[str] | None = None,
                            options: StageOptions = StageOptions(), crf: bool = True):
    """Score every trained configuration and ensemble on cross-validation, decide the
    post-processing (the dense CRF only with ``crf``) and write
    ``results/<dataset>/inference_plan.json``; returns the ``autoliver.selection.SelectionResult``."""
    from autoliver.selection import find_best_configuration as select

    paths = workspace.dataset(dataset_name(dataset_spec, workspace))
    return select(paths.preprocessed, paths.results, configurations, progress=options.progress,
                  crf_grid=None if crf else [])


def compare(dataset_spec: str | Path, workspace: Workspace, configurations: list[str], budget_minutes: float,
            folds: tuple[int | str, ...] = (0,), device: str = "auto", n_workers: int = 0, progress: bool = True, isolate: bool = True,
            train_overrides: dict | None = None) -> tuple[dict, Path]:
    """Train ``configurations`` on the same folds for the same budget, score their held-out
    cases and measure them; writes ``results/<dataset>/compare/`` (compare.json, compare.csv,
    compare.html). Returns (the result, the HTML page). Finished folds are not trained again."""
    from autoliver.report.compare_page import write_compare_page
    from autoliver.selection.compare import CompareOptions, compare_configurations

    paths = workspace.dataset(dataset_name(dataset_spec, workspace))
    options = CompareOptions(budget_minutes=budget_minutes, folds=tuple(folds), device=device, n_workers=n_workers, progress=progress,
                             isolate=isolate, train_overrides=dict(train_overrides or {}))
    result = compare_configurations(paths, list(dict.fromkeys(configurations)), options)
    return result, write_compare_page(result, paths.model.root / "compare" / "compare.html")


def postprocess(input_dir: str | Path, output_dir: str | Path, plan_path: str | Path, images_dir: str | Path | None = None,
                options: StageOptions = StageOptions()):
    """Apply an inference plan's post-processing to existing predictions; returns the
    ``autoliver.infer.postprocess_folder.PostprocessSummary``."""
    from autoliver.infer.postprocess_folder import postprocess_folder

    return postprocess_folder(input_dir, output_dir, plan_path, images_dir=images_dir, overwrite=options.overwrite, progress=options.progress)


def export_model(dataset_spec: str | Path, workspace: Workspace, configurations: list[str] | None = None, folds: list[str] | None = None,
                 output: str | Path = "model.zip", name: str | None = None, overwrite: bool = False) -> Path:
    """Write a self-contained model package (``autoliver.io.model_package``) of the dataset's
    model folder: plans, inference plan, dataset.json, weights-only checkpoints of the chosen
    configurations' folds (default: the inference plan's, else every trained one) and a
    manifest with hashes and a model card; returns the package's path."""
    from autoliver.core.errors import DatasetError
    from autoliver.io.jsonfile import read_json
    from autoliver.io.model_package import export_package

    paths = workspace.dataset(dataset_name(dataset_spec, workspace))
    dataset_json = None
    try:
        raw_json = resolve_dataset(paths.name, workspace) / "dataset.json"
    except DatasetError:  # artefacts copied without the raw dataset
        raw_json = None
    if raw_json is not None and raw_json.is_file():
        dataset_json = read_json(raw_json, PlanError, "fix it or run `autoliver validate`")
    else:
        log.warning("%s: no raw dataset.json in the workspace; the package's dataset.json is rebuilt from plans.json", paths.name)
    fingerprint = read_json(paths.fingerprint, PlanError, "run `autoliver plan_and_preprocess`") if paths.fingerprint.is_file() else None
    return export_package(paths.results, output, dataset_json, fingerprint, configurations, folds, name=name, overwrite=overwrite)


def install_model(package: str | Path, workspace: Workspace | None = None, target: str | Path | None = None, overwrite: bool = False) -> Path:
    """Check and unpack a model package into ``target`` (default: ``<workspace>/models/<package
    name>/``); returns the model folder, usable as ``predict -m``. Installing the same package
    again changes nothing; a tampered or unsafe package is refused and nothing is written."""
    from autoliver.io.model_package import install_package, package_name

    if (workspace is None) == (target is None):
        raise UsageError("give exactly one of a workspace (--workspace) and a target folder (-o)")
    folder = Path(target) if target is not None else inside(workspace.models, package_name(package), "package name")
    return install_package(package, folder, overwrite=overwrite)


__all__ = [
    "CONFIGURATION_NAMES",
    "StageOptions",
    "TrainOptions",
    "validate",
    "convert",
    "fingerprint",
    "plan",
    "write_plans",
    "load_plans",
    "plan_and_preprocess",
    "with_recipes",
    "add_configuration",
    "train",
    "resolve_model_dir",
    "evaluate",
    "submit",
    "check_submission",
    "predict",
    "report_predictions",
    "report_dataset",
    "find_best_configuration",
    "postprocess",
    "compare",
    "write_splits",
    "export_model",
    "install_model",
]
