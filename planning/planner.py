"""Experiment planner: from a dataset fingerprint and a memory budget to plans.json.

The rules follow nnU-Net v2's default planner (re-derived, with an analytic memory model in
bytes instead of a relative reference value):

* fullres target spacing: the median spacing; if one axis is much coarser (> 3x the others)
  and the images have few voxels along it (3x fewer than along the others), that axis takes
  the 10th percentile of its spacings instead (finer, never finer than the other axes), so
  that thin-slice cases are not thrown away to match a thick-slice median;
* patch: aspect ratio 1/spacing, scaled to the volume of a 256³ (3D) or 2048² (2D) patch,
  clipped to the median image shape; then shrunk, one topology step at a time along the axis
  that is largest relative to the median shape, until the memory estimate at batch 2 fits
  the budget (and, on a CPU, until the patch is small enough to train at a usable speed);
* batch: as many as fit the budget, at least 2, at most what covers 5% of the dataset's
  voxels (an overfitting guard for small datasets);
* 3d_lowres + 3d_cascade_fullres: added when the fullres patch covers less than a quarter of
  the median image; the lowres spacing grows by 1.01x steps (the coarse axes wait until the
  others are within 2x of them) until the patch covers at least a quarter of the image;
  dropped again if that leaves the lowres images less than 2x smaller than fullres;
* 2.5d: the 2D network fed k adjacent slices as channels; k odd in 3..7, the one whose slab
  k x z-spacing is closest to 6 mm (ties: fewer slices);
* CT normalisation: clip to the foreground 0.5 / 99.5 percentiles, then z-score with the
  foreground mean and std.
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np

from planning.errors import PlanError
from planning.hashing import hash_json
from planning.memory import GIB, max_batch_size, memory_breakdown, model_for, training_memory_bytes
from planning.plans import Configuration, Normalisation, Plans
from planning.topology import Topology, compute_topology, shrink_axis

DEFAULT_GPU_MEMORY_GB = 8.0
CPU_RAM_FRACTION = 0.5  # the rest is left to the OS, data-loading workers and other programs
# A CPU trains a 3D U-Net at roughly 1 MFLOP per patch voxel per step (forward + backward);
# at ~0.1 TFLOP/s a 64³ patch takes a few seconds per sample, 128³ half a minute.
CPU_MAX_PATCH_VOXELS = {3: 64**3, 2: 256**2}
CPU_MAX_BATCH = {3: 2, 2: 8}  # on a CPU a larger batch only makes each step slower
INITIAL_PATCH_VOXELS = {3: 256**3, 2: 2048**2}
ANISOTROPY_THRESHOLD = 3.0
MIN_BATCH = 2
MAX_DATASET_COVERED = 0.05
LOWRES_THRESHOLD = 0.25
LOWRES_STEP = 1.01
SLAB_MM = 6.0


def fullres_spacing(fingerprint: dict) -> tuple[tuple[float, float, float], str]:
    """Target spacing (z, y, x) mm and the rule that chose it."""
    target = np.array(fingerprint["spacing"]["median"], dtype=np.float64)
    shape = np.array(fingerprint["shape_after_crop"]["median"], dtype=np.float64)
    worst = int(np.argmax(target))
    others = [a for a in range(3) if a != worst]
    aniso_spacing = target[worst] > ANISOTROPY_THRESHOLD * max(target[a] for a in others)
    aniso_voxels = shape[worst] * ANISOTROPY_THRESHOLD < min(shape[a] for a in others)
    if aniso_spacing and aniso_voxels:
        p10 = float(fingerprint["spacing"]["percentiles"]["10"][worst])
        target[worst] = max(p10, max(target[a] for a in others) + 1e-5)
        return _floats3(target), f"median spacing; axis {worst} anisotropic: its 10th percentile {p10:.4g} mm"
    return _floats3(target), "median spacing"


def median_shape_at(fingerprint: dict, spacing: tuple[float, ...]) -> tuple[int, int, int]:
    """Median cropped image shape after resampling to ``spacing`` (per case when available)."""
    cases = fingerprint.get("cases") or {}
    if cases:
        shapes = [np.array(c["shape_after_crop"]) * np.array(c["spacing"]) / np.array(spacing) for c in cases.values()]
        med = np.median(np.vstack(shapes), axis=0)
    else:
        med = np.array(fingerprint["shape_after_crop"]["median"]) * np.array(fingerprint["spacing"]["median"]) / np.array(spacing)
    return _ints3(max(1, int(round(v))) for v in med)


def _floats3(values) -> tuple[float, float, float]:
    a, b, c = (float(v) for v in values)
    return a, b, c


def _ints3(values) -> tuple[int, int, int]:
    a, b, c = (int(v) for v in values)
    return a, b, c


def slices_for_25d(z_spacing: float) -> int:
    """Odd k in 3..7 whose slab k * z_spacing is closest to ``SLAB_MM`` (ties: smaller k)."""
    return min((3, 5, 7), key=lambda k: (abs(k * z_spacing - SLAB_MM), k))


def _initial_patch(spacing: tuple[float, ...], median_shape: tuple[int, ...]) -> list[int]:
    dims = len(spacing)
    aspect = 1.0 / np.array(spacing, dtype=np.float64)
    scale = (INITIAL_PATCH_VOXELS[dims] / np.prod(aspect)) ** (1.0 / dims)
    return [int(min(round(a * scale), m)) for a, m in zip(aspect, median_shape)]


def _fit_patch(spacing, median_shape, budget, in_channels, n_classes, model, max_voxels) -> tuple[Topology, list[int]]:
    topo = compute_topology(_initial_patch(spacing, median_shape), spacing)
    initial = list(topo.patch_size)
    while training_memory_bytes(topo, MIN_BATCH, in_channels, n_classes, model) > budget or (
        max_voxels is not None and math.prod(topo.patch_size) > max_voxels
    ):
        ratios = [p / m for p, m in zip(topo.patch_size, median_shape)]
        order = np.argsort(ratios)[::-1]
        for axis in order:
            smaller = shrink_axis(topo.patch_size, int(axis), spacing)
            if smaller.patch_size[axis] < topo.patch_size[axis]:
                topo = smaller
                break
        else:
            raise PlanError(
                f"no {len(spacing)}D patch fits a memory budget of {budget / GIB:.2f} GiB (smallest tried: "
                f"{topo.patch_size}); give more memory (--gpu-memory-gb / a GPU) or remove the configuration"
            )
    return topo, initial


def plan_configuration(
    name: str,
    spacing: tuple[float, float, float],
    median_shape: tuple[int, int, int],
    n_cases: int,
    budget_bytes: float,
    device: str,
    n_classes: int,
    data_identifier: str,
    in_slices: int = 1,
    notes: dict | None = None,
) -> Configuration:
    """One configuration: topology, patch and batch size for data at ``spacing``."""
    dims = 2 if name in ("2d", "2.5d") else 3
    model = model_for(device)
    net_spacing = tuple(spacing[-dims:])
    net_median = tuple(median_shape[-dims:])
    max_voxels = CPU_MAX_PATCH_VOXELS[dims] if device == "cpu" else None
    topo, initial = _fit_patch(net_spacing, net_median, budget_bytes, in_slices, n_classes, model, max_voxels)
    patch_voxels = math.prod(topo.patch_size)
    fits = max_batch_size(topo, budget_bytes, in_slices, n_classes, model)
    dataset_voxels = float(math.prod(median_shape)) * n_cases
    cap_5 = int(round(dataset_voxels * MAX_DATASET_COVERED / patch_voxels))
    batch = max(MIN_BATCH, min(fits, cap_5))
    if device == "cpu":
        batch = max(MIN_BATCH, min(batch, CPU_MAX_BATCH[dims]))
    breakdown = memory_breakdown(topo, batch, in_slices, n_classes, model)
    extra = {
        "memory_model": model.name,
        "memory_breakdown_gib": {k: round(v / GIB, 4) for k, v in breakdown.items()},
        "initial_patch": initial,
        "batch_fitting_budget": fits,
        "batch_cap_5_percent_of_dataset": cap_5,
        "patch_rule": "aspect 1/spacing, clipped to median shape, shrunk along the axis largest relative to the median shape until batch 2 fits"
        + (f"; CPU cap {max_voxels} voxels" if max_voxels else ""),
        "batch_rule": f"max fitting, >= {MIN_BATCH}, <= 5% of dataset voxels" + (f", CPU cap {CPU_MAX_BATCH[dims]}" if device == "cpu" else ""),
        "patch_fraction_of_median_image": round(patch_voxels / math.prod(net_median), 4),
        **(notes or {}),
    }
    return Configuration(
        name=name,
        network_dims=dims,
        data_identifier=data_identifier,
        spacing=_floats3(spacing),
        median_shape=_ints3(median_shape),
        patch_size=tuple(int(p) for p in topo.patch_size),
        batch_size=int(batch),
        n_stages=topo.n_stages,
        features_per_stage=topo.features_per_stage,
        kernel_sizes=topo.kernel_sizes,
        strides=topo.strides,
        in_slices=in_slices,
        estimated_memory_gb=round(breakdown["total"] / GIB, 4),
        extra=extra,
    )


def _plan_lowres(fullres: Configuration, n_cases, budget, device, n_classes) -> Configuration | None:
    full_spacing = np.array(fullres.spacing)
    full_median = np.array(fullres.median_shape, dtype=np.float64)
    spacing = full_spacing.copy()
    lowres, steps = None, 0
    patch_vox = float(math.prod(fullres.patch_size))
    median_vox = float(np.prod(full_median))
    while patch_vox / median_vox < LOWRES_THRESHOLD:
        coarse = spacing.max() / spacing > 2
        spacing = spacing * np.where(coarse, LOWRES_STEP, 1.0) if coarse.any() else spacing * LOWRES_STEP
        median = _ints3(max(1, int(round(v))) for v in full_spacing / spacing * full_median)
        median_vox = float(math.prod(median))
        lowres = plan_configuration("3d_lowres", tuple(spacing), median, n_cases, budget, device, n_classes, "lowres")
        patch_vox = float(math.prod(lowres.patch_size))
        steps += 1
        if steps > 5000:
            raise PlanError(f"3d_lowres: spacing search did not converge (at {spacing.tolist()} mm); report this dataset's fingerprint")
    if lowres is None or float(np.prod(full_median)) / median_vox < 2:
        return None
    return lowres


def plan_experiment(fingerprint: dict, memory_gb: float | None = None, device: str = "gpu", cpu_ram_gb: float | None = None) -> Plans:
    """Plan every configuration for the fingerprinted dataset.

    ``memory_gb``: the GPU memory target in GiB (default 8, like nnU-Net). ``device="cpu"``:
    the budget is ``CPU_RAM_FRACTION`` of ``cpu_ram_gb`` (capped by ``memory_gb`` if given),
    activations are fp32, and patches and batches are capped for speed (CPU_MAX_*).
    """
    if device == "gpu":
        budget_gb = DEFAULT_GPU_MEMORY_GB if memory_gb is None else float(memory_gb)
    elif device == "cpu":
        if cpu_ram_gb is None and memory_gb is None:
            raise ValueError("device='cpu' needs cpu_ram_gb (the machine's RAM in GiB) or memory_gb")
        budget_gb = CPU_RAM_FRACTION * float(cpu_ram_gb) if cpu_ram_gb is not None else float(memory_gb or 0.0)
        if memory_gb is not None:
            budget_gb = min(budget_gb, float(memory_gb))
    else:
        raise ValueError(f"device must be 'gpu' or 'cpu', got {device!r}")
    if budget_gb <= 0:
        raise ValueError(f"memory budget must be positive, got {budget_gb} GiB")
    budget = budget_gb * GIB
    labels = {str(k): int(v) for k, v in fingerprint.get("labels", {}).items() if isinstance(v, int)}
    n_classes = max(2, len(labels))
    n_cases = int(fingerprint["n_cases"])

    fg = fingerprint["intensity"]["foreground"]
    if fg.get("mean") is None:
        raise PlanError("fingerprint.json: no foreground voxels in any case, so no CT normalisation can be planned; check the labels (run `autoliver validate`)")
    norm = Normalisation("ct", float(fg["percentile_00_5"]), float(fg["percentile_99_5"]), float(fg["mean"]), max(float(fg["std"]), 1e-8))

    spacing, spacing_rule = fullres_spacing(fingerprint)
    median = median_shape_at(fingerprint, spacing)
    configs: dict[str, Configuration] = {}
    k = slices_for_25d(spacing[0])
    slices_rule = f"odd k in 3..7 with k x {spacing[0]:.3g} mm closest to {SLAB_MM} mm"
    for name, in_slices, notes in (("2d", 1, {}), ("2.5d", k, {"slices_rule": slices_rule})):
        configs[name] = plan_configuration(
            name, spacing, median, n_cases, budget, device, n_classes, "fullres", in_slices, {"spacing_rule": spacing_rule, **notes}
        )
    full = plan_configuration("3d_fullres", spacing, median, n_cases, budget, device, n_classes, "fullres", notes={"spacing_rule": spacing_rule})
    data_spacings = {"fullres": spacing}
    coverage = math.prod(full.patch_size) / math.prod(median)
    lowres = _plan_lowres(full, n_cases, budget, device, n_classes) if coverage < LOWRES_THRESHOLD else None
    decision = f"fullres patch covers {coverage:.3f} of the median image" + (
        f" (< {LOWRES_THRESHOLD}): 3d_lowres + cascade added" if lowres else "; no 3d_lowres"
    )
    full = replace(full, extra={**full.extra, "lowres_decision": decision})
    configs["3d_fullres"] = full
    if lowres is not None:
        rule = f"fullres spacing grown by {LOWRES_STEP}x steps until the patch covers >= {LOWRES_THRESHOLD} of the median image"
        configs["3d_lowres"] = replace(lowres, extra={**lowres.extra, "spacing_rule": rule})
        data_spacings["lowres"] = lowres.spacing
        cascade = {"input_channels": n_classes, "cascade_input": "image + one-hot 3d_lowres prediction of the foreground classes"}
        configs["3d_cascade_fullres"] = replace(full, name="3d_cascade_fullres", previous_stage="3d_lowres", extra={**full.extra, **cascade})
    return Plans(
        dataset_name=str(fingerprint.get("dataset_name", "")),
        fingerprint_hash=hash_json(fingerprint),
        device=device,
        memory_budget_gb=float(budget_gb),
        labels=labels,
        normalisation=norm,
        data_spacings=data_spacings,
        configurations=configs,
    )
