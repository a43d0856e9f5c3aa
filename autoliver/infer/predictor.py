"""A trained model (plans + one network per fold) and its probabilities for one volume.

``load_model`` reads a model folder, ``results/<dataset>/``: ``<configuration>/fold_<k>/``
with ``checkpoint_final.pt`` (else ``checkpoint_best.pt``, else ``checkpoint_latest.pt``, with
a warning) and the dataset's ``plans.json`` (in the model folder, else the workspace's
``preprocessed/<dataset>/plans.json``). Checkpoints are loaded with ``weights_only=True``.
A ``3d_cascade_fullres`` model carries its ``3d_lowres`` stage (``Model.previous``).

``model_probabilities`` runs the sliding window per fold (mirroring test-time augmentation:
logits averaged over the mirrored copies; softmax averaged over the folds) over a box of the
preprocessed volume. The cascade first predicts the whole volume with the lowres stage,
resamples its probabilities to the fullres grid and gives their argmax, one-hot, as extra
input channels. ``predict_case`` (autoliver.infer.pipeline) puts it together for one image.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from autoliver.core.device import select_device
from autoliver.core.errors import CheckpointError, MissingArtefactError, PlanError, StaleArtefactError, UsageError
from autoliver.core.layout import CHECKPOINTS, FoldPaths, ModelPaths, fold_name, fold_of
from autoliver.infer.engines import EngineFactory, engine_input_shape
from autoliver.infer.precision import autocast_dtype, resolve_precision
from autoliver.infer.sliding_window import argmax_labels, throughput_tiling, tile_starts
from autoliver.infer.volume import make_predictor, predict_volume
from autoliver.io.checkpoint import load_checkpoint
from autoliver.io.images import Geometry
from autoliver.preprocess.case import iter_preprocessed
from autoliver.preprocess.normalise import pad_value_for
from autoliver.preprocess.properties import CaseProperties
from autoliver.preprocess.resample import resample_probabilities
from planning.plans import Configuration, Plans

log = logging.getLogger(__name__)

Box = tuple[tuple[int, int], ...]  # ((z0, z1), (y0, y1), (x0, x1)) in a preprocessed grid
TILES = ("auto", "patch")
TILE_MB = 512.0
TILE_MAX_PATCHES = 1.6
BYTES_PER_VOXEL_FEATURE = 26.5


@dataclass(frozen=True)
class FoldNetwork:
    fold: str
    checkpoint: Path
    epoch: int
    network: torch.nn.Module
    engine: Callable[[torch.Tensor], torch.Tensor] | None = None  # an exported runtime (autoliver.infer.engines); None: torch


def fold_predictor(model: "Model", fold: FoldNetwork) -> Callable[[torch.Tensor], torch.Tensor]:
    """What runs a fold's network on a batch of tiles: its engine, else the torch network."""
    return fold.engine if fold.engine is not None else make_predictor(fold.network, model.device, model.autocast)


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
    autocast: torch.dtype | None = None  # network precision (None: float32)
    previous: "Model | None" = None  # cascade: the stage whose prediction is extra input
    liver: "Model | None" = None  # a two-stage design's tumour stage: the stage that finds the liver
    tiles: str = "patch"  # 3d inference tiles: "patch" (the training patch) or "auto" (``throughput_tiling``)
    tile_mb: float = TILE_MB  # "auto": the largest tile's activations, estimated (``tile_voxels``)

    @property
    def fold_names(self) -> tuple[str, ...]:
        return tuple(f.fold for f in self.folds)

    @property
    def data_identifiers(self) -> tuple[str, ...]:
        """Preprocessed grids this model reads (its own and its previous stage's)."""
        own = (self.configuration.data_identifier,)
        for stage in (self.previous, self.liver):
            if stage is not None:
                own = tuple(dict.fromkeys(stage.data_identifiers + own))
        return own


def network_divisor(config: Configuration) -> tuple[int, ...]:
    """Per spatial axis, the product of the network's strides: input sizes must be multiples of it."""
    out = [1] * len(config.patch_size)
    for stride in config.strides:
        out = [o * int(v) for o, v in zip(out, stride)]
    return tuple(out)


def tile_voxels(config: Configuration, tile_mb: float) -> int:
    """The most voxels an inference tile may have: at most ``TILE_MAX_PATCHES`` training
    patches (instance normalisation sees the whole tile: measured on real CT and LiTS-size
    phantoms, tiles up to 1.6 patches kept the liver Dice of the patch window, 2.7 patches lost
    up to 0.3 and one whole-volume tile up to 0.55) and about ``tile_mb`` MiB of activations
    (~26.5 bytes per voxel and first-stage feature in float32 with torch); never fewer than
    the patch's."""
    patch = int(np.prod(config.patch_size))
    per_voxel = BYTES_PER_VOXEL_FEATURE * int(config.features_per_stage[0])
    return max(patch, min(int(TILE_MAX_PATCHES * patch), int(tile_mb * 2**20 / per_voxel)))


def auto_tiles(model: "Model") -> bool:
    """Whether ``model`` runs on ``throughput_tiling``'s tiles (a 3d network with ``tiles="auto"``)."""
    return model.tiles == "auto" and model.configuration.network_dims == 3


def inference_tiling(model: "Model", shape: Sequence[int], step: float) -> tuple[tuple[int, ...], list[list[int]]] | None:
    """(tile, starts) of a model with ``auto_tiles`` for a volume of ``shape``; None: the patch-sized window."""
    if not auto_tiles(model):
        return None
    config = model.configuration
    return throughput_tiling(shape, config.patch_size, network_divisor(config), tile_voxels(config, model.tile_mb), step)


def network_from_state(state: dict, config: Configuration, path: Path, plans_source: str, n_classes: int = 3
                       ) -> tuple[torch.nn.Module, str, int]:
    """(network in eval mode without deep supervision, arch, n_classes) of a loaded checkpoint
    ``state`` of ``path``; CheckpointError when its weights do not fit the network ``config``
    (from ``plans_source``) describes."""
    from autoliver.nets.registry import build_network, net_spec

    info = state.get("network", {})
    arch = info.get("arch", "unet")
    n_classes = int(info.get("n_classes", n_classes))
    network = build_network(arch, net_spec(config, n_classes))
    try:
        network.load_state_dict(state["weights"])
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[-1].strip() if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path}: its weights do not fit the {arch} network that {plans_source} describes ({first}); "
                              "predict with the plans it was trained with, or retrain the fold") from None
    network.deep_supervision = False
    return network.eval(), arch, n_classes


def find_plans(model_dir: Path) -> Path:
    """``<model_dir>/plans.json``, else ``<workspace>/preprocessed/<dataset>/plans.json`` for a
    model folder at ``<workspace>/results/<dataset>``."""
    model_dir = Path(model_dir)
    candidates = ModelPaths(model_dir).plans_candidates()
    for path in candidates:
        if path.is_file():
            return path
    raise MissingArtefactError(f"{model_dir}: no plans.json (looked at {', '.join(str(c) for c in candidates)}); "
                               f"copy the dataset's plans.json into the model folder or run `autoliver plan_and_preprocess {model_dir.name}`")


def _fold_checkpoint(fold_dir: Path) -> Path | None:
    for i, path in enumerate(FoldPaths(fold_dir).checkpoints()):
        if path.is_file():
            if i:
                log.warning("%s: no %s; using %s (training did not finish)", fold_dir, CHECKPOINTS[0], path.name)
            return path
    return None


def _fold_name(text: str | int) -> str:
    return fold_of(fold_name(text))


def _choose_configuration(model_dir: Path, plans: Plans, configuration: str | None) -> str:
    if configuration is not None:
        if configuration not in plans.configurations:
            raise UsageError(f"configuration {configuration!r} not in the plans; planned: {', '.join(plans.configurations)}")
        return configuration
    paths = ModelPaths(model_dir)
    order = plans.ordered_configurations()  # without -c and inference_plan.json: the first one trained
    trained = [c for c in order if any(_fold_checkpoint(f) is not None for f in paths.fold_dirs(c))]
    if not trained:
        raise MissingArtefactError(f"{model_dir}: no trained fold of {', '.join(order)}; "
                                   f"run `autoliver train -d {model_dir.name} 3d_fullres FOLD` first")
    return trained[0]


def load_model(model_dir: str | Path, configuration: str | None = None, folds: Sequence[str | int] | None = None,
               device: str | torch.device = "cpu", precision: str = "auto", engine: str = "torch") -> Model:
    """Load the plans and the networks of ``configuration``'s ``folds``.

    Default folds: every numbered fold with a checkpoint, else ``all``. A cascade
    configuration also loads its previous stage (the same folds when it has them all, else
    its default folds). ``precision``: see autoliver.infer.precision. ``engine``: torch, or a
    CPU runtime each network is exported to once and cached beside its checkpoint
    (``autoliver.infer.engines``: auto, onnxruntime, openvino; torch when none is installed).
    """
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise MissingArtefactError(f"{model_dir}: model folder not found; train one with `autoliver train -d DATASET CONFIG FOLD`")
    device = select_device(device) if isinstance(device, str) else device
    plans_path = find_plans(model_dir)
    plans = Plans.load(plans_path)
    name = _choose_configuration(model_dir, plans, configuration)
    paths = ModelPaths(model_dir)
    config_dir = paths.configuration(name)
    train_hint = f"run `autoliver train -d {model_dir.name} {name} FOLD`"
    if folds:
        wanted = [_fold_name(f) for f in folds]
    else:
        present = [fold_of(p.name) for p in paths.fold_dirs(name) if _fold_checkpoint(p) is not None]
        numbered = sorted((f for f in present if f.isdigit()), key=int)
        wanted = numbered or [f for f in present if f == "all"]  # cross-validation folds, else the fold trained on all cases
        if not wanted:
            raise MissingArtefactError(f"{config_dir}: no trained fold; {train_hint} first")
    networks = []
    arch = None
    factory = None if engine == "torch" else EngineFactory(engine, device, precision=resolve_precision(precision, device))
    for fold in wanted:
        fold_dir = paths.fold(name, fold).root
        path = _fold_checkpoint(fold_dir)
        if path is None:
            raise MissingArtefactError(f"{fold_dir}: no checkpoint; {train_hint.replace('FOLD', fold)} first")
        state = load_checkpoint(path, map_location="cpu")
        if not plans.hash_matches(state.get("plans_hash"), name):
            raise StaleArtefactError(f"{path}: trained with another plans.json than {plans_path}; predict with the plans it was trained with or retrain")
        network, arch, n_classes = network_from_state(state, plans.configurations[name], path, str(plans_path))
        network.to(device)
        runner = None
        if factory is not None and factory.name != "torch":
            runner = factory.build(network, engine_input_shape(plans.configurations[name], n_classes), checkpoint=path,
                                   dynamic=plans.configurations[name].network_dims == 3)  # 3d tiles follow the volume
        networks.append(FoldNetwork(fold, path, int(state["epoch"]), network, runner if runner is not None and runner.name != "torch" else None))
        log.info("loaded %s (epoch %d)", path, int(state["epoch"]))
    config = plans.configurations[name]
    pad_value = pad_value_for(plans, config.data_identifier)
    previous = None
    if config.previous_stage:
        have_all = all(_fold_checkpoint(paths.fold(config.previous_stage, f).root) is not None for f in wanted)
        previous = load_model(model_dir, config.previous_stage, wanted if have_all else None, device, precision, engine)
    liver = None
    if config.stage == "tumour":
        if not config.liver_stage or config.liver_stage not in plans.configurations:
            raise PlanError(f"{plans_path}: tumour stage {name} names no planned liver stage ({config.liver_stage!r}); add its recipe again")
        have_all = all(_fold_checkpoint(paths.fold(config.liver_stage, f).root) is not None for f in wanted)
        liver = load_model(model_dir, config.liver_stage, wanted if have_all else None, device, precision, engine)
    return Model(model_dir, plans, config, tuple(networks), arch or "unet", n_classes, device, pad_value,
                 autocast_dtype(precision, device), previous, liver)


def mirror_combos(spatial_axes: Sequence[int]) -> list[tuple[int, ...]]:
    """Every combination of flipped axes (none first): the mirrored copies of test-time augmentation."""
    return [c for r in range(len(spatial_axes) + 1) for c in itertools.combinations(spatial_axes, r)]


def mirrored(predictor, spatial_axes: Sequence[int]):
    """Mirroring test-time augmentation: the mean of ``predictor`` over every combination of
    flips of ``spatial_axes`` (tensor axes of (B, C, *spatial)), each flipped back."""
    combos = mirror_combos(spatial_axes)

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


def _fold_probabilities(model: Model, fold: FoldNetwork, data: np.ndarray, tta: bool, step: float,
                        prev_seg: np.ndarray | None, starts=None) -> torch.Tensor:
    predictor = fold_predictor(model, fold)
    if tta:
        predictor = mirrored(predictor, tta_axes(model.configuration))
    tile = None
    if starts is None:
        tiling = inference_tiling(model, data.shape, step)
        if tiling is not None:
            tile, starts = tiling
    return predict_volume(predictor, data, model.configuration, model.n_classes, model.device, step, prev_seg=prev_seg,
                          pad_value=model.pad_value, starts=starts, tile=tile)


def aligned_tiling(shape: Sequence[int], box: Box, config: Configuration, step: float) -> tuple[Box, list[list[int]]]:
    """The whole volume's tiles (``shape``) that reach into ``box``: (the box they span, their
    starts relative to it, per network axis). Predicting that box with those starts gives
    exactly the whole-volume result inside ``box``: every tile covering a voxel of it is run."""
    patch = tuple(config.patch_size)
    axes = range(3) if len(patch) == 3 else range(1, 3)
    out = [tuple(int(v) for v in b) for b in box]
    starts = []
    for axis, p in zip(axes, patch):
        n, (lo, hi) = int(shape[axis]), box[axis]
        if n <= p:
            out[axis] = (0, n)
            starts.append([0])
            continue
        keep = [s for s in tile_starts(n, p, step) if s < hi and s + p > lo]
        out[axis] = (keep[0], keep[-1] + p)
        starts.append([s - keep[0] for s in keep])
    return tuple(out), starts


def predict_preprocessed(model: Model, data: np.ndarray, tta: bool = True, step: float = 0.5,
                         prev_seg: np.ndarray | None = None, starts=None) -> torch.Tensor:
    """Softmax probabilities (n_classes, Z, Y, X) float32 of a preprocessed (Z, Y, X) volume,
    averaged over folds (one accumulator plus one fold's output at a time)."""
    total = None
    with torch.inference_mode():
        for fold in model.folds:
            probs = _fold_probabilities(model, fold, data, tta, step, prev_seg, starts)
            total = probs if total is None else total.add_(probs)
            del probs
        if len(model.folds) > 1:
            total /= len(model.folds)
    return total


def crop_box(array: np.ndarray, box: Box | None) -> np.ndarray:
    """The ``box`` of the last three axes of ``array`` (a view; the whole array for None)."""
    if box is None:
        return array
    return array[(Ellipsis, *(slice(a, b) for a, b in box))]


def previous_stage_labels(model: Model, prepared: dict[str, tuple[np.ndarray, dict]], tta: bool = True,
                          step: float = 0.5) -> np.ndarray:
    """A cascade's extra input: its previous stage's prediction of the whole volume, resampled
    (probabilities, linearly) to this model's grid, as uint8 labels (Z, Y, X)."""
    prev = model.previous
    if prev is None:
        raise UsageError(f"{model.configuration.name} has no previous stage")
    probs = model_probabilities(prev, prepared, None, tta, step).numpy()
    shape = prepared[model.configuration.data_identifier][0].shape
    if tuple(probs.shape[1:]) != tuple(shape):
        probs = resample_probabilities(probs, shape)
    return argmax_labels(probs)


def model_probabilities(model: Model, prepared: dict[str, tuple[np.ndarray, dict]], box: Box | None = None,
                        tta: bool = True, step: float = 0.5, prev_labels: np.ndarray | None = None) -> torch.Tensor:
    """Probabilities (n_classes, *box shape) float32 of ``model`` over ``box`` of its own grid:
    the whole-volume tiling's tiles that reach into ``box`` are run (``aligned_tiling``).

    ``prepared``: data identifier -> (preprocessed data, properties). For a cascade
    ``prev_labels`` (its previous stage's labels in this grid) is computed when not given.
    """
    data = prepared[model.configuration.data_identifier][0]
    if model.liver is not None:
        return _two_stage_probabilities(model, prepared, box, tta, step)
    if box is None or auto_tiles(model):  # "auto" tiles: the box tiled on its own
        region, starts = box, None
    else:
        region, starts = aligned_tiling(data.shape, box, model.configuration, step)
    prev_seg = None
    if model.previous is not None:
        if prev_labels is None:
            prev_labels = previous_stage_labels(model, prepared, tta, step)
        prev_seg = crop_box(prev_labels, region)
    probs = predict_preprocessed(model, crop_box(data, region), tta=tta, step=step, prev_seg=prev_seg, starts=starts)
    if region is None or region == tuple(box):
        return probs
    inner = tuple((a - r0, b - r0) for (a, b), (r0, _) in zip(box, region))
    return crop_box(probs, inner).contiguous()


def _two_stage_probabilities(model: Model, prepared: dict, box: Box | None, tta: bool, step: float) -> torch.Tensor:
    """A tumour stage with its liver stage (``autoliver.infer.two_stage``): the liver stage over
    the whole volume, the tumour stage only on the liver's box, fused into one probability map."""
    from autoliver.infer.two_stage import fuse_probabilities, stage_context, stage_min_size, two_stage_predict

    config = model.configuration
    data = prepared[config.data_identifier][0]
    liver_probs = model_probabilities(model.liver, prepared, None, tta, step)
    if tuple(liver_probs.shape[1:]) != tuple(data.shape):
        liver_probs = torch.from_numpy(resample_probabilities(liver_probs.numpy(), data.shape))
    result = two_stage_predict(argmax_labels(liver_probs), data, lambda crop: predict_preprocessed(model, crop[0], tta=tta, step=step),
                               config.spacing, config.roi_margin_mm, min_size=stage_min_size(config), context=stage_context(config))
    fused = fuse_probabilities(liver_probs, result)
    return fused if box is None else crop_box(fused, box).contiguous()


def preprocess_for(model, image: np.ndarray, geometry: Geometry) -> dict[str, tuple[np.ndarray, CaseProperties]]:
    """The image in every preprocessed grid ``model`` (a Model or an Ensemble) reads:
    data identifier -> (data, properties that map back)."""
    idents = list(model.data_identifiers)
    return {ident: (data, CaseProperties.from_json(props, f"{ident} properties"))
            for ident, data, _, props in iter_preprocessed(image, geometry, None, model.plans, idents)}
