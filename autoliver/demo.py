"""``autoliver demo``: the whole pipeline on a fresh machine, on the CPU, in minutes.

Steps (each one resumes: a re-run skips what is finished):

1. a raw dataset under ``<workspace>/raw/Dataset099_Demo`` from the real CT cases shipped in
   ``autoliver/examples`` (sources and licences in its README) plus synthetic phantoms, and a
   held-out test set under ``<workspace>/demo/test``: one real NIfTI case, one real DICOM series
   and one phantom with tumours, each with its reference label;
2. validate, plan_and_preprocess for this CPU;
3. a short training of one configuration on every training case (fold ``all``);
4. prediction of the held-out cases (``demo/predictions``);
5. evaluation against the references (``demo/evaluation``) and the HTML report
   (``demo/report.html``).

The model sees a handful of cases for a few minutes: the demo shows the pipeline working end
to end, it is not a clinically useful model, and the summary says so.
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from autoliver.core.errors import UsageError
from autoliver.core.layout import DATASET_JSON, Workspace
from autoliver.examples import DICOM_DIR, image_path, label_path
from autoliver.examples.dataset import build_example_dataset, write_phantom_case
from autoliver.io.atomic import atomic_dir

log = logging.getLogger(__name__)

DATASET = "Dataset099_Demo"
TRAIN_REAL = ("lits117_128cube", "totalseg_example_ct_full", "dcmqi_ct3slice")
TEST_NIFTI = ("chaos_ct_sample",)
TEST_DICOM = ("totalseg_example_dicom20",)
TEST_SEED = 1000  # phantom seeds of the test set start here, far from the training ones
HONESTY = ("The demo model was trained for a few minutes on {n} cases ({real} real, {phantoms} synthetic): "
           "it shows the pipeline working end to end; it is not a clinically useful model.")


@dataclass(frozen=True)
class DemoOptions:
    minutes: float = 9.0  # training budget
    configuration: str = "2d"
    n_phantoms: int = 6
    phantom_shape: tuple[int, int, int] = (96, 160, 160)
    phantom_spacing: tuple[float, float, float] = (2.5, 1.6, 1.6)
    quick: bool = False  # a few training iterations only (tests, CI)
    device: str = "cpu"
    n_jobs: int = 2
    progress: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.minutes > 0:
            raise UsageError(f"--minutes must be positive, got {self.minutes}")
        if self.n_phantoms < 1:
            raise UsageError(f"--phantoms must be >= 1, got {self.n_phantoms}")


@dataclass
class DemoSummary:
    workspace: Path
    dataset: Path
    model_dir: Path
    predictions: Path
    evaluation: Path
    report: Path | None
    n_train_real: int
    n_train_phantoms: int
    test_cases: list[str]
    metrics: dict = field(default_factory=dict)  # the evaluation summary
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def honesty(self) -> str:
        n = self.n_train_real + self.n_train_phantoms
        return HONESTY.format(n=n, real=self.n_train_real, phantoms=self.n_train_phantoms)


def build_test_set(root: Path, options: DemoOptions) -> list[str]:
    """``root/images`` (NIfTI files and a DICOM series folder) and ``root/labels``; built in a
    sibling folder and renamed, so an interrupted build leaves nothing. Returns the case ids."""
    root = Path(root)
    cases = [*TEST_NIFTI, *TEST_DICOM, "phantom_test_000"]
    if (root / "labels").is_dir() and all((root / "labels" / f"{c}.nii.gz").is_file() for c in cases):
        return cases
    with atomic_dir(root) as tmp:
        (tmp / "images").mkdir()
        (tmp / "labels").mkdir()
        for case in TEST_NIFTI:
            shutil.copyfile(image_path(case), tmp / "images" / f"{case}_0000.nii.gz")
            shutil.copyfile(label_path(case), tmp / "labels" / f"{case}.nii.gz")
        for case in TEST_DICOM:
            shutil.copytree(DICOM_DIR / case, tmp / "images" / case)
            shutil.copyfile(label_path(case), tmp / "labels" / f"{case}.nii.gz")
        write_phantom_case(tmp / "images", tmp / "labels", "phantom_test_000", options.phantom_shape, options.phantom_spacing,
                           np.random.default_rng([options.seed, TEST_SEED]), n_tumours=3)
    return cases


def _train_options(options: DemoOptions):
    from autoliver.train.options import TrainOptions

    if options.quick:
        return TrainOptions(epochs=2, iters_per_epoch=4, val_iters=1, device=options.device, progress=options.progress,
                            n_workers=0, seed=options.seed)
    return TrainOptions(budget_minutes=options.minutes, device=options.device, progress=options.progress, seed=options.seed)


def _predict_options(options: DemoOptions):
    from autoliver.infer.runner import PredictOptions

    if options.quick:  # no test-time augmentation, non-overlapping tiles
        return PredictOptions(tta=False, step=1.0, progress=options.progress)
    return PredictOptions(progress=options.progress)


def run_demo(workspace: Workspace, options: DemoOptions = DemoOptions()) -> DemoSummary:
    """Run every step (see the module docstring); returns where everything is."""
    from autoliver import api

    seconds: dict[str, float] = {}
    t = time.perf_counter()
    raw = workspace.raw / DATASET
    if not (raw / DATASET_JSON).is_file():
        build_example_dataset(raw, real_cases=TRAIN_REAL, n_phantoms=options.n_phantoms, phantom_shape=options.phantom_shape,
                              phantom_spacing=options.phantom_spacing, seed=options.seed)
    demo_dir = workspace.root / "demo"
    test_cases = build_test_set(demo_dir / "test", options)
    seconds["data"] = time.perf_counter() - t

    stage = api.StageOptions(n_jobs=options.n_jobs, progress=options.progress)
    t = time.perf_counter()
    api.plan_and_preprocess(DATASET, workspace, configurations=[options.configuration], device="cpu", options=stage)
    seconds["plan_and_preprocess"] = time.perf_counter() - t

    t = time.perf_counter()
    model_dir = workspace.results(DATASET)
    fold = workspace.dataset(DATASET).model.fold(options.configuration, "all")
    if fold.final.is_file():
        log.info("%s: already trained, skipping training", fold.root)
    else:
        api.train(DATASET, options.configuration, "all", workspace, _train_options(options))
    seconds["train"] = time.perf_counter() - t

    t = time.perf_counter()
    predictions = demo_dir / "predictions"
    summary = api.predict(demo_dir / "test" / "images", predictions, workspace, model_dir=model_dir, configuration=options.configuration,
                          device=options.device, options=_predict_options(options))
    if summary.failed:
        raise RuntimeError(f"demo prediction failed for {', '.join(summary.failed)}: {summary.failed}")
    seconds["predict"] = time.perf_counter() - t

    t = time.perf_counter()
    evaluation_dir = demo_dir / "evaluation"
    result = api.evaluate(demo_dir / "test" / "labels", predictions, evaluation_dir, n_jobs=1, progress=options.progress)
    seconds["evaluate"] = time.perf_counter() - t

    t = time.perf_counter()
    report = demo_dir / "report.html"
    api.report_predictions(predictions, demo_dir / "test" / "images", report, evaluation=evaluation_dir, model_dir=model_dir,
                           progress=options.progress)
    seconds["report"] = time.perf_counter() - t
    seconds["total"] = sum(seconds.values())
    return DemoSummary(workspace.root, raw, model_dir, predictions, evaluation_dir, report, len(TRAIN_REAL), options.n_phantoms,
                       test_cases, result.get("summary", {}), seconds)
