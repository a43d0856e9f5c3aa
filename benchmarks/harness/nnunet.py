"""nnU-Net v2's side of the comparisons: its own virtual environment, its folders, its runs.

nnU-Net runs under the Python of its own environment (never mixing its dependencies with
autoliver's), through the same child process as everything else (``measure.run_child``):
its command-line entry points with their arguments (``nnUNetv2_plan_and_preprocess``,
``nnUNetv2_predict``), or ``benchmarks.harness.nnunet_side`` (its stock ``nnUNetTrainer``).
Its folders and loader processes come from the environment variables it reads at import
(``nnUNet_raw``, ``nnUNet_preprocessed``, ``nnUNet_results``, ``nnUNet_n_proc_DA``);
``torch.compile`` is off (``nnUNet_compile=false``; nnU-Net turns it off on the CPU anyway).
"""

from __future__ import annotations

import logging
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from benchmarks.harness import cache, measure, report

log = logging.getLogger(__name__)

DEFAULT_VENV = measure.REPO_ROOT / ".venv-nnunet"
ENTRY = {"plan_and_preprocess": "nnunetv2.experiment_planning.plan_and_preprocess_entrypoints:plan_and_preprocess_entry",
         "predict": "nnunetv2.inference.predict_from_raw_data:predict_entry_point"}
DATA_IDENTIFIERS = {"2d": "nnUNetPlans_2d", "3d_fullres": "nnUNetPlans_3d_fullres"}


@dataclass(frozen=True)
class Venv:
    path: Path
    python: Path
    versions: dict


def find(venv: Path) -> Venv | None:
    """nnU-Net's environment at ``venv`` when its Python has nnunetv2, else None."""
    venv = Path(venv).expanduser().absolute()  # keep the venv's own bin/python, not the interpreter it links to
    python = venv / "bin" / "python"
    if not python.exists():
        return None
    v = report.versions(python, ("nnunetv2", "torch", "numpy", "batchgenerators", "SimpleITK"))
    return Venv(venv, python, v) if v.get("nnunetv2") else None


def setup(venv: Path, torch_spec: str, pip_args: str) -> None:
    """Create ``venv`` and install ``torch_spec`` and nnunetv2 into it, unless it has nnunetv2."""
    if find(venv):
        return
    if not (venv / "bin" / "python").exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    cmd = [str(venv / "bin" / "python"), "-m", "pip", "install", *shlex.split(pip_args), torch_spec, "nnunetv2"]
    log.info("installing: %s", shlex.join(cmd))
    subprocess.run(cmd, check=True)


def env(raw: Path | None = None, preprocessed: Path | None = None, results: Path | None = None, loader_workers: int | None = None) -> dict:
    out = {"nnUNet_compile": "false"}
    for key, value in (("nnUNet_raw", raw), ("nnUNet_preprocessed", preprocessed), ("nnUNet_results", results),
                       ("nnUNet_n_proc_DA", loader_workers)):
        if value is not None:
            out[key] = str(value)
    out.setdefault("nnUNet_raw", out.get("nnUNet_results", "/nonexistent"))
    return out


def run(ctx, venv: Venv, target: str, nn_env: dict, log_path: Path, argv: list[str] | None = None, kwargs: dict | None = None,
        poll_s: float | None = None) -> dict:
    """One measured nnU-Net process: ``target`` an ``ENTRY`` name (with ``argv``) or ``module:function`` (with ``kwargs``)."""
    import os

    target = ENTRY.get(target, target)
    log.info("nnU-Net: %s %s", target, shlex.join(map(str, argv or [])) if argv is not None else kwargs)
    m = measure.run_child(target, argv=argv, kwargs=kwargs, python=venv.python, env={**os.environ, **nn_env}, threads=ctx.threads,
                          log_path=log_path, poll_s=ctx.poll if poll_s is None else poll_s, timeout_s=ctx.timeout)
    if not m["ok"]:
        log.error("nnU-Net %s failed: %s; see %s", target, m["error"], log_path)
    return m


def preprocessed(ctx, venv: Venv, raw_root: Path, dataset_id: int, name: str, configs: list[str]) -> Path:
    """nnU-Net's ``nnUNet_preprocessed`` folder for ``configs`` of a raw dataset, cached."""

    def build(folder: Path) -> None:
        m = run(ctx, venv, "plan_and_preprocess", env(raw_root, folder, folder / "results"), folder / "plan_and_preprocess.log",
                argv=["-d", str(dataset_id), "-c", *configs, "-np", "2", "-npfp", "2"], poll_s=0)
        if not m["ok"]:
            raise SystemExit(f"nnUNetv2_plan_and_preprocess failed: {m['error']}; see {folder / 'plan_and_preprocess.log'}")

    return cache.entry(ctx, "nnunet_preprocessed", {"raw": str(raw_root), "name": name, "configs": sorted(configs)}, build)
