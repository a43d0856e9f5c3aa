"""Regenerate this fixture with nnU-Net v2 itself (run under nnU-Net's Python, from the repository root):

    .venv-nnunet/bin/python tests/data/nnunet_tiny/make.py [--work /tmp/nnunet_tiny_work] [--data ../shared/data/nifti]

1. trains nnU-Net's stock ``nnUNetTrainer`` on real CT cases with a small ``3d_fullres`` U-Net
   (``benchmarks/harness/nnunet_tiny.py``: features 4-8-16-32, patch 32 x 64 x 64, spacing
   3 x 1.5 x 1.5 mm, 4 epochs of 50 iterations, CPU);
2. copies the model folder here (``model/nnUNetTrainer__nnUNetPlansTiny__3d_fullres``: plans.json,
   dataset.json, fold_0/checkpoint_final.pth without the optimiser state);
3. writes two small inputs to ``images/``: ``ct48`` (a 48^3 crop of totalseg_example_ct_full,
   3 mm) and ``aniso`` (every 5th slice of lits117_128cube, cropped to 26 x 48 x 48, i.e. 5 mm
   slices: nnU-Net's separate-z resampling);
4. runs ``nnUNetv2_predict_from_modelfolder`` (TTA on) on them into ``expected/``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[2]
sys.path.insert(0, str(REPO))

from benchmarks.harness import nnunet_tiny  # noqa: E402


def crop(image, z0: int, y0: int, x0: int, size: tuple[int, int, int], step_z: int = 1):
    import SimpleITK as sitk

    arr = sitk.GetArrayFromImage(image)
    sub = arr[z0 : z0 + size[0] * step_z : step_z, y0 : y0 + size[1], x0 : x0 + size[2]]
    out = sitk.GetImageFromArray(sub.copy())
    sp = image.GetSpacing()
    out.SetSpacing((sp[0], sp[1], sp[2] * step_z))
    out.SetOrigin(image.TransformIndexToPhysicalPoint((int(x0), int(y0), int(z0))))
    out.SetDirection(image.GetDirection())
    return out


def liver_centre(label_path: Path) -> tuple[int, int, int]:
    import numpy as np
    import SimpleITK as sitk

    lab = sitk.GetArrayFromImage(sitk.ReadImage(str(label_path)))
    idx = np.argwhere(lab > 0)
    return tuple(int(v) for v in idx.mean(0))


def make_images(data: Path, out: Path) -> None:
    import SimpleITK as sitk

    out.mkdir(parents=True, exist_ok=True)
    img = sitk.ReadImage(str(data / "totalseg_example_ct_full_image.nii.gz"))
    cz, cy, cx = liver_centre(data / "totalseg_example_ct_full_label.nii.gz")
    shape = img.GetSize()[::-1]
    z0, y0, x0 = (min(max(0, c - 24), s - 48) for c, s in zip((cz, cy, cx), shape))
    sitk.WriteImage(crop(img, z0, y0, x0, (48, 48, 48)), str(out / "ct48_0000.nii.gz"))
    img = sitk.ReadImage(str(data / "lits117_128cube_image.nii.gz"))
    cz, cy, cx = liver_centre(data / "lits117_128cube_label.nii.gz")
    shape = img.GetSize()[::-1]
    y0, x0 = (min(max(0, c - 24), s - 48) for c, s in zip((cy, cx), shape[1:]))
    sitk.WriteImage(crop(img, 0, y0, x0, (26, 48, 48), step_z=5), str(out / "aniso_0000.nii.gz"))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default="/tmp/nnunet_tiny_work")
    p.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "nifti"))
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reuse", action="store_true", help="reuse a model already trained in --work")
    a = p.parse_args(argv)
    work = Path(a.work)
    folder = work / "results" / nnunet_tiny.DATASET_NAME / f"nnUNetTrainer__{nnunet_tiny.PLANS}__{nnunet_tiny.CONFIG}"
    if not (a.reuse and (folder / "fold_0" / "checkpoint_final.pth").is_file()):
        if work.exists():
            shutil.rmtree(work)
        info = nnunet_tiny.build_model(str(work), a.data, epochs=a.epochs, iters=a.iters, threads=a.threads)
        folder = Path(info["model_dir"])
        (work / "build.json").write_text(json.dumps(info, indent=2))
    model = HERE / "model" / folder.name
    if model.exists():
        shutil.rmtree(model)
    (model / "fold_0").mkdir(parents=True)
    for name in ("plans.json", "dataset.json"):
        shutil.copyfile(folder / name, model / name)
    nnunet_tiny.strip_checkpoint(str(folder / "fold_0" / "checkpoint_final.pth"), str(model / "fold_0" / "checkpoint_final.pth"))
    make_images(Path(a.data), HERE / "images")
    expected = HERE / "expected"
    if expected.exists():
        shutil.rmtree(expected)
    subprocess.run(nnunet_tiny.predict(str(model), str(HERE / "images"), str(expected), threads=a.threads), check=True)
    for extra in ("dataset.json", "plans.json", "predict_from_raw_data_args.json"):
        (expected / extra).unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
