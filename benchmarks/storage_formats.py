"""Storage formats for preprocessed cases: write time, disk size, random-patch and full reads.

Builds a LiTS-size case from the real ``chaos_ct_sample`` (512 x 512 x 78, 2 mm slices),
stacked with alternate flips to ``--slices`` slices, cropped to the body, normalised and kept
at its in-plane spacing: real CT texture and noise, so compression ratios are realistic.
Then stores it in each format and measures. Reads are "cold" (the file's pages are dropped
from the page cache with posix_fadvise before each read series) and "warm".

    python benchmarks/storage_formats.py --slices 500 --patches 30 --out storage_bench_scratch
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import blosc2
import numpy as np

from autoliver import examples
from autoliver.io.images import read_image
from autoliver.preprocess.case import crop_and_normalise
from autoliver.preprocess.storage import blosc2_layout
from planning.plans import Normalisation, Plans

log = logging.getLogger("storage_formats")


def make_case(n_slices: int) -> np.ndarray:
    image, _ = read_image(examples.image_path("chaos_ct_sample"))
    reps = -(-n_slices // image.shape[0])
    big = np.concatenate([image if i % 2 == 0 else image[::-1] for i in range(reps)])[:n_slices]
    plans = Plans("bench", "", "cpu", 8.0, {"background": 0, "liver": 1, "tumour": 2},
                  Normalisation("ct", -17.0, 201.0, 99.0, 39.0), {"fullres": (1.0, 0.73, 0.73)}, {})
    data, _, _ = crop_and_normalise(big, None, plans)
    return data


def drop_cache(path: Path) -> None:
    for p in ([path] if path.is_file() else path.rglob("*")):
        if p.is_file():
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


class Npy:
    def __init__(self, dtype):
        self.dtype = dtype
        self.name = f"npy {np.dtype(dtype).name}"

    def write(self, path: Path, data: np.ndarray) -> Path:
        f = path / "case.npy"
        np.save(f, data.astype(self.dtype, copy=False))
        return f

    def open(self, f: Path):
        return np.load(f, mmap_mode="r")


class Blosc2:
    def __init__(self, dtype, codec, clevel, layout=None):
        self.dtype, self.codec, self.clevel, self.layout = dtype, codec, clevel, layout
        tag = "" if layout is None else " c" + "x".join(map(str, layout[0])) + " b" + "x".join(map(str, layout[1]))
        self.name = f"b2nd {np.dtype(dtype).name} {codec.name}{clevel}{tag}"

    def write(self, path: Path, data: np.ndarray) -> Path:
        f = path / "case.b2nd"
        data = data.astype(self.dtype, copy=False)
        chunks, blocks = self.layout or blosc2_layout(data.shape)
        chunks = tuple(min(c, n) for c, n in zip(chunks, data.shape))
        blocks = tuple(min(b, c) for b, c in zip(blocks, chunks))
        cparams = blosc2.CParams(codec=self.codec, clevel=self.clevel, filters=[blosc2.Filter.SHUFFLE], nthreads=2)
        blosc2.asarray(np.ascontiguousarray(data), urlpath=str(f), mode="w", chunks=chunks, blocks=blocks, cparams=cparams)
        return f

    def open(self, f: Path):
        return blosc2.open(str(f), mode="r", mmap_mode="r", dparams=blosc2.DParams(nthreads=1))


def time_reads(fmt, f: Path, shape, patches, rng, cold: bool) -> float:
    total = 0.0
    for start, size in patches:
        if cold:
            drop_cache(f)
        t = time.perf_counter()
        arr = fmt.open(f)
        sl = tuple(slice(s, s + n) for s, n in zip(start, size))
        patch = np.array(arr[sl], dtype=np.float32)  # copy: forces the read for mmap
        total += time.perf_counter() - t
        if patch.shape != tuple(size):
            raise RuntimeError(f"{fmt.name}: patch shape {patch.shape} != {size}")
    return total / len(patches) * 1000.0


def random_patches(shape, size, n, rng):
    size = tuple(min(a, b) for a, b in zip(shape, size))
    return [(tuple(int(rng.integers(0, s - p + 1)) for s, p in zip(shape, size)), size) for _ in range(n)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slices", type=int, default=500, help="slices of the synthetic LiTS-size case")
    ap.add_argument("--patches", type=int, default=20, help="random patches per read test")
    ap.add_argument("--out", type=Path, default=None, help="scratch folder (default: a temp dir)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    data = make_case(args.slices)
    log.info("case: shape %s, %.0f MB as float32", data.shape, data.nbytes / 2**20)
    patch3d = (128, 128, 128)
    formats = [
        Npy(np.float32), Npy(np.float16),
        Blosc2(np.float32, blosc2.Codec.LZ4HC, 5),
        Blosc2(np.float16, blosc2.Codec.LZ4HC, 5),
        Blosc2(np.float16, blosc2.Codec.LZ4, 5),
        Blosc2(np.float16, blosc2.Codec.ZSTD, 1),
        Blosc2(np.float16, blosc2.Codec.ZSTD, 3),
        Blosc2(np.float16, blosc2.Codec.ZSTD, 1, ((128, 128, 128), (32, 32, 32))),
        Blosc2(np.float16, blosc2.Codec.ZSTD, 1, ((16, 512, 512), (4, 64, 64))),
    ]
    scratch = Path(tempfile.mkdtemp(prefix="storage_bench_")) if args.out is None else args.out
    rows = []
    try:
        for fmt in formats:
            folder = scratch / fmt.name.replace(" ", "_")
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(parents=True)
            t = time.perf_counter()
            f = fmt.write(folder, data)
            fd = os.open(f, os.O_RDONLY)
            os.fsync(fd)  # count the time to reach the disk, not the page cache
            os.close(fd)
            write_s = time.perf_counter() - t
            size_mb = f.stat().st_size / 2**20
            rng = np.random.default_rng(args.seed)
            p3 = random_patches(data.shape, patch3d, args.patches, rng)
            p2 = random_patches(data.shape, (1, 512, 512), args.patches, rng)
            cold3 = time_reads(fmt, f, data.shape, p3, rng, cold=True)
            warm3 = time_reads(fmt, f, data.shape, p3, rng, cold=False)
            cold2 = time_reads(fmt, f, data.shape, p2, rng, cold=True)
            drop_cache(f)
            t = time.perf_counter()
            full = np.array(fmt.open(f)[...], dtype=np.float32)
            full_s = time.perf_counter() - t
            err = float(np.abs(full - data).max())
            rows.append((fmt.name, write_s, size_mb, cold3, warm3, cold2, full_s, err))
            log.info("done %s", fmt.name)
            shutil.rmtree(folder)
    finally:
        if args.out is None:
            shutil.rmtree(scratch, ignore_errors=True)
    head = ("format", "write s", "disk MB", "128^3 cold ms", "128^3 warm ms", "slice cold ms", "full read s", "max abs err")
    print(" | ".join(f"{h:>14}" for h in head))
    for r in rows:
        print(" | ".join([f"{r[0]:>14}"] + [f"{v:14.3f}" if isinstance(v, float) and v < 1 else f"{v:14.1f}" for v in r[1:]]))


if __name__ == "__main__":
    main()
