"""The `autoliver` command. The only place that reads environment variables, parses arguments
and configures logging."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from autoliver import __version__
from autoliver.core import faults
from autoliver.core.errors import AutoliverError, UsageError
from autoliver.core.parallel import cluster

log = logging.getLogger("autoliver")

WORKSPACE_ENV = "AUTOLIVER_WORKSPACE"
DEFAULT_WORKSPACE = "autoliver_workspace"
WORKSPACE_HELP = f"workspace root (raw/, preprocessed/, results/); default ${WORKSPACE_ENV}, else ./{DEFAULT_WORKSPACE}"


def _workspace(args: argparse.Namespace):
    from autoliver.core.layout import Workspace

    root = args.workspace or os.environ.get(WORKSPACE_ENV)
    if not root:
        root = DEFAULT_WORKSPACE
        log.info("no --workspace and no %s set: using ./%s", WORKSPACE_ENV, DEFAULT_WORKSPACE)
    return Workspace(Path(root).expanduser().resolve())


def _options(args: argparse.Namespace):
    from autoliver.api import StageOptions

    return StageOptions(
        n_jobs=max(1, getattr(args, "np", 1) or 1),
        progress=not getattr(args, "no_progress", False),
        overwrite=getattr(args, "overwrite", False),
    )


def cmd_validate(args: argparse.Namespace) -> int:
    from autoliver import api

    dataset = api.validate(_dataset(args), _workspace(args), _options(args))
    print(f"{dataset.root}: valid ({len(dataset.training)} training, {len(dataset.test)} test cases)")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from autoliver import api

    mapping = None
    if args.mapping:
        from autoliver.io.dicom_seg_codes import parse_mapping

        mapping = parse_mapping(args.mapping)
    out = api.convert(args.source_format, args.source, args.output, _workspace(args), overwrite=args.overwrite, progress=not args.no_progress,
                      mapping=mapping, case_ids=args.case_ids)
    print(f"wrote raw dataset {out}")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from autoliver import api
    from planning.fingerprint import load_fingerprint
    from planning.table import plans_table

    fp_path = Path(args.fingerprint)
    plans = api.plan(load_fingerprint(fp_path), device=args.device, gpu_memory_gb=args.gpu_memory)
    out = Path(args.output) if args.output else fp_path.with_name("plans.json")
    api.write_plans(plans, out)
    print(plans_table(plans))
    print(f"wrote {out}")
    return 0


def cmd_plan_and_preprocess(args: argparse.Namespace) -> int:
    from autoliver import api
    from planning.plans import Plans
    from planning.table import plans_table

    summary = api.plan_and_preprocess(
        _dataset(args),
        _workspace(args),
        configurations=args.configurations,
        device=args.device,
        gpu_memory_gb=args.gpu_memory,
        options=_options(args),
        recipes=args.recipes,
    )
    print(plans_table(Plans.load(summary.plans_path)))
    _print_summary(summary)
    return 0


def _print_summary(summary) -> None:
    print(f"fingerprint: {summary.fingerprint_path}")
    print(f"plans:       {summary.plans_path}")
    for data_id, folder in summary.folders.items():
        print(f"data {data_id:>8}: {folder}")
    print("time: " + ", ".join(f"{k} {v:.1f} s" for k, v in summary.seconds.items()))


def cmd_compare(args: argparse.Namespace) -> int:
    from autoliver import api
    from autoliver.selection.compare import table

    result, page = api.compare(_dataset(args), _workspace(args), args.configurations, args.budget_minutes, tuple(args.folds),
                               device=args.device, n_workers=args.np_workers, progress=not args.no_progress)
    print(table(result))
    print(f"page: {page}")
    print(f"data: {page.with_name('compare.json')}, {page.with_name('compare.csv')}")
    return 0


def cmd_splits(args: argparse.Namespace) -> int:
    from autoliver import api

    path = api.write_splits(_dataset(args), _workspace(args), args.folds, overwrite=args.overwrite)
    print(f"splits: {path} ({args.folds} folds)")
    return 0


def cmd_recipes(args: argparse.Namespace) -> int:
    from planning.recipes import RECIPES

    for r in RECIPES.values():
        print(f"{r.name:<20} {', '.join(r.configuration_names)}")
        print(f"{'':<20} {r.summary}")
        print(f"{'':<20} follows: {r.source}" + (f"; the paper also applies: {', '.join(r.postprocessing)}" if r.postprocessing else ""))
    return 0


def cmd_add_configuration(args: argparse.Namespace) -> int:
    from autoliver import api
    from planning.plans import Plans
    from planning.table import plans_table

    overrides = {"patch_size": args.patch} if args.patch else None
    summary = api.add_configuration(_dataset(args), _workspace(args), args.recipe, overrides, _options(args))
    plans = Plans.load(summary.plans_path)
    print(plans_table(plans))
    for c in plans.configurations.values():
        if c.recipe in args.recipe:
            print(f"{c.name}: {c.extra.get('sizing', '')}")
    _print_summary(summary)
    return 0


def cmd_example_dataset(args: argparse.Namespace) -> int:
    from autoliver.examples.dataset import build_example_dataset

    ws = _workspace(args)
    out = build_example_dataset(
        ws.raw / args.name,
        n_phantoms=args.phantoms,
        phantom_shape=tuple(args.phantom_shape),
        seed=args.seed,
        overwrite=args.overwrite,
    )
    print(f"wrote raw dataset {out}")
    return 0


def _dist_context():
    """torchrun's rank variables, when present, as a DistContext (None for a single process)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    from autoliver.train.distributed import DistContext

    return DistContext(
        rank=int(os.environ["RANK"]),
        world_size=int(os.environ["WORLD_SIZE"]),
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
        master_addr=os.environ.get("MASTER_ADDR", "127.0.0.1"),
        master_port=int(os.environ.get("MASTER_PORT", "29500")),
    )


def _fold(text: str):
    if text == "all":
        return "all"
    if text.isdigit():
        return int(text)
    raise argparse.ArgumentTypeError(f"FOLD must be 0..4 or 'all', got {text!r}")


def cmd_train(args: argparse.Namespace) -> int:
    from autoliver import api
    from autoliver.train.options import TrainOptions

    options = TrainOptions(
        epochs=args.epochs,
        iters_per_epoch=args.iters_per_epoch,
        val_iters=args.val_iters,
        device=args.device,
        resume=args.resume,
        arch=args.arch,
        encoder_weights=Path(args.encoder_weights).expanduser() if args.encoder_weights else None,
        splits_file=Path(args.splits).expanduser().resolve() if args.splits else None,
        seed=args.seed,
        budget_minutes=args.budget_minutes,
        n_workers=args.workers,
        progress=not args.no_progress,
        amp=not args.no_amp,
        cpu_bf16=args.cpu_bf16,
        final_validation=not args.no_validation,
        threads=args.threads,
    )
    dist = _dist_context()
    if options.threads:
        import torch

        torch.set_num_threads(options.threads)
    dataset, configuration, fold = _train_target(args)
    result = api.train(dataset, configuration, fold, _workspace(args), options, dist=dist)
    if dist is None or dist.is_main:
        print(f"trained {result.epochs} epoch(s): {result.output_dir}")
        if result.metrics:
            mean = result.metrics["mean"]
            print(f"validation ({result.metrics['n_cases']} cases): liver Dice {mean['liver']:.4f}, tumour Dice {mean['tumour']:.4f}")
    return 0


ENGINE_ENV = "AUTOLIVER_ENGINE"


def default_engine(environ=os.environ) -> str:
    """``predict``'s engine without --engine: $AUTOLIVER_ENGINE when set (a site's choice), else auto."""
    from autoliver.infer.engines import ENGINES

    name = environ.get(ENGINE_ENV, "").strip() or "auto"
    if name not in ENGINES:
        raise UsageError(f"${ENGINE_ENV}={name!r} is not an engine; set it to one of {', '.join(ENGINES)} or unset it")
    return name


def cmd_predict(args: argparse.Namespace) -> int:
    from autoliver import api
    from autoliver.infer.runner import PredictOptions
    from autoliver.io.inputs import parse_shard

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    options = PredictOptions(
        tta=args.tta,
        step=args.step_size,
        save_probabilities=args.save_probabilities,
        overwrite=args.overwrite,
        progress=not args.no_progress,
        shard=parse_shard(args.shard) if args.shard else None,
        roi=args.roi,
        roi_margin_mm=args.roi_margin,
        precision=args.precision,
        series_uid=args.series,
        output_format=args.output_format,
        engine=args.engine or default_engine(),
        tiles=args.tiles,
        tile_mb=args.tile_mb,
    )
    if not options.tile_mb > 0:
        raise UsageError(f"--tile-mb must be > 0, got {options.tile_mb}")
    if not 0 < options.step <= 1:
        raise UsageError(f"--step-size must be in (0, 1], got {options.step}")
    # a model package given as -m is installed once under the workspace's models/.cache/
    ws = _workspace(args) if args.dataset is not None or str(args.model).lower().endswith(".zip") else None
    summary = api.predict(args.input, args.output, ws, model_dir=args.model, dataset_spec=args.dataset,
                          configuration=args.configuration, folds=args.folds, device=args.device, options=options,
                          checkpoint=args.checkpoint)
    print(f"{summary.output}: {len(summary.predicted)} predicted, {len(summary.skipped)} already there, {len(summary.failed)} failed")
    if summary.predicted:
        totals = summary.stage_totals()
        stages = ", ".join(f"{k[:-2]} {totals[k]:.1f} s" for k in ("wait_input_s", "roi_s", "network_s", "argmax_s", "postprocess_s", "export_s") if k in totals)
        print(f"time: {sum(summary.seconds.values()):.1f} s for {len(summary.predicted)} case(s) ({stages})")
    for case, message in summary.failed.items():
        log.error("%s: %s", case, message)
    return 1 if summary.failed else 0


def cmd_demo(args: argparse.Namespace) -> int:
    from autoliver.demo import DemoOptions, run_demo

    options = DemoOptions(minutes=args.minutes, configuration=args.configuration, n_phantoms=args.phantoms, quick=args.quick,
                          device=args.device, n_jobs=max(1, args.np), progress=not args.no_progress, seed=args.seed)
    s = run_demo(_workspace(args), options)
    print(f"\nautoliver demo finished in {s.seconds['total'] / 60:.1f} min ({', '.join(f'{k} {v:.0f} s' for k, v in s.seconds.items() if k != 'total')})")
    print(f"  training data   {s.dataset} ({s.n_train_real} real CT cases shipped with autoliver + {s.n_train_phantoms} synthetic phantoms)")
    print(f"  model           {s.model_dir}")
    print(f"  test cases      {', '.join(s.test_cases)}")
    print(f"  predictions     {s.predictions}")
    print(f"  evaluation      {s.evaluation}")
    if s.report is not None:
        print(f"  report          {s.report}  (open it in a browser)")
    for structure in ("liver", "tumour"):
        m = s.metrics.get(structure, {})
        if m:
            print(f"  {structure:<15} Dice per case {m.get('dice_per_case', float('nan')):.3f}, global Dice {m.get('dice_global', float('nan')):.3f}")
    print(f"\n{s.honesty}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from autoliver import api

    common = {"model_dir": args.model, "n_jobs": max(1, args.np), "progress": not args.no_progress, "image_size": args.image_size}
    if args.dataset is not None:
        if args.images or args.references or args.evaluation:
            raise UsageError("-i/-r/-e go with -p PREDICTIONS; a dataset report (-d) takes its images and labels from the dataset")
        out = api.report_dataset(args.dataset, args.output, _workspace(args), **common)
    else:
        if not args.images:
            raise UsageError("-p PREDICTIONS needs -i IMAGES: the CT images the predictions were made from")
        out = api.report_predictions(args.predictions, args.images, args.output, references=args.references,
                                     evaluation=args.evaluation, **common)
    print(f"wrote {out} (open it in a browser)")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from autoliver import api
    from autoliver.evaluate import evaluation_table

    options = _options(args)
    result = api.evaluate(args.reference, args.prediction, args.output, n_jobs=options.n_jobs, progress=options.progress,
                          missing="empty" if args.missing_as_empty else "error")
    print(evaluation_table(result, max_cases=args.max_rows))
    if args.output:
        print(f"wrote {Path(args.output) / 'evaluation.csv'} and {Path(args.output) / 'evaluation.json'}")
    return 0


def cmd_submit(args: argparse.Namespace) -> int:
    from autoliver import api

    if args.check:
        problems = api.check_submission(args.input, args.test_volumes, n_cases=args.n_cases, options=_options(args))
        for problem in problems:
            print(f"  - {problem}")
        print(f"{args.input}: {len(problems)} problem(s)" if problems else f"{args.input}: valid LiTS submission")
        return 1 if problems else 0
    if not args.output:
        raise UsageError("give -o submission.zip (or --check to check an existing submission)")
    out = api.submit(args.input, args.output, args.test_volumes, _options(args))
    print(f"wrote {out}")
    return 0


def cmd_find_best_configuration(args: argparse.Namespace) -> int:
    from autoliver import api
    from autoliver.selection import postprocessing_table

    result = api.find_best_configuration(_dataset(args), _workspace(args), configurations=args.configurations, options=_options(args), crf=not args.no_crf)
    for config, message in result.skipped.items():
        print(f"left out {config}: {message}")
    evidence = result.plan.evidence
    print(f"{evidence['n_cases']} cross-validation cases; score: {evidence['score']}")
    print(result.table())
    print(f"post-processing of {result.chosen} ({evidence['postprocessing_rule']}):")
    print(postprocessing_table(result.plan.postprocessing))
    print(f"chosen: {result.chosen}; wrote {result.path}")
    return 0


def cmd_export_model(args: argparse.Namespace) -> int:
    from autoliver import api

    out = api.export_model(_dataset(args), _workspace(args), args.configurations, args.folds, args.output, name=args.name,
                           overwrite=args.overwrite)
    print(f"wrote {out}")
    return 0


def cmd_install_model(args: argparse.Namespace) -> int:
    from autoliver import api

    folder = api.install_model(args.package, None if args.output else _workspace(args), args.output, overwrite=args.overwrite)
    print(f"installed in {folder}; predict with: autoliver predict -i INPUT -o OUTPUT -m {folder}")
    return 0


def cmd_postprocess(args: argparse.Namespace) -> int:
    from autoliver import api

    summary = api.postprocess(args.input, args.output, args.plan, images_dir=args.images, options=_options(args))
    print(f"{summary.output}: {len(summary.processed)} post-processed, {len(summary.skipped)} already there")
    return 0


def _add_dataset(p: argparse.ArgumentParser) -> None:
    """The dataset argument, the same in every command: positional or ``-d`` (as nnU-Net)."""
    p.add_argument("dataset", nargs="?", help="dataset folder (absolute or relative), or its name / numeric id in the workspace")
    p.add_argument("-d", "--dataset", dest="dataset_option", metavar="DATASET", help="the same, as nnU-Net spells it")


def _dataset(args: argparse.Namespace) -> str:
    given = [v for v in (getattr(args, "dataset", None), getattr(args, "dataset_option", None)) if v is not None]
    if len(set(given)) != 1:
        raise UsageError("give the dataset once: as DATASET or as -d DATASET (a folder, a name or a numeric id)")
    return given[0]


def _train_target(args: argparse.Namespace) -> tuple[str, str, int | str]:
    """(dataset, configuration, fold) from ``train DATASET CONFIG FOLD`` or ``train -d DATASET CONFIG FOLD``."""
    given = list(args.positionals)
    if args.dataset_option is not None:
        given.insert(0, args.dataset_option)
    if len(given) != 3:
        raise UsageError("train takes the dataset, the configuration and the fold: `autoliver train DATASET CONFIG FOLD` "
                         "or `autoliver train -d DATASET CONFIG FOLD`")
    dataset, configuration, fold = given
    try:
        return dataset, configuration, _fold(fold)
    except argparse.ArgumentTypeError as exc:
        raise UsageError(str(exc)) from None


def _add_common(p: argparse.ArgumentParser, jobs: bool = True) -> None:
    p.add_argument("--workspace", default=argparse.SUPPRESS, help=WORKSPACE_HELP)
    if jobs:
        p.add_argument("-np", type=int, default=_default_jobs(), help="parallel worker processes (default: %(default)s)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (batch jobs)")


def _add_planning(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", choices=["gpu", "cpu"], default="gpu", help="plan for a GPU's memory (default) or for this machine's RAM")
    p.add_argument("--gpu-memory", type=float, metavar="GB", help="GPU memory budget in GB (default: the detected GPU's, else 8)")


def _default_jobs() -> int:
    return max(1, min(os.cpu_count() or 1, 8))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="autoliver",
        description="Self-configuring liver and liver-tumour segmentation for abdominal CT.",
    )
    parser.add_argument("--version", action="version", version=f"autoliver {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    parser.add_argument("--workspace", default=None, help=WORKSPACE_HELP + " (also accepted after the command)")
    parser.add_argument("--scheduler", metavar="ADDRESS", help="run the per-case work of validate, fingerprinting, preprocessing, "
                        "cross-validation prediction (train's end-of-fold validation), evaluate and report on a Dask cluster: a scheduler's address (tcp://host:8786; the workers must see the same files), "
                        "or local:N for N worker processes here (needs dask[distributed])")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("validate", help="check a raw dataset and list every problem", description="Check a raw dataset (nnU-Net v2 layout) and list every problem at once; writes nothing.")
    _add_dataset(p)
    _add_common(p)
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("convert", help="turn an MSD Task03, LiTS or DICOM + DICOM-SEG folder into a raw dataset", description="Convert MSD Task03_Liver or LiTS raw files, or DICOM CT series with their DICOM-SEG labels, into a raw dataset in nnU-Net v2 layout.")
    p.add_argument("--from", dest="source_format", choices=["msd", "lits", "dicom-seg"], required=True, help="layout of SRC")
    p.add_argument("source", metavar="SRC", help="the MSD Task03_Liver folder, the LiTS folder, or a folder of DICOM CT series with their DICOM-SEG files")
    p.add_argument("--mapping", nargs="+", metavar="LABEL=VALUE", help="dicom-seg: segment label -> 1 (liver), 2 (tumour) or 0 (ignore), e.g. "
                   "--mapping Liver=1 Tumor=2 (default: inferred from segment labels and codes)")
    p.add_argument("--case-ids", choices=["patient", "study", "series", "index"], help="dicom-seg: case ids from Patient ID, Study/Series "
                   "Instance UID, or numbered (default: patient)")
    p.add_argument("-o", "--output", required=True, help="DatasetNNN_Name (goes under the workspace's raw/) or a path")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output dataset")
    _add_common(p, jobs=False)
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("example_dataset", help="write a raw dataset of the shipped real CT cases and phantoms", description="Write a raw dataset (nnU-Net v2 layout) under the workspace's raw/ from the real CT cases shipped with autoliver plus synthetic phantoms.")
    p.add_argument("--name", default="Dataset001_LiverExamples", help="dataset folder name (default: %(default)s)")
    p.add_argument("--phantoms", type=int, default=2, help="number of synthetic phantoms with tumours (default: %(default)s)")
    p.add_argument("--phantom-shape", type=int, nargs=3, default=[96, 160, 160], metavar=("Z", "Y", "X"), help="phantom size in voxels (default: 96 160 160)")
    p.add_argument("--seed", type=int, default=0, help="phantom random seed (default: %(default)s)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing dataset of that name")
    _add_common(p, jobs=False)
    p.set_defaults(func=cmd_example_dataset)

    p = sub.add_parser("plan", help="plan configurations from a fingerprint and print them", description="Plan every configuration from fingerprint.json alone and print a table.")
    p.add_argument("--fingerprint", required=True, help="fingerprint.json written by plan_and_preprocess")
    p.add_argument("-o", "--output", help="plans.json to write (default: next to the fingerprint)")
    _add_planning(p)
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("plan_and_preprocess", help="validate, fingerprint, plan and preprocess a dataset", description="Validate a raw dataset, measure it, plan its configurations and preprocess the data they need. Finished cases are skipped on a re-run.")
    _add_dataset(p)
    p.add_argument("-c", "--configurations", nargs="+", metavar="CONFIG", help="configurations to preprocess (default: all planned)")
    p.add_argument("--recipes", nargs="+", metavar="RECIPE", help="also add these recipes' configurations (see `autoliver recipes`); recipes added before are kept")
    p.add_argument("--overwrite", action="store_true", help="redo finished cases and the fingerprint")
    _add_planning(p)
    _add_common(p)
    p.set_defaults(func=cmd_plan_and_preprocess)

    p = sub.add_parser("compare", help="train configurations for the same budget and compare them side by side", description="Train every named configuration (planned or added by a recipe) on the same folds for the same wall-clock budget, score their held-out cases (liver and tumour Dice, IoU, HD95, lesion recall) and measure parameters, FLOPs per patch, training samples/s, inference s/case and peak memory. Writes results/<dataset>/compare/compare.{json,csv,html}. Finished folds are reused on a re-run.")
    _add_dataset(p)
    p.add_argument("-c", "--configurations", nargs="+", required=True, metavar="CONFIG", help="configurations to compare")
    p.add_argument("--budget-minutes", type=float, required=True, metavar="M", help="training budget per configuration and fold")
    p.add_argument("--folds", nargs="+", type=_fold, default=[0], metavar="FOLD", help="folds to train and score (default: 0)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="training device (default: %(default)s)")
    p.add_argument("--workers", dest="np_workers", type=int, default=0, help="data-loading worker processes per training (default: %(default)s)")
    _add_common(p, jobs=False)
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("splits", help="write the cross-validation splits with another number of folds", description="Write results/<dataset>/splits.json with N folds of the training cases (default training uses 5; the mixed-pooling paper uses 10). Train folds 0..N-1 afterwards.")
    _add_dataset(p)
    p.add_argument("--folds", type=int, required=True, metavar="N", help="number of folds")
    p.add_argument("--overwrite", action="store_true", help="replace existing splits (refused once a fold was trained with them)")
    _add_common(p, jobs=False)
    p.set_defaults(func=cmd_splits)

    p = sub.add_parser("recipes", help="list the shipped recipes (the published systems as configurations)", description="List the recipes: each reproduces a published liver / liver-tumour segmentation system as configurations derived from the planned ones.")
    p.set_defaults(func=cmd_recipes)

    p = sub.add_parser("add_configuration", help="add recipes' configurations to a planned dataset", description="Add the configurations of one or more recipes to an already planned dataset (plans.json) and preprocess the data folders they need. Trained folds of other configurations stay valid.")
    _add_dataset(p)
    p.add_argument("--recipe", nargs="+", required=True, metavar="RECIPE", help="recipe name(s) (see `autoliver recipes`)")
    p.add_argument("--patch", nargs="+", type=int, metavar="N", help="override the recipe's patch size (y x for 2d, z y x for 3d)")
    p.add_argument("--overwrite", action="store_true", help="redo finished cases")
    _add_common(p)
    p.set_defaults(func=cmd_add_configuration)

    p = sub.add_parser("train", help="train one fold of one configuration", description="Train a configuration's network on one cross-validation fold (or on every case: fold 'all'), then validate it on the fold's held-out cases. Start with torchrun for several processes/devices.")
    p.add_argument("positionals", nargs="+", metavar="[DATASET] CONFIG FOLD",
                   help="the dataset (folder, name or numeric id; or give it as -d), the configuration (2d, 2.5d, 3d_fullres, "
                   "3d_lowres, 3d_cascade_fullres or a recipe's) and the fold (0..4, or 'all' to train on every case)")
    p.add_argument("-d", "--dataset", dest="dataset_option", metavar="DATASET", help="the dataset, as nnU-Net spells it")
    p.add_argument("--epochs", type=int, default=1000, help="epochs to train (default: %(default)s); with --continue, more than before extends training")
    p.add_argument("--iters-per-epoch", type=int, default=250, help="training iterations per epoch (default: %(default)s)")
    p.add_argument("--val-iters", type=int, default=50, help="validation batches per epoch for the pseudo-Dice (default: %(default)s)")
    p.add_argument("--budget-minutes", type=float, metavar="M", help="train for M minutes of wall-clock time: epochs are fitted to the measured speed (--epochs is then an upper bound)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="auto takes the GPU when there is one (default: %(default)s)")
    p.add_argument("--continue", dest="resume", action="store_true", help="resume from the fold's latest checkpoint")
    p.add_argument("--arch", help="network family (default: the plan's, else unet)")
    p.add_argument("--encoder-weights", metavar="FILE", help="start the encoder from a local weight file (.safetensors or a torch state dict, read with weights_only; e.g. ImageNet ResNet-50 weights for resnet50_unet)")
    p.add_argument("--splits", metavar="FILE", help="custom (e.g. patient-grouped) splits: a JSON list of {train: [...], val: [...]}")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    p.add_argument("-np", "--workers", type=int, default=min(4, _default_jobs()), help="data-loading worker processes, 0: in the main process (default: %(default)s)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--no-amp", action="store_true", help="full float32 on CUDA (default: mixed precision)")
    p.add_argument("--cpu-bf16", action="store_true", help="bfloat16 autocast on the CPU")
    p.add_argument("--no-validation", action="store_true", help="skip the end-of-fold validation of the held-out cases")
    _add_common(p, jobs=False)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("predict", help="segment new CT scans", description="Segment CT scans with a trained model: one <case>.nii.gz (labels 0 background, 1 liver, 2 tumour) in the input's exact geometry and one <case>.json report per case. Cases already predicted are skipped.")
    p.add_argument("-i", "--input", required=True, help="an image file, a folder of images (NIfTI, NRRD, MHA; <case>_0000 naming accepted), a DICOM series folder or a folder of them")
    p.add_argument("-o", "--output", required=True, help="output folder")
    model = p.add_mutually_exclusive_group(required=True)
    model.add_argument("-m", "--model", help="trained model folder (results/<dataset>), a model package (.zip from export_model), or an "
                       "nnU-Net v2 model: its Trainer__Plans__config folder, a folder holding such folders, or the zip of "
                       "nnUNetv2_export_model_to_zip")
    model.add_argument("-d", "--dataset", help="dataset name or numeric id: its model in the workspace's results/")
    p.add_argument("-c", "--configuration", nargs="+", metavar="CONFIG", help="configuration(s); several: an ensemble (softmax averaged) "
                   "(default: the model folder's inference_plan.json, else the first trained of 3d_fullres, 3d_cascade_fullres, 2.5d, 2d)")
    p.add_argument("-f", "--folds", nargs="+", metavar="FOLD", help="folds to ensemble (default: the inference plan's, else every trained fold)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="auto takes the GPU when there is one (default: %(default)s)")
    p.add_argument("--tta", action=argparse.BooleanOptionalAction, default=True, help="mirroring test-time augmentation (default: on)")
    p.add_argument("--step-size", type=float, default=0.5, metavar="S", help="sliding-window step as a fraction of the patch (default: %(default)s)")
    p.add_argument("--save-probabilities", action="store_true", help="also write <case>.npz with float16 class probabilities")
    p.add_argument("--overwrite", action="store_true", help="predict cases whose output exists again")
    p.add_argument("--shard", metavar="I/N", help="predict only the cases whose index in sorted order is I modulo N (job arrays)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--roi", nargs="?", const="on", default="auto", choices=["auto", "on", "off"],
                   help="find the liver with a coarse pass first and run the accurate pass only around it: on, off, or auto = "
                        "where the coarse pass costs at most half the whole-volume pass, counted from the tiles (default: %(default)s)")
    p.add_argument("--no-roi", dest="roi", action="store_const", const="off", help="the same as --roi off")
    p.add_argument("--tiles", choices=["auto", "patch"], default="auto", help="3d inference tiles: auto = the tiling with the fewest "
                   "computed voxels, tiles of at most 1.6 patches and --tile-mb (less overlap, less work), patch = the training patch "
                   "at --step-size (default: %(default)s)")
    p.add_argument("--tile-mb", type=float, default=512.0, metavar="MB", help="with --tiles auto: the largest tile's activation memory, "
                   "estimated (default: %(default)s)")
    p.add_argument("--roi-margin", type=float, default=20.0, metavar="MM", help="margin around the liver's box in mm (default: %(default)s)")
    p.add_argument("--output-format", choices=["nifti", "dicom-seg", "both"], default="nifti", help="<case>.nii.gz, or for DICOM series "
                   "inputs <case>.dcm, a DICOM Segmentation referring to the input series (liver and tumour segments), or both "
                   "(default: %(default)s)")
    p.add_argument("--engine", choices=["auto", "torch", "onnxruntime", "openvino"], default=None, help="how the networks run on a CPU; "
                   "auto: OpenVINO, else ONNX Runtime when installed (pip install 'autoliver[fast-cpu]'), else torch; always torch on a GPU "
                   f"(default: ${ENGINE_ENV} when set, else auto)")
    p.add_argument("-chk", "--checkpoint", default="checkpoint_final.pth", help="nnU-Net v2 models: the checkpoint file of each fold "
                   "(default: %(default)s, else checkpoint_best.pth)")
    p.add_argument("--series", metavar="UID", help="the DICOM series to read from a folder that holds several (its SeriesInstanceUID)")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"], default="auto", help="network precision; auto: fp16 on CUDA, bf16 on CPUs with native bf16, else fp32 (default: %(default)s)")
    _add_common(p, jobs=False)
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("evaluate", help="score predictions against reference labels", description="Score predicted label maps against reference label maps, paired by case id: liver (labels 1+2) and tumour (label 2) Dice (per case with the LiTS empty rule, and global), IoU, VOE, RVD, ASSD, MSSD, HD95 (mm), precision, recall, F1, accuracy; tumour detection at overlap > 0 and IoU > 0.5 (LiTS matching); tumour burden. Prints a table; writes evaluation.csv and evaluation.json with -o.")
    p.add_argument("-r", "--reference", required=True, help="folder of reference label maps (<case>.nii.gz, or LiTS segmentation-N.nii)")
    p.add_argument("-p", "--prediction", required=True, help="folder of predicted label maps (autoliver predict output)")
    p.add_argument("-o", "--output", help="folder for evaluation.csv and evaluation.json")
    p.add_argument("--missing-as-empty", action="store_true", help="score a reference case without a prediction as an empty prediction (default: an error)")
    p.add_argument("--max-rows", type=int, default=50, metavar="N", help="cases shown in the printed table (default: %(default)s; all are written)")
    _add_common(p)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("submit", help="build or check a LiTS leaderboard submission zip", description="Build a LiTS submission zip (test-segmentation-N.nii, uint8, the test volume's geometry) from `autoliver predict` output on the LiTS test folder, or with --check list every problem of an existing submission zip or folder (exit status 1 when there are problems).")
    p.add_argument("-i", "--input", required=True, help="prediction folder (test-volume-N.nii.gz); with --check: the submission zip or folder")
    p.add_argument("-o", "--output", help="submission zip to write")
    p.add_argument("-t", "--test-volumes", metavar="DIR", help="folder of the LiTS test-volume-N.nii files: every volume needs its segmentation, with the same geometry")
    p.add_argument("--check", action="store_true", help="check an existing submission instead of building one")
    p.add_argument("--n-cases", type=int, metavar="N", help="with --check and no --test-volumes: expect test-segmentation-0..N-1 (default: 70, the LiTS test set)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output zip")
    _add_common(p, jobs=False)
    p.set_defaults(func=cmd_submit)

    p = sub.add_parser("report", help="write an HTML report of predictions or of a dataset", description="Write one self-contained HTML page (opens in any browser, no internet needed): per case, axial, coronal and sagittal views of liver and tumours on the CT at the slices with the most tumour, volumes, tumour count, diameters and burden, metrics when references exist, charts, and training curves when a model folder is given.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("-p", "--predictions", help="prediction folder written by `autoliver predict` (<case>.nii.gz + <case>.json)")
    src.add_argument("-d", "--dataset", help="raw dataset (folder, or name / numeric id under the workspace's raw/): its training cases and labels")
    p.add_argument("-i", "--images", help="the CT images the predictions were made from (file, folder or DICOM series folders, as for predict)")
    p.add_argument("-r", "--references", help="reference label folder (<case>.nii.gz): shown next to the predictions, and scored unless -e is given")
    p.add_argument("-e", "--evaluation", nargs="+", metavar="DIR", help="output folder(s) of `autoliver evaluate`; several (e.g. one per configuration) are compared in the charts")
    p.add_argument("-m", "--model", help="model folder (results/<dataset>): training curves and cross-validation scores")
    p.add_argument("-o", "--output", required=True, help="HTML file to write")
    p.add_argument("--image-size", type=int, default=320, metavar="PX", help="longer side of each slice image in pixels (default: %(default)s)")
    _add_common(p)
    p.set_defaults(func=cmd_report)
    p = sub.add_parser("demo", help="run the whole pipeline on the shipped example cases (CPU, < 15 min)", description="Build a small dataset from the real CT cases shipped with autoliver plus synthetic phantoms, then validate, plan and preprocess, train briefly, predict held-out cases (NIfTI and DICOM), evaluate them and write an HTML report. Every step resumes on a re-run.")
    p.add_argument("--minutes", type=float, default=9.0, help="training budget in minutes (default: %(default)s)")
    p.add_argument("-c", "--configuration", default="2d", help="configuration to train (default: %(default)s)")
    p.add_argument("--phantoms", type=int, default=6, help="synthetic training phantoms (default: %(default)s)")
    p.add_argument("--device", choices=["cpu", "cuda", "auto"], default="cpu", help="training and prediction device (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    p.add_argument("--quick", action="store_true", help="a few training iterations and a fast prediction (no test-time augmentation): a smoke test of the pipeline")
    _add_common(p)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("find_best_configuration", help="choose the best configuration/ensemble and post-processing on cross-validation", description="Score every trained configuration and every ensemble of them (softmax averages) on the cross-validation predictions (liver and tumour Dice, LiTS rule), decide each post-processing step, print a ranked table and write results/<dataset>/inference_plan.json, which `autoliver predict` uses by default.")
    _add_dataset(p)
    p.add_argument("-c", "--configurations", nargs="+", metavar="CONFIG", help="configurations to consider (default: every one with all folds trained)")
    p.add_argument("--no-crf", action="store_true", help="do not try the dense CRF (the slowest step to evaluate); it stays off")
    _add_common(p, jobs=False)
    p.set_defaults(func=cmd_find_best_configuration)

    p = sub.add_parser("export_model", help="write a trained model as one portable, verifiable zip", description="Write a model package: plans.json, inference_plan.json, dataset.json, weights-only checkpoints of the chosen configurations' folds and manifest.json (versions, sha256 of every file, hashes, a model card with the cross-validation Dice and the intended use).")
    _add_dataset(p)
    p.add_argument("-c", "--configurations", nargs="+", metavar="CONFIG", help="configurations to export (default: the inference plan's, else every trained one); stages they depend on come along")
    p.add_argument("-f", "--folds", nargs="+", metavar="FOLD", help="folds to export (default: the inference plan's, else every trained fold)")
    p.add_argument("-o", "--output", default="model.zip", help="package to write (default: %(default)s)")
    p.add_argument("--name", help="name it installs under (default: the dataset name)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing package")
    _add_common(p, jobs=False)
    p.set_defaults(func=cmd_export_model)

    p = sub.add_parser("install_model", help="check and unpack a model package", description="Check a model package (format, every file's sha256, no unexpected or unsafe members) and unpack it into <workspace>/models/<name>/ (or -o DIR), a model folder for `autoliver predict -m`. Installing the same package again changes nothing.")
    p.add_argument("package", help="the model package (.zip) from autoliver export_model")
    p.add_argument("-o", "--output", metavar="DIR", help="install into DIR instead of <workspace>/models/<name>/")
    p.add_argument("--overwrite", action="store_true", help="replace another model installed there")
    _add_common(p, jobs=False)
    p.set_defaults(func=cmd_install_model)

    p = sub.add_parser("postprocess", help="apply an inference plan's post-processing to existing predictions", description="Apply the post-processing steps enabled in inference_plan.json to the <case>.nii.gz label maps of a folder; <case>.json reports are recomputed.")
    p.add_argument("-i", "--input", required=True, help="folder of predicted <case>.nii.gz (and <case>.json, <case>.npz)")
    p.add_argument("-o", "--output", required=True, help="output folder (must differ from the input)")
    p.add_argument("-p", "--plan", required=True, help="inference_plan.json (or the results/<dataset> folder holding it)")
    p.add_argument("--images", help="folder of the CT images (<case>_0000.nii.gz), needed only when the plan enables dense_crf")
    p.add_argument("--overwrite", action="store_true", help="redo cases whose output exists")
    _add_common(p, jobs=False)
    p.set_defaults(func=cmd_postprocess)

    return parser


def configure_logging(verbose: bool, quiet: bool) -> None:
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)-7s %(name)s: %(message)s", datefmt="%H:%M:%S")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    configure_logging(args.verbose, args.quiet)
    try:
        faults.arm_from_environment(os.environ)  # crash tests only: inert unless AUTOLIVER_FAULT_KILL_AT is set
        with cluster(args.scheduler):
            return args.func(args)
    except UsageError as exc:
        log.error("%s", exc, exc_info=args.verbose)
        return 2
    except AutoliverError as exc:
        log.error("%s", exc, exc_info=args.verbose)
        return 1
    except KeyboardInterrupt:
        log.error("interrupted; finished work is kept and a re-run resumes from it")
        return 130
    except MemoryError:
        log.error("out of memory; use a smaller -np, free memory, or a machine with more", exc_info=args.verbose)
        return 1
    except (FileNotFoundError, FileExistsError) as exc:
        if exc.filename is None:  # raised by autoliver with its own message: a wrong path argument
            log.error("%s", exc, exc_info=args.verbose)
            return 2
        log.error("%s: %s; check the path and run the command again", exc.filename, exc.strerror or exc, exc_info=args.verbose)
        return 1
    except OSError as exc:  # disk full, permission denied, a folder that cannot be made: name the path
        where = " -> ".join(str(f) for f in (exc.filename, exc.filename2) if f) or "a file"
        log.error("%s: %s; nothing half-written was kept: fix this and run the command again", where, exc.strerror or exc,
                  exc_info=args.verbose)
        return 1
    except Exception as exc:  # a bug: one line, the traceback with -v
        log.error("internal error: %s: %s (run again with -v for the traceback, and report it)", type(exc).__name__, exc,
                  exc_info=args.verbose)
        return 3

if __name__ == "__main__":
    sys.exit(main())
