"""A trained model (plans + one network per fold) and the prediction of one case.

``load_model`` reads a model folder, ``results/<dataset>/``: ``<configuration>/fold_<k>/``
with ``checkpoint_final.pt`` (else ``checkpoint_best.pt``, else ``checkpoint_latest.pt``, with
a warning) and the dataset's ``plans.json`` (in the model folder, else the workspace's
``preprocessed/<dataset>/plans.json``). Checkpoints are loaded with ``weights_only=True``.

``predict_case`` runs one image through the stages

    preprocess (crop to body, normalise, resample: ``iter_preprocessed``, no label)
    -> network (sliding window per fold, mirroring test-time augmentation: logits averaged
       over the mirrored copies, softmax averaged over the folds)
    -> argmax in the preprocessed grid -> ``map_back`` of the uint8 label map

so the only full-resolution array made is the uint8 label map (plus the per-class
probabilities when they are asked for). The label map has the input's exact shape and is
written with the input's geometry.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from autoliver.preprocess.normalise import air_pad_value
from autoliver.errors import MissingArtefactError, StaleArtefactError
from autoliver.io.images import Geometry
from autoliver.preprocess.case import iter_preprocessed, map_back, map_back_probabilities
from autoliver.train.checkpoint import load_checkpoint
from autoliver.train.distributed import select_device
from autoliver.train.validation import make_predictor, predict_volume
from planning.plans import Configuration, Plans

log = logging.getLogger(__name__)

CHECKPOINTS = ("checkpoint_final.pt", "checkpoint_best.pt", "checkpoint_latest.pt")
# default configuration when none is given: the first one trained (cascade stages need the
# cascade at inference, which is not implemented yet)
DEFAULT_ORDER = ("3d_fullres", "2.5d", "2d")
UNSUPPORTED = ("3d_lowres", "3d_cascade_fullres")


@dataclass(frozen=True)
class FoldNetwork:
    fold: str
    checkpoint: Path
    epoch: int
    network: torch.nn.Module


@dataclass(frozen=True)
class Model:
    """Everything prediction needs: plans, the configuration and one network per fold."""

    model_dir: Path
    plans: Plans
    configuration: Configuration
    folds: tuple[FoldNetwork, ...]
    arch: str
    n_classes: int
    device: torch.device
    pad_value: float

    @property
    def fold_names(self) -> tuple[str, ...]:
        return tuple(f.fold for f in self.folds)


@dataclass(frozen=True)
class CasePrediction:
    seg: np.ndarray  # uint8 (Z, Y, X) in the input's grid
    probabilities: np.ndarray | None  # float16 (n_classes, Z, Y, X) in the input's grid, or None
    timings: dict[str, float]  # seconds per stage


def find_plans(model_dir: Path) -> Path:
    """``<model_dir>/plans.json``, else ``<workspace>/preprocessed/<dataset>/plans.json`` for a
    model folder at ``<workspace>/results/<dataset>``."""
    model_dir = Path(model_dir)
    candidates = [model_dir / "plans.json", model_dir.parent.parent / "preprocessed" / model_dir.name / "plans.json"]
    for path in candidates:
        if path.is_file():
            return path
    raise MissingArtefactError(f"{model_dir}: no plans.json (looked at {', '.join(str(c) for c in candidates)}); "
                               f"copy the dataset's plans.json into the model folder or run `autoliver plan_and_preprocess {model_dir.name}`")


def _fold_checkpoint(fold_dir: Path) -> Path | None:
    for i, name in enumerate(CHECKPOINTS):
        path = fold_dir / name
        if path.is_file():
            if i:
                log.warning("%s: no %s; using %s (training did not finish)", fold_dir, CHECKPOINTS[0], name)
            return path
    return None


def _fold_name(text: str | int) -> str:
    text = str(text)
    if text != "all" and not text.isdigit():
        raise ValueError(f"fold must be a number or 'all', got {text!r}")
    return text


def _choose_configuration(model_dir: Path, plans: Plans, configuration: str | None) -> str:
    if configuration is not None:
        if configuration not in plans.configurations:
            raise ValueError(f"configuration {configuration!r} not in the plans; planned: {', '.join(plans.configurations)}")
        if configuration in UNSUPPORTED:
            raise ValueError(f"configuration {configuration!r}: the cascade is not yet supported at inference; use 3d_fullres, 2.5d or 2d")
        return configuration
    trained = [c for c in DEFAULT_ORDER if any((model_dir / c).glob("fold_*/checkpoint_*.pt"))]
    if not trained:
        raise MissingArtefactError(f"{model_dir}: no trained fold of {', '.join(DEFAULT_ORDER)}; "
                                   f"run `autoliver train -d {model_dir.name} 3d_fullres FOLD` first")
    return trained[0]


def load_model(model_dir: str | Path, configuration: str | None = None, folds: Sequence[str | int] | None = None,
               device: str | torch.device = "cpu") -> Model:
    """Load the plans and the networks of ``configuration``'s ``folds``.

    Default folds: every numbered fold with a checkpoint, else ``all``.
    """
    from autoliver.nets.registry import build_network, net_spec

    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise MissingArtefactError(f"{model_dir}: model folder not found; train one with `autoliver train -d DATASET CONFIG FOLD`")
    device = select_device(device) if isinstance(device, str) else device
    plans_path = find_plans(model_dir)
    plans = Plans.load(plans_path)
    name = _choose_configuration(model_dir, plans, configuration)
    config_dir = model_dir / name
    train_hint = f"run `autoliver train -d {model_dir.name} {name} FOLD`"
    if folds:
        wanted = [_fold_name(f) for f in folds]
    else:
        present = [p.name[len("fold_"):] for p in config_dir.glob("fold_*") if _fold_checkpoint(p) is not None]
        numbered = sorted((f for f in present if f.isdigit()), key=int)
        wanted = numbered or [f for f in present if f == "all"]  # cross-validation folds, else the fold trained on all cases
        if not wanted:
            raise MissingArtefactError(f"{config_dir}: no trained fold; {train_hint} first")
    networks = []
    arch = None
    for fold in wanted:
        fold_dir = config_dir / f"fold_{fold}"
        path = _fold_checkpoint(fold_dir)
        if path is None:
            raise MissingArtefactError(f"{fold_dir}: no checkpoint; {train_hint.replace('FOLD', fold)} first")
        state = load_checkpoint(path, map_location="cpu")
        if state.get("plans_hash") != plans.plans_hash:
            raise StaleArtefactError(f"{path}: trained with another plans.json than {plans_path}; predict with the plans it was trained with or retrain")
        net_info = state.get("network", {})
        arch = net_info.get("arch", "unet")
        n_classes = int(net_info.get("n_classes", 3))
        network = build_network(arch, net_spec(plans.configurations[name], n_classes))
        network.load_state_dict(state["weights"])
        network.deep_supervision = False
        network.eval().to(device)
        networks.append(FoldNetwork(fold, path, int(state["epoch"]), network))
        log.info("loaded %s (epoch %d)", path, int(state["epoch"]))
    config = plans.configurations[name]
    pad_value = air_pad_value(plans.normalisation)
    return Model(model_dir, plans, config, tuple(networks), arch or "unet", n_classes, device, pad_value)


def mirrored(predictor, spatial_axes: Sequence[int]):
    """Mirroring test-time augmentation: the mean of ``predictor`` over every combination of
    flips of ``spatial_axes`` (tensor axes of (B, C, *spatial)), each flipped back."""
    combos = [c for r in range(len(spatial_axes) + 1) for c in itertools.combinations(spatial_axes, r)]

    def predict(x: torch.Tensor) -> torch.Tensor:
        total = None
        for axes in combos:
            out = predictor(torch.flip(x, axes) if axes else x)
            out = torch.flip(out, axes) if axes else out
            total = out if total is None else total + out
        return total / len(combos)

    return predict


def tta_axes(config: Configuration) -> tuple[int, ...]:
    """Mirrored axes: every spatial axis for 3d, the in-plane ones for 2d/2.5d."""
    return (2, 3, 4) if config.network_dims == 3 else (2, 3)


def predict_preprocessed(model: Model, data: np.ndarray, tta: bool = True, step: float = 0.5) -> np.ndarray:
    """Softmax probabilities (n_classes, Z, Y, X) float32 of a preprocessed volume, averaged over folds."""
    total = None
    with torch.inference_mode():
        for fold in model.folds:
            predictor = make_predictor(fold.network, model.device, None)
            if tta:
                predictor = mirrored(predictor, tta_axes(model.configuration))
            probs = predict_volume(predictor, data, model.configuration, model.n_classes, model.device, step, pad_value=model.pad_value)
            total = probs if total is None else total.add_(probs)
            del probs
        if len(model.folds) > 1:
            total /= len(model.folds)
    return total.numpy()


def preprocess_for(model: Model, image: np.ndarray, geometry: Geometry) -> tuple[np.ndarray, dict]:
    """The image in the configuration's preprocessed grid and the properties that map back."""
    _, data, _, props = next(iter_preprocessed(image, geometry, None, model.plans, [model.configuration.data_identifier]))
    return data, props


def predict_case(model: Model, image: np.ndarray, geometry: Geometry, tta: bool = True, step: float = 0.5,
                 save_probabilities: bool = False, prepared: tuple[np.ndarray, dict] | None = None) -> CasePrediction:
    """Segment one (Z, Y, X) CT in HU; labels in ``geometry``'s grid (see the module docstring).

    ``prepared`` = ``preprocess_for(model, image, geometry)`` computed ahead (a prefetch thread).
    """
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    data, props = prepared if prepared is not None else preprocess_for(model, image, geometry)
    t1 = time.perf_counter()
    if prepared is None:
        timings["preprocess_s"] = t1 - t0
    probs = predict_preprocessed(model, data, tta=tta, step=step)
    t2 = time.perf_counter()
    timings["network_s"] = t2 - t1
    seg = map_back(probs.argmax(0).astype(np.uint8), props)
    full_probs = map_back_probabilities(probs, props).astype(np.float16) if save_probabilities else None
    timings["export_s"] = time.perf_counter() - t2
    if seg.shape != tuple(geometry.shape):  # map_back guarantees it; a mismatch is a bug
        raise RuntimeError(f"label map shape {seg.shape} differs from the input's {geometry.shape}")
    return CasePrediction(seg, full_probs, timings)
