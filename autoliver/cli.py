"""The `autoliver` command. The only place that reads environment variables, parses arguments
and configures logging."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from autoliver import __version__
from autoliver.errors import AutoliverError

log = logging.getLogger("autoliver")

WORKSPACE_ENV = "AUTOLIVER_WORKSPACE"
DEFAULT_WORKSPACE = "autoliver_workspace"
WORKSPACE_HELP = f"workspace root (raw/, preprocessed/, results/); default ${WORKSPACE_ENV}, else ./{DEFAULT_WORKSPACE}"


def _workspace(args: argparse.Namespace):
    from autoliver.workspace import Workspace

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

    dataset = api.validate(args.dataset, _workspace(args), _options(args))
    print(f"{dataset.root}: valid ({len(dataset.training)} training, {len(dataset.test)} test cases)")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from autoliver import api

    out = api.convert(args.source_format, args.source, args.output, _workspace(args), overwrite=args.overwrite, progress=not args.no_progress)
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
        args.dataset,
        _workspace(args),
        configurations=args.configurations,
        device=args.device,
        gpu_memory_gb=args.gpu_memory,
        options=_options(args),
    )
    print(plans_table(Plans.load(summary.plans_path)))
    print(f"fingerprint: {summary.fingerprint_path}")
    print(f"plans:       {summary.plans_path}")
    for data_id, folder in summary.folders.items():
        print(f"data {data_id:>8}: {folder}")
    print("time: " + ", ".join(f"{k} {v:.1f} s" for k, v in summary.seconds.items()))
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
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("validate", help="check a raw dataset and list every problem", description="Check a raw dataset (nnU-Net v2 layout) and list every problem at once; writes nothing.")
    p.add_argument("dataset", help="dataset folder, or its name / numeric id under the workspace's raw/")
    _add_common(p)
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("convert", help="turn an MSD Task03 or LiTS folder into a raw dataset", description="Convert MSD Task03_Liver or LiTS raw files into a raw dataset in nnU-Net v2 layout.")
    p.add_argument("--from", dest="source_format", choices=["msd", "lits"], required=True, help="layout of SRC")
    p.add_argument("source", metavar="SRC", help="the MSD Task03_Liver folder or the LiTS folder")
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
    p.add_argument("dataset", help="dataset folder, or its name / numeric id under the workspace's raw/")
    p.add_argument("-c", "--configurations", nargs="+", metavar="CONFIG", help="configurations to preprocess (default: all planned)")
    p.add_argument("--overwrite", action="store_true", help="redo finished cases and the fingerprint")
    _add_planning(p)
    _add_common(p)
    p.set_defaults(func=cmd_plan_and_preprocess)
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
        return args.func(args)
    except AutoliverError as exc:
        log.error("%s", exc, exc_info=args.verbose)
        return 1
    except (ValueError, FileNotFoundError, FileExistsError) as exc:
        log.error("%s", exc, exc_info=args.verbose)
        return 2
    except KeyboardInterrupt:
        log.error("interrupted; finished work is kept and a re-run resumes from it")
        return 130


if __name__ == "__main__":
    sys.exit(main())
