"""Shared test helpers: the tiny phantom workspace, random-weight model folders, a simulated
clock and networks/loaders that advance it. Fixtures built from these live in conftest.py.

The plan is shrunk by hand (tiny patches and networks) so that a whole epoch takes seconds on
two CPU cores; 3d_lowres/3d_cascade_fullres are added to it (the phantoms are too small for
the planner to want them) and the lowres data preprocessed with the same runner.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from autoliver import api
from autoliver.core.layout import Workspace
from autoliver.examples.phantom import write_phantom_dataset
from autoliver.io.checkpoint import save_checkpoint
from autoliver.preprocess.runner import preprocess_dataset
from planning.plans import Plans

DATASET = "Dataset900_LiverPhantom"
FAST = ["--threads", "1", "-np", "0", "--no-progress", "--val-iters", "1"]
# random-weight models of the shared model workspace: (configuration, fold)
RANDOM_MODELS = (("2d", "0"), ("2d", "1"), ("3d_fullres", "0"), ("3d_lowres", "0"), ("3d_cascade_fullres", "0"))


def tiny(config, patch, features, batch):
    n, d = len(features), config.network_dims
    return replace(config, patch_size=tuple(patch), features_per_stage=tuple(features), batch_size=batch, n_stages=n,
                   kernel_sizes=((3,) * d,) * n, strides=((1,) * d,) + ((2,) * d,) * (n - 1))


def build_tiny_workspace(root, n_cases=4, shape=(24, 48, 48), spacing=(8.0, 8.0, 8.0), seed=0, lowres=True,
                         patch3d=(16, 32, 32), features=(4, 8, 16), batch3d=2, patch2d=None, features2d=None, batch2d=4) -> Workspace:
    """Phantoms -> plan_and_preprocess (cpu) -> hand-shrunk plan (+ 3d_lowres and cascade)."""
    ws = Workspace(root)
    write_phantom_dataset(ws.raw, n_cases, np.random.default_rng(seed), shape=shape, spacing=spacing, dataset_name=DATASET)
    summary = api.plan_and_preprocess(DATASET, ws, device="cpu", options=api.StageOptions(n_jobs=1, progress=False))
    plans = Plans.load(summary.plans_path)
    c = dict(plans.configurations)
    c["2d"] = tiny(c["2d"], patch2d or patch3d[1:], features2d or features, batch2d)
    c["2.5d"] = tiny(c["2.5d"], patch2d or patch3d[1:], features2d or features, batch2d)
    c["3d_fullres"] = tiny(c["3d_fullres"], patch3d, features, batch3d)
    spacings = dict(plans.data_spacings)
    if lowres:
        low_spacing = tuple(2 * s for s in c["3d_fullres"].spacing)
        c["3d_lowres"] = replace(tiny(c["3d_fullres"], (8, 16, 16), features, 2), name="3d_lowres", data_identifier="lowres", spacing=low_spacing)
        c["3d_cascade_fullres"] = replace(c["3d_fullres"], name="3d_cascade_fullres", previous_stage="3d_lowres")
        spacings["lowres"] = low_spacing
    plans = replace(plans, configurations=c, data_spacings=spacings)
    api.write_plans(plans, summary.plans_path)
    if lowres:
        dataset = api.validate(DATASET, ws, api.StageOptions(progress=False))
        preprocess_dataset(dataset, plans, ws.preprocessed(DATASET), ["lowres"], progress=False)
    return ws


def copy_workspace(source: Workspace, root: Path) -> Workspace:
    """A private copy of a workspace (raw, preprocessed, results) at ``root``."""
    shutil.copytree(source.root, root, symlinks=True)
    return Workspace(root)


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """(size, mtime) of every file under ``root``: compared at the end of the session to prove
    that no test wrote into a shared template."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(Path(root).rglob("*")) if p.is_file()}


HANG_GUARD_S = 900.0  # waits on a child process give up after this: a guard against hangs, never a speed check


def wait_for(condition, poll_s: float = 0.2, hang_guard_s: float = HANG_GUARD_S) -> None:
    """Poll ``condition()`` until it is true; TimeoutError only after ``hang_guard_s``."""
    end = time.monotonic() + hang_guard_s
    while not condition():
        if time.monotonic() > end:
            raise TimeoutError(f"still waiting after {hang_guard_s:.0f} s")
        time.sleep(poll_s)


def default_sigint() -> None:
    """``preexec_fn`` for a child that must see Ctrl-C: SIGINT back to its default action (a
    shell starts background jobs with SIGINT ignored, and children inherit that)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@contextlib.contextmanager
def torch_threads(n: int):
    """torch's intra-op threads set to ``n`` inside, restored after (on a loaded 2-core
    machine one thread runs small networks many times faster than two)."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def read_log(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def train_cli(ws, config, fold, *extra):
    """``autoliver train`` in this process, on the CPU, fast settings."""
    from autoliver.cli import main

    return main(["train", "-d", DATASET, config, str(fold), "--workspace", str(ws.root), "--device", "cpu", *FAST, *extra])


def fold_setup(ws: Workspace, configuration: str, fold, options=None, output_dir: Path | None = None):
    """The trainer's FoldSetup for a fold of the tiny workspace (splits.json is written on first use)."""
    from autoliver.train.options import TrainOptions
    from autoliver.train.setup import fold_setup as setup

    s = setup(ws.dataset(DATASET), configuration, fold, options or TrainOptions(device="cpu"))
    return s if output_dir is None else replace(s, output_dir=Path(output_dir))


def write_random_models(ws: Workspace, models=RANDOM_MODELS, arch: str | None = None) -> Path:
    """A model folder, ``ws.results(DATASET)``, as training leaves it (plans.json, splits.json,
    ``<configuration>/fold_<k>/checkpoint_final.pt``) but with freshly initialised networks.

    Each checkpoint is the trainer's own state (``Trainer._state``) after building its network
    with seed k, with the hash and network family ``autoliver train`` records (as
    ``train.setup.fold_setup``), so the layout is exactly what training writes; no training.
    ``arch``: another network family than the configuration's."""
    from autoliver.preprocess.storage import list_cases
    from autoliver.train.options import TrainOptions
    from autoliver.train.splits import load_or_create_splits
    from autoliver.train.trainer import FoldSetup, Trainer

    paths = ws.dataset(DATASET)
    plans = Plans.load(paths.plans)
    results = ws.results(DATASET)
    load_or_create_splits(results, list_cases(paths.data("fullres")))
    class_names = tuple(k for k, _ in sorted(plans.labels.items(), key=lambda kv: kv[1]))
    for k, (configuration, fold) in enumerate(models):
        config = plans.configurations[configuration]
        network = arch or config.extra.get("arch") or config.network
        setup = FoldSetup(dataset=DATASET, config=config, plans_hash=plans.configuration_hash(configuration),
                          fold=int(fold) if str(fold).isdigit() else fold, data_folder=paths.data(config.data_identifier),
                          output_dir=paths.model.fold(configuration, fold).root, train_cases=(), val_cases=(), class_names=class_names,
                          arch=network, plans_path=paths.plans)
        trainer = Trainer(setup, TrainOptions(device="cpu", seed=k, arch=network, n_workers=0, progress=False))
        trainer._build()
        trainer._copy_plans()
        save_checkpoint(trainer.paths.final, trainer._state())
    return results


class FakeClock:
    """A clock that moves only when told: ``advance(seconds)``; call it for the time."""

    def __init__(self, start: float = 1000.0):
        self.start = self.now = float(start)

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds

    @property
    def elapsed(self) -> float:
        return self.now - self.start


class Interrupted(Exception):
    """Raised by a simulated network to stop a run as a kill would."""


class TimedNetwork(torch.nn.Module):
    """Wraps a network: every training forward advances ``clock`` by ``s_iter`` (one training
    iteration), every inference forward by ``s_tile`` per input patch (a tile of the sliding
    window or a pseudo-Dice patch). ``stop_after``: raise Interrupted at that training forward."""

    def __init__(self, net: torch.nn.Module, clock: FakeClock, s_iter: float, s_tile: float, stop_after: int | None = None):
        super().__init__()
        self.net, self.clock, self.s_iter, self.s_tile, self.stop_after = net, clock, s_iter, s_tile, stop_after
        self.train_forwards = 0

    @property
    def deep_supervision(self) -> bool:
        return getattr(self.net, "deep_supervision", False)

    @deep_supervision.setter
    def deep_supervision(self, value: bool) -> None:
        self.net.deep_supervision = value

    def forward(self, x):
        if self.training:
            self.train_forwards += 1
            if self.stop_after is not None and self.train_forwards > self.stop_after:
                raise Interrupted(f"stopped at training iteration {self.train_forwards}")
            self.clock.advance(self.s_iter)
        else:
            self.clock.advance(self.s_tile * x.shape[0])
        return self.net(x)


class PointwiseNet(torch.nn.Module):
    """A 1x1 convolution: logits of the right shape for any patch, in microseconds."""

    def __init__(self, dims: int, in_channels: int, n_classes: int):
        super().__init__()
        conv = torch.nn.Conv2d if dims == 2 else torch.nn.Conv3d
        self.conv = conv(in_channels, n_classes, 1)
        self.deep_supervision = True

    def forward(self, x):
        return self.conv(x)


def in_channels(config) -> int:
    return config.in_slices + (2 if config.previous_stage else 0)


def constant_loader(data_folder, cases, config, *, seed, batch_size, n_classes=3, **_):
    """An endless loader of one random batch of the configuration's patch shape (no disk, no workers)."""
    g = torch.Generator().manual_seed(seed)
    shape = (batch_size, *config.patch_size)
    target = torch.randint(0, n_classes, shape, generator=g)[:, None]
    batch = {"data": torch.randn((batch_size, in_channels(config), *config.patch_size), generator=g), "target": target,
             "tumour": (target == 2).flatten(1).any(1)}
    while True:
        yield batch
