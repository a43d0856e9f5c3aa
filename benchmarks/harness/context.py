"""What a benchmark's ``run(ctx)`` gets: its options, its folders, the nnU-Net side, notes."""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.harness import nnunet


def add_common_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("harness")
    g.add_argument("--quick", action="store_true", help="autoliver's side only, on tiny inputs, in seconds (a check of the machinery)")
    g.add_argument("--out", type=Path, default=Path("benchmark_results"), help="report folder: OUT/NAME.json (default: %(default)s)")
    g.add_argument("--workdir", type=Path, help="scratch folder of the runs (default: OUT/work/NAME)")
    g.add_argument("--cache", type=Path, help="built inputs (datasets, preprocessed data, trained models), keyed by their "
                   "parameters and reused (default: OUT/cache)")
    g.add_argument("--threads", type=int, help="torch threads and OMP_NUM_THREADS in every process (default: 2; 1 with --quick: "
                   "tiny tensors gain nothing from more, and lose much on a loaded machine)")
    g.add_argument("--tools", nargs="+", choices=["autoliver", "nnunet"], default=["autoliver", "nnunet"],
                   help="sides of an nnU-Net comparison to run (default: both)")
    g.add_argument("--nnunet-venv", type=Path, default=Path(os.environ.get("NNUNET_VENV", nnunet.DEFAULT_VENV)),
                   help="virtual environment with nnunetv2 (default: $NNUNET_VENV, else REPO/.venv-nnunet); its side is "
                   "skipped with a note when it has none")
    g.add_argument("--setup-nnunet", action="store_true", help="create --nnunet-venv and install nnU-Net v2 into it when missing")
    g.add_argument("--torch-spec", default="torch==2.13.0", help="torch requirement for --setup-nnunet (default: %(default)s)")
    g.add_argument("--pip-args", default="", help="extra pip arguments for --setup-nnunet, e.g. a CPU-only wheel index")
    g.add_argument("--timeout", type=float, default=3600, help="kill a measured process after this many seconds (default: %(default)s)")
    g.add_argument("--poll", type=float, default=0.2, help="process-tree memory polling interval in s (default: %(default)s)")
    g.add_argument("--show", type=Path, metavar="JSON", help="print the table of a report written before; run nothing")


@dataclass
class Context:
    name: str
    args: argparse.Namespace
    argv: list[str]
    notes: list[str] = field(default_factory=list)
    checkpoint: Callable[[dict], object] = field(default_factory=lambda: lambda results: None, repr=False)  # writes a partial report
    _nnunet: nnunet.Venv | None | bool = False  # False: not looked for yet

    def __post_init__(self) -> None:
        a = self.args
        self.quick: bool = a.quick
        self.out: Path = a.out.resolve()
        self.workdir: Path = (a.workdir or self.out / "work" / self.name).resolve()
        self.cache: Path = (a.cache or self.out / "cache").resolve()
        self.threads: int = a.threads or (1 if a.quick else 2)
        self.timeout: float = a.timeout
        self.poll: float = a.poll
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.cache.mkdir(parents=True, exist_ok=True)

    def note(self, message: str) -> None:
        if message not in self.notes:
            self.notes.append(message)
            print(f"note: {message}", flush=True)

    def pick(self, full, quick):
        """``quick`` in quick mode, else ``full``."""
        return quick if self.quick else full

    @property
    def nnunet(self) -> nnunet.Venv | None:
        """nnU-Net's environment when its side is to run, else None (with a note saying why)."""
        if self._nnunet is False:
            self._nnunet = None
            if self.quick:
                self.note("quick mode: autoliver's side only; nnU-Net v2 not run")
            elif "nnunet" in self.args.tools:
                if self.args.setup_nnunet:
                    nnunet.setup(self.args.nnunet_venv, self.args.torch_spec, self.args.pip_args)
                self._nnunet = nnunet.find(self.args.nnunet_venv)
                if self._nnunet is None:
                    self.note(f"nnU-Net v2 side skipped: no nnunetv2 in {self.args.nnunet_venv} (give --nnunet-venv or $NNUNET_VENV, "
                              "or --setup-nnunet to create it); autoliver's side only, no ratios")
        return self._nnunet

    @property
    def autoliver(self) -> bool:
        return "autoliver" in self.args.tools or self.quick

    def nnunet_status(self) -> dict | None:
        if self._nnunet is False:
            return None
        return {"venv": str(self.args.nnunet_venv), "ran": self._nnunet is not None,
                "versions": self._nnunet.versions if self._nnunet else None}

    def settings(self) -> dict:
        return json.loads(json.dumps({k: v for k, v in vars(self.args).items() if k not in ("show", "pip_args")}, default=str))

    def path(self, *parts: str, fresh: bool = False) -> Path:
        """A folder under the work folder (``fresh``: emptied first)."""
        import shutil

        p = self.workdir.joinpath(*parts)
        if fresh:
            shutil.rmtree(p, ignore_errors=True)
        p.mkdir(parents=True, exist_ok=True)
        return p
