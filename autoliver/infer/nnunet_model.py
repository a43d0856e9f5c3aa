"""A model trained by nnU-Net v2, predicted by autoliver with nnU-Net's own preprocessing.

``is_nnunet_model(path)`` recognises a model folder (``<Trainer>__<Plans>__<configuration>``
with plans.json, dataset.json, ``fold_K/checkpoint_*.pth``), a folder holding such folders
(e.g. ``DatasetNNN_Name/``) or the zip ``nnUNetv2_export_model_to_zip`` writes.
``load_nnunet_model`` reads it (checkpoints with ``weights_only=True`` only, the zip extracted
safely: ``autoliver.io.nnunet_files``) into an ``NnunetModel``, which
``autoliver.infer.runner.predict_inputs`` runs like any autoliver model (outputs, reports,
skipping finished cases, ``--shard``).

Per case (``predict_nnunet_case``), as ``nnUNetv2_predict`` does: nnU-Net's preprocessing
(``autoliver.preprocess.nnunet_steps``), then per fold the sliding window over the network
grid with nnU-Net's tiling and importance weights (``autoliver.infer.nnunet_window``) and
mirroring over the checkpoint's ``inference_allowed_mirroring_axes`` (logits averaged over the
mirrored copies), logits averaged over the folds, resampled linearly to the cropped input grid,
argmax, uncropped and transposed back. (nnU-Net averages logits, not softmax, over folds and
resamples logits before the softmax; so does this, to give the same labels.) Precision
``auto`` is nnU-Net's: fp16 autocast on a GPU, fp32 on a CPU. ROI-first inference is not used:
it would change the tiling nnU-Net uses.

Faster on a CPU, same maths: the mirrored copies of a tile go through the network as one
batch (without mirroring, ``CPU_TILES_PER_CALL`` tiles do). nnU-Net runs one copy at a time
(batch 1), where torch's CPU convolution takes its slow path for small inputs; every sample of
a batch is computed independently (instance norm, or batch norm with running statistics in eval
mode), so the logits are the same up to float rounding. On a GPU the copies stay one at a time
(bounded memory).
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from autoliver.core.device import select_device
from autoliver.core.errors import CheckpointError, MissingArtefactError, UsageError
from autoliver.infer.nnunet_window import axis_weights, starts_for
from autoliver.infer.pipeline import PRECISION_NAMES, CasePrediction
from autoliver.infer.precision import autocast_dtype
from autoliver.infer.predictor import FoldNetwork, mirror_combos, mirrored
from autoliver.infer.sliding_window import Window, argmax_labels, predict_slicewise, sliding_window_predict, softmax_
from autoliver.infer.volume import make_predictor
from autoliver.io.images import Geometry
from autoliver.io.nnunet_files import CHECKPOINT_NAMES, extract_zip, find_model_folders, read_checkpoint, read_json, zip_has_model
from autoliver.nets.nnunet_arch import UnsupportedModelError, build_nnunet_network
from autoliver.preprocess.nnunet_steps import Prepared, logits_to_cropped_grid, prepare, uncrop_and_transpose_back

log = logging.getLogger(__name__)

# trainers that build nnU-Net's stock network from the plans and change only how it is trained
CPU_TILES_PER_CALL = 4
STOCK_TRAINER = re.compile(r"^nnUNetTrainer(_\d+epochs)?(_?NoMirroring)?$|^nnUNetTrainer(NoDA|DA5|DAOrd0|NoDeepSupervision|CELoss|DiceLoss"
                           r"|_onlyMirror01|_probabilisticOversampling_\w+|_\d+epochs_NoMirroring|_Xepochs)$")


@dataclass(frozen=True)
class NnunetModel:
    model_dir: Path
    trainer: str
    plans_name: str
    configuration_name: str
    plans: dict
    config: dict  # the configuration, ``inherits_from`` resolved
    dataset: dict
    networks: tuple[FoldNetwork, ...]
    mirror_axes: tuple[int, ...]
    n_classes: int
    device: torch.device
    autocast: torch.dtype | None = None

    @property
    def label(self) -> str:
        return f"nnunet:{self.configuration_name}"

    @property
    def folds(self) -> dict[str, list[str]]:
        return {self.label: [f.fold for f in self.networks]}

    @property
    def patch_size(self) -> tuple[int, ...]:
        return tuple(int(p) for p in self.config["patch_size"])

    def describe(self) -> dict:
        return {"configurations": [self.label], "folds": self.folds, "source": str(self.model_dir), "postprocessing": [],
                "arch": {self.label: self.networks[0].network.class_name}, "trainer": self.trainer, "plans": self.plans_name}


def is_nnunet_model(path: str | Path) -> bool:
    """Whether ``path`` is an nnU-Net v2 model folder, a folder holding some, or an exported model zip."""
    path = Path(path)
    if path.is_file():
        return path.suffix.lower() == ".zip" and zip_has_model(path)
    return path.is_dir() and bool(find_model_folders(path, depth=2))


def resolve_configuration(plans: dict, name: str, where: str) -> dict:
    configs = plans.get("configurations", {})
    if name not in configs:
        raise UsageError(f"{where}: no configuration {name!r}; it has {', '.join(configs)}")
    conf = dict(configs[name])
    seen = {name}
    while "inherits_from" in conf:
        parent = conf.pop("inherits_from")
        if parent in seen or parent not in configs:
            raise UsageError(f"{where}: configuration {name!r} inherits from {parent!r}, which is missing or circular")
        seen.add(parent)
        conf = {**configs[parent], **conf}
    return conf


def _choose_folder(root: Path, configuration: str | None) -> Path:
    folders = find_model_folders(root, depth=3)
    if not folders:
        raise MissingArtefactError(f"{root}: no nnU-Net model folder (Trainer__Plans__configuration with plans.json, dataset.json, fold_K/)")
    if configuration:
        picked = [f for f in folders if f.name == configuration or f.name.split("__")[-1] == configuration]
        if len(picked) == 1:
            return picked[0]
        names = ", ".join(f.name for f in folders)
        raise UsageError(f"{root}: {'no' if not picked else 'several'} model folder(s) for configuration {configuration!r}; "
                         f"it has {names}; name one with -c")
    if len(folders) > 1:
        raise UsageError(f"{root}: {len(folders)} nnU-Net models ({', '.join(f.name for f in folders)}); choose one with -c NAME")
    return folders[0]


def _fold_checkpoint(fold_dir: Path, checkpoint: str) -> Path | None:
    names = [checkpoint] + [c for c in CHECKPOINT_NAMES if c != checkpoint and checkpoint == CHECKPOINT_NAMES[0]]
    for i, name in enumerate(names):
        if (fold_dir / name).is_file():
            if i:
                log.warning("%s: no %s; using %s", fold_dir, checkpoint, name)
            return fold_dir / name
    return None


def _n_classes(dataset: dict, where: Path) -> int:
    labels = dataset.get("labels", {})
    if any(isinstance(v, (list, tuple)) for v in labels.values()):
        raise UnsupportedModelError(f"{where}: region-based labels are not supported; predict this model with nnUNetv2_predict")
    if not labels:
        raise UsageError(f"{where}: no labels")
    return len(labels)


def _precision(precision: str, device: torch.device) -> torch.dtype | None:
    if precision == "auto":  # nnU-Net's own choice
        return torch.float16 if device.type == "cuda" else None
    return autocast_dtype(precision, device)


def load_nnunet_model(path: str | Path, folds: Sequence[str | int] | None = None, checkpoint: str = "checkpoint_final.pth",
                      device: str | torch.device = "cpu", configuration: str | None = None, precision: str = "auto",
                      cache_dir: str | Path | None = None) -> NnunetModel:
    """The nnU-Net model at ``path`` (folder, parent folder or export zip) ready to predict.

    ``folds``: default every ``fold_K`` with a checkpoint (``fold_all`` when there are none);
    ``configuration``: which model when ``path`` holds several (configuration or folder name);
    ``cache_dir``: where a zip is extracted (default: the system's temporary folder).
    """
    path = Path(path)
    if not path.exists():
        raise MissingArtefactError(f"{path}: nnU-Net model not found")
    root = extract_zip(path, cache_dir) if path.is_file() else path
    folder = _choose_folder(root, configuration)
    parts = folder.name.split("__")
    plans = read_json(folder / "plans.json", "plans.json")
    dataset = read_json(folder / "dataset.json", "dataset.json")
    trainer, plans_name, config_name = parts if len(parts) == 3 else ("nnUNetTrainer", plans.get("plans_name", "?"), None)
    if config_name is None:
        if len(plans.get("configurations", {})) != 1:
            raise UsageError(f"{folder}: folder name is not Trainer__Plans__configuration; rename it as nnU-Net named it")
        config_name = next(iter(plans["configurations"]))
    if not STOCK_TRAINER.match(trainer):
        raise UnsupportedModelError(f"{folder}: trainer {trainer!r} is a custom nnU-Net trainer: it may build another network "
                                    "than its plans describe; autoliver predicts models of nnU-Net's stock trainers only "
                                    "(nnUNetTrainer and its schedule variants); use nnUNetv2_predict for this one")
    config = resolve_configuration(plans, config_name, str(folder / "plans.json"))
    if config.get("previous_stage"):
        raise UnsupportedModelError(f"{folder}: cascade configuration {config_name!r} (previous stage "
                                    f"{config['previous_stage']!r}) is not supported yet; predict it with nnUNetv2_predict")
    n_channels = len(dataset.get("channel_names", dataset.get("modality", {})))
    if n_channels != 1:
        raise UnsupportedModelError(f"{folder / 'dataset.json'}: {n_channels} input channels; autoliver predicts single-channel (CT) models")
    n_classes = _n_classes(dataset, folder / "dataset.json")
    device = select_device(device) if isinstance(device, str) else device
    if folds:
        wanted = [str(f) for f in folds]
    else:
        present = [p.name[len("fold_"):] for p in sorted(folder.glob("fold_*")) if _fold_checkpoint(p, checkpoint)]
        wanted = sorted((f for f in present if f.isdigit()), key=int) or [f for f in present if f == "all"]
        if not wanted:
            raise MissingArtefactError(f"{folder}: no fold_K/{checkpoint}; train a fold with nnUNetv2_train first")
    networks, axes = [], None
    for fold in wanted:
        fold_dir = folder / f"fold_{fold}"
        ck_path = _fold_checkpoint(fold_dir, checkpoint)
        if ck_path is None:
            raise MissingArtefactError(f"{fold_dir}: no {checkpoint}")
        state = read_checkpoint(ck_path)
        ck_config = (state.get("init_args") or {}).get("configuration")
        if ck_config is not None and ck_config != config_name:
            raise CheckpointError(f"{ck_path}: trained as configuration {ck_config!r} but its folder says {config_name!r}; "
                                  "rename the folder Trainer__Plans__configuration as nnU-Net wrote it")
        ck_trainer = str(state.get("trainer_name", trainer))
        if not STOCK_TRAINER.match(ck_trainer):
            raise UnsupportedModelError(f"{ck_path}: trained by custom trainer {ck_trainer!r}; use nnUNetv2_predict for it")
        network = build_nnunet_network(config["architecture"], n_channels, n_classes, where=str(folder / "plans.json"))
        try:
            network.load_state_dict(state["network_weights"], strict=True)
        except RuntimeError as exc:
            first = str(exc).strip().splitlines()[0][:300]
            raise CheckpointError(f"{ck_path}: its weights do not fit the network {folder / 'plans.json'} describes ({first})") from None
        network.eval().to(device)
        mirror = state.get("inference_allowed_mirroring_axes")
        fold_axes = tuple(int(a) for a in mirror) if mirror is not None else ()
        if axes is not None and fold_axes != axes:
            raise CheckpointError(f"{ck_path}: mirroring axes {fold_axes} differ from the other folds' {axes}")
        axes = fold_axes
        networks.append(FoldNetwork(fold, ck_path, int(state.get("current_epoch", 0)), network))
        log.info("loaded %s (%s, epoch %s)", ck_path, network.class_name, state.get("current_epoch"))
    return NnunetModel(folder, trainer, plans_name, config_name, plans, config, dataset, tuple(networks), axes or (),
                       n_classes, device, _precision(precision, device))


def prepare_case(model: NnunetModel, image: np.ndarray, geometry: Geometry) -> Prepared:
    """A (Z, Y, X) image in its own grid -> nnU-Net's network input (``nnunet_steps.prepare``)."""
    return prepare(np.asarray(image)[None], geometry.spacing, model.plans, model.config, str(model.model_dir / "plans.json"))


def mirrored_batch(predictor, spatial_axes: Sequence[int]):
    """``autoliver.infer.predictor.mirrored`` with every mirrored copy in one predictor call
    (a batch of copies x inputs); the same mean, in the same order."""
    combos = mirror_combos(spatial_axes)

    def predict(x: torch.Tensor) -> torch.Tensor:
        out = predictor(torch.cat([torch.flip(x, axes) if axes else x for axes in combos]))
        n, total = x.shape[0], None
        for i, axes in enumerate(combos):
            part = out[i * n : (i + 1) * n]
            part = torch.flip(part, axes) if axes else part
            total = part if total is None else total + part
        return total / len(combos)

    return predict


def predict_logits(model: NnunetModel, prepared: Prepared, tta: bool = True, step: float = 0.5) -> torch.Tensor:
    """Logits (K, Z, Y, X) float32 of the network grid, averaged over mirrorings and folds."""
    image = torch.from_numpy(prepared.data)
    patch = model.patch_size
    dims = len(patch)
    spatial = prepared.data.shape[1:] if dims == 3 else prepared.data.shape[2:]
    cpu = model.device.type == "cpu"
    mirror = tta and bool(model.mirror_axes)
    window = Window(patch, step=step, n_classes=model.n_classes, device=model.device, pad_value=0.0,
                    starts=starts_for(spatial, patch, step), axis_weights=axis_weights(patch),
                    tiles_per_call=CPU_TILES_PER_CALL if cpu and not mirror else 1)
    total = None
    with torch.inference_mode():
        for fold in model.networks:
            predictor = make_predictor(fold.network, model.device, model.autocast)
            if mirror:
                predictor = (mirrored_batch if cpu else mirrored)(predictor, [a + 2 for a in model.mirror_axes])
            if dims == 3:
                out = sliding_window_predict(predictor, image, window)
            else:
                out = predict_slicewise(predictor, image, window)
            total = out if total is None else total.add_(out)
        if len(model.networks) > 1:
            total /= len(model.networks)
    return total


def predict_nnunet_case(model: NnunetModel, prepared: Prepared, geometry: Geometry, tta: bool = True, step: float = 0.5,
                        save_probabilities: bool = False) -> CasePrediction:
    """Labels (uint8, the input's grid) of one prepared case, as ``nnUNetv2_predict`` gives them."""
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    logits = predict_logits(model, prepared, tta, step)
    timings["network_s"] = time.perf_counter() - t0
    t1 = time.perf_counter()
    cropped = logits_to_cropped_grid(logits.numpy(), prepared, model.config)
    del logits
    seg = uncrop_and_transpose_back(argmax_labels(cropped), prepared, model.plans)
    probs = None
    if save_probabilities:
        soft = softmax_(torch.from_numpy(cropped)).numpy()
        full = np.zeros((soft.shape[0], *prepared.shape_before_cropping), dtype=np.float16)
        full[0] = 1.0
        full[(slice(None), *(slice(a, b) for a, b in prepared.bbox))] = soft
        back = [0] + [int(a) + 1 for a in model.plans.get("transpose_backward", [0, 1, 2])]
        probs = np.ascontiguousarray(full.transpose(back))
    timings["export_s"] = time.perf_counter() - t1
    if seg.shape != tuple(geometry.shape):
        raise RuntimeError(f"label map shape {seg.shape} differs from the input's {geometry.shape}")
    info = {**model.describe(), "precision": PRECISION_NAMES.get(model.autocast, str(model.autocast)), "roi": None}
    return CasePrediction(seg.astype(np.uint8, copy=False), probs, timings, info)
