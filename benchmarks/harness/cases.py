"""Case builders, each in one place: phantoms, the shipped real cases, raw datasets, held-out
test folders, preprocessed workspaces and tiny trained models; the built ones are cached
(``cache.entry``) under parameters that name them completely.

- phantoms come from ``autoliver.examples.phantom`` (image, labels 0/1/2, LiTS-like HU),
  raw datasets (nnU-Net v2 layout: real cases + phantoms) from ``autoliver.examples.dataset``,
  the real CT cases from ``autoliver.examples``;
- ``tiny_workspace`` / ``tiny_model``: the quick mode's inputs: a few 24 x 48 x 48 phantoms at
  8 mm, autoliver's CPU plan shrunk to 4..16 features, models trained for 2 iterations.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np

from benchmarks.harness import cache

LITS_SPACING = (1.0, 0.77, 0.77)
TINY_DATASET = "Dataset909_BenchTiny"
TINY = {"n_cases": 4, "shape": (24, 48, 48), "spacing": (8.0, 8.0, 8.0), "seed": 0,
        "2d": {"patch": (32, 32), "batch": 4, "features": (4, 8, 16)}, "3d_fullres": {"patch": (16, 32, 32), "batch": 2, "features": (4, 8, 16)}}


def phantom(shape, spacing=LITS_SPACING, seed=0, n_tumours: int = 3):
    """(image, labels uint8, geometry) of a synthetic CT; ``seed`` seeds numpy's generator (an int or a list)."""
    from autoliver.examples.dataset import phantom_geometry
    from autoliver.examples.phantom import make_phantom

    image, label = make_phantom(tuple(shape), tuple(spacing), np.random.default_rng(seed), n_tumours=n_tumours)
    return image, label.astype(np.uint8), phantom_geometry(image.shape, tuple(spacing))


def real_case(name: str, ctx=None):
    """(image, labels uint8, geometry) of a real CT case shipped in ``autoliver.examples``; with ``ctx``
    also kept as an .npz in the cache (a cache carried to a machine without an image reader serves it there)."""

    def read(folder: Path | None = None):
        from autoliver import examples
        from autoliver.io.images import read_image

        image, geometry = read_image(examples.image_path(name))
        label, _ = read_image(examples.label_path(name), dtype=np.uint8)
        if folder is not None:
            save_npz(folder / "case.npz", image, label, geometry)
        return image, label, geometry

    return read() if ctx is None else load_npz(cache.entry(ctx, "real_case", {"name": name}, read) / "case.npz")


def save_npz(path: Path, image, label, geometry) -> Path:
    np.savez(path, image=image, label=label, geometry=json.dumps(geometry.to_json()))
    return path


def load_npz(path: Path):
    """(image, labels, geometry) saved by ``save_npz``."""
    from autoliver.io.images import Geometry

    z = np.load(path)
    return z["image"], z["label"], Geometry.from_json(json.loads(str(z["geometry"])))


def describe(folder: Path, pattern: str = "*_0000.nii.gz") -> list[dict]:
    """Shape, spacing and file size of every image in ``folder``."""
    from autoliver.io.images import read_header

    out = []
    for path in sorted(Path(folder).glob(pattern)):
        geom, _, _ = read_header(path)
        out.append({"case": path.name[: -len("_0000.nii.gz")], "shape_zyx": list(geom.shape),
                    "spacing_zyx": [round(s, 4) for s in geom.spacing], "bytes": path.stat().st_size})
    return out


def raw_dataset(ctx, name: str, real, n_phantoms: int, shape, spacing, seed: int = 0) -> tuple[Path, Path]:
    """(raw root, raw dataset folder ``ROOT/name``): the real cases + phantoms, nnU-Net v2 layout."""
    from autoliver.examples.dataset import build_example_dataset

    params = {"name": name, "real_cases": list(real), "n_phantoms": n_phantoms, "phantom_shape": list(shape),
              "phantom_spacing": list(spacing), "seed": seed}
    root = cache.entry(ctx, "raw", params, lambda f: build_example_dataset(
        f / name, real_cases=tuple(real), n_phantoms=n_phantoms, phantom_shape=tuple(shape), phantom_spacing=tuple(spacing),
        seed=seed, overwrite=True))
    return root, root / name


def test_set(ctx, real, n_phantoms: int, shape, spacing, n_tumours: int, seed: int) -> Path:
    """``FOLDER/images/<case>_0000.nii.gz`` and ``FOLDER/labels/<case>.nii.gz``: the real cases copied,
    phantoms ``test_phantom_k`` seeded (seed, 1000 + k), so none equals a training phantom."""
    from autoliver import examples
    from autoliver.io.images import write_image

    def build(folder: Path) -> None:
        (folder / "images").mkdir()
        (folder / "labels").mkdir()
        for case in real:
            shutil.copyfile(examples.image_path(case), folder / "images" / f"{case}_0000.nii.gz")
            shutil.copyfile(examples.label_path(case), folder / "labels" / f"{case}.nii.gz")
        for k in range(n_phantoms):
            image, label, geometry = phantom(shape, spacing, [seed, 1000 + k], n_tumours)
            write_image(folder / "images" / f"test_phantom_{k:03d}_0000.nii.gz", image, geometry)
            write_image(folder / "labels" / f"test_phantom_{k:03d}.nii.gz", label, geometry)

    return cache.entry(ctx, "test_set", {"real_cases": list(real), "n_phantoms": n_phantoms, "phantom_shape": list(shape),
                                         "phantom_spacing": list(spacing), "n_tumours": n_tumours, "seed": seed}, build)


def autoliver_preprocessed(ctx, dataset: Path, configs, n_proc: int = 2) -> Path:
    """A workspace with autoliver's CPU plan of raw ``dataset`` preprocessed for ``configs``, cached."""
    from autoliver.api import StageOptions, plan_and_preprocess
    from autoliver.core.layout import Workspace

    return cache.entry(ctx, "autoliver_preprocessed", {"dataset": str(dataset), "configs": sorted(configs)}, lambda f: plan_and_preprocess(
        dataset, Workspace(f), configurations=list(configs), device="cpu", options=StageOptions(n_jobs=n_proc, progress=False)))


def shrink(cfg, patch=None, batch=None, features=None):
    """``cfg`` with another patch / batch size; ``features`` also replaces the U-Net (one stage per
    entry, 3-voxel kernels, stride 2 after the first stage)."""
    if patch is not None:
        if len(patch) != len(cfg.patch_size):
            raise ValueError(f"{cfg.name} needs a patch of {len(cfg.patch_size)} values, got {list(patch)}")
        cfg = replace(cfg, patch_size=tuple(int(p) for p in patch))
    if batch is not None:
        cfg = replace(cfg, batch_size=int(batch))
    if features is not None:
        n, d = len(features), cfg.network_dims
        cfg = replace(cfg, features_per_stage=tuple(features), n_stages=n, kernel_sizes=((3,) * d,) * n,
                      strides=((1,) * d,) + ((2,) * d,) * (n - 1))
    return cfg


def load_plans(ws: Path, dataset: str):
    from planning.plans import Plans

    return Plans.load(Path(ws) / "preprocessed" / dataset / "plans.json")


def scratch_workspace(src: Path, dataset: str, dst: Path, overrides: dict[str, dict]) -> Path:
    """A workspace at ``dst`` whose data folders link to ``src``'s and whose plans.json has
    ``overrides`` ({configuration: shrink() keywords}) applied."""
    from autoliver.api import write_plans

    pre_src, pre_dst = Path(src) / "preprocessed" / dataset, Path(dst) / "preprocessed" / dataset
    shutil.rmtree(dst, ignore_errors=True)
    pre_dst.mkdir(parents=True)
    for child in pre_src.iterdir():
        if child.is_dir():
            (pre_dst / child.name).symlink_to(child.resolve(), target_is_directory=True)
        elif child.name != "plans.json":
            shutil.copy2(child, pre_dst / child.name)
    plans = load_plans(src, dataset)
    configs = {**plans.configurations, **{c: shrink(plans.configurations[c], **kw) for c, kw in overrides.items()}}
    write_plans(replace(plans, configurations=configs), pre_dst / "plans.json")
    return Path(dst)


def network_parameters(cfg) -> int:
    from autoliver.nets.registry import build_network, net_spec

    return int(sum(p.numel() for p in build_network("unet", net_spec(cfg, 3)).parameters()))


def tiny_workspace(ctx) -> Path:
    """The quick mode's workspace: TINY["n_cases"] small phantoms, CPU plan shrunk (cached)."""
    from autoliver.api import StageOptions, plan_and_preprocess, write_plans
    from autoliver.core.layout import Workspace
    from autoliver.examples.phantom import write_phantom_dataset

    def build(folder: Path) -> None:
        ws = Workspace(folder)
        write_phantom_dataset(ws.raw, TINY["n_cases"], np.random.default_rng(TINY["seed"]), shape=TINY["shape"],
                              spacing=TINY["spacing"], dataset_name=TINY_DATASET)
        summary = plan_and_preprocess(TINY_DATASET, ws, configurations=["2d", "3d_fullres"], device="cpu",
                                      options=StageOptions(n_jobs=1, progress=False))
        plans = load_plans(folder, TINY_DATASET)
        configs = {**plans.configurations, **{c: shrink(plans.configurations[c], **TINY[c]) for c in ("2d", "3d_fullres")}}
        write_plans(replace(plans, configurations=configs), summary.plans_path)

    return cache.entry(ctx, "tiny_workspace", {k: v for k, v in TINY.items()}, build)


def train_tiny(ws: Path, dataset: str, config: str, fold="all", threads: int = 1, splits: Path | None = None, validation: bool = False):
    """Train ``config`` for 2 iterations in this process (a model for quick runs)."""
    from autoliver import api
    from autoliver.core.layout import Workspace
    from autoliver.train.options import TrainOptions

    options = TrainOptions(epochs=1, iters_per_epoch=2, val_iters=1, device="cpu", n_workers=0, progress=False,
                           final_validation=validation, threads=threads, splits_file=splits)
    return api.train(dataset, config, fold, Workspace(Path(ws)), options)


def tiny_model(ctx) -> Path:
    """The quick mode's model folder (``results/<dataset>``): 2d and 3d_fullres, fold all, trained on the tiny workspace."""
    src = tiny_workspace(ctx)

    def build(folder: Path) -> None:
        shutil.copytree(src / "preprocessed", folder / "preprocessed")
        for config in ("2d", "3d_fullres"):
            train_tiny(folder, TINY_DATASET, config, threads=ctx.threads)

    return cache.entry(ctx, "tiny_model", {"workspace": src.name}, build) / "results" / TINY_DATASET


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()] if Path(path).is_file() else []
