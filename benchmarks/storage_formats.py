"""Storage formats for preprocessed cases: write time, disk size, random-patch and full reads.

A LiTS-size case is built from the real ``chaos_ct_sample`` (512 x 512 x 78, 2 mm slices),
stacked with alternate flips to ``--slices`` slices, cropped to the body, normalised and kept
at its in-plane spacing: real CT texture and noise, so compression ratios are realistic. It is
stored in each format (.npy float32 / float16, blosc2 b2nd with several codecs, levels and
chunk / block layouts) and read back: random 128^3 patches "cold" (the file's pages dropped
from the page cache with posix_fadvise before each read) and "warm", random whole slices
cold, and the whole array.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import numpy as np

from benchmarks.harness import cases


def add_arguments(p) -> None:
    p.add_argument("--slices", type=int, default=500, help="slices of the LiTS-size case (default: %(default)s)")
    p.add_argument("--patches", type=int, default=20, help="random patches per read test (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0)


def make_case(ctx, n_slices: int) -> np.ndarray:
    from autoliver.preprocess.case import crop_and_normalise
    from planning.plans import Normalisation, Plans

    image = cases.real_case("chaos_ct_sample", ctx)[0]
    big = np.concatenate([image if i % 2 == 0 else image[::-1] for i in range(-(-n_slices // image.shape[0]))])[:n_slices]
    plans = Plans("bench", "", "cpu", 8.0, {"background": 0, "liver": 1, "tumour": 2},
                  Normalisation("ct", -17.0, 201.0, 99.0, 39.0), {"fullres": (1.0, 0.73, 0.73)}, {})
    return crop_and_normalise(big, None, plans)[0]


def drop_cache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def formats() -> list[tuple[str, object, object]]:
    """(name, write(path, data) -> file, open(file) -> array-like) of every format compared."""
    import blosc2

    from autoliver.preprocess.storage import blosc2_layout

    def npy(dtype):
        def write(folder: Path, data):
            np.save(folder / "case.npy", data.astype(dtype, copy=False))
            return folder / "case.npy"
        return f"npy {np.dtype(dtype).name}", write, lambda f: np.load(f, mmap_mode="r")

    def b2nd(dtype, codec, clevel, layout=None):
        def write(folder: Path, data):
            data = np.ascontiguousarray(data.astype(dtype, copy=False))
            chunks, blocks = layout or blosc2_layout(data.shape)
            chunks = tuple(min(c, n) for c, n in zip(chunks, data.shape))
            blosc2.asarray(data, urlpath=str(folder / "case.b2nd"), mode="w", chunks=chunks, blocks=tuple(min(b, c) for b, c in zip(blocks, chunks)),
                           cparams=blosc2.CParams(codec=codec, clevel=clevel, filters=[blosc2.Filter.SHUFFLE], nthreads=2))
            return folder / "case.b2nd"
        tag = "" if layout is None else " c" + "x".join(map(str, layout[0])) + " b" + "x".join(map(str, layout[1]))
        return (f"b2nd {np.dtype(dtype).name} {codec.name}{clevel}{tag}", write,
                lambda f: blosc2.open(str(f), mode="r", mmap_mode="r", dparams=blosc2.DParams(nthreads=1)))

    c = blosc2.Codec
    return [npy(np.float32), npy(np.float16), b2nd(np.float32, c.LZ4HC, 5), b2nd(np.float16, c.LZ4HC, 5), b2nd(np.float16, c.LZ4, 5),
            b2nd(np.float16, c.ZSTD, 1), b2nd(np.float16, c.ZSTD, 3), b2nd(np.float16, c.ZSTD, 1, ((128, 128, 128), (32, 32, 32))),
            b2nd(np.float16, c.ZSTD, 1, ((16, 512, 512), (4, 64, 64)))]


def read_ms(open_fn, f: Path, patches, cold: bool) -> float:
    """Mean milliseconds to open ``f`` and read each patch (copied: forces the read of a memory map)."""
    total = 0.0
    for start, size in patches:
        if cold:
            drop_cache(f)
        t = time.perf_counter()
        patch = np.array(open_fn(f)[tuple(slice(s, s + n) for s, n in zip(start, size))], dtype=np.float32)
        total += time.perf_counter() - t
        if patch.shape != tuple(size):
            raise RuntimeError(f"{f}: patch shape {patch.shape} != {size}")
    return total / len(patches) * 1000.0


def random_patches(shape, size, n, rng):
    size = tuple(min(a, b) for a, b in zip(shape, size))
    return [(tuple(int(rng.integers(0, s - p + 1)) for s, p in zip(shape, size)), size) for _ in range(n)]


def run(ctx) -> dict:
    a = ctx.args
    data = make_case(ctx, ctx.pick(a.slices, 24))
    rows = []
    for name, write, open_fn in formats():
        folder = ctx.path(name.replace(" ", "_"), fresh=True)
        t = time.perf_counter()
        f = write(folder, data)
        drop_cache(f)  # fsync: the time to reach the disk, not the page cache
        write_s = time.perf_counter() - t
        rng = np.random.default_rng(a.seed)
        p3, p2 = (random_patches(data.shape, size, ctx.pick(a.patches, 2), rng) for size in ((128, 128, 128), (1, 512, 512)))
        row = {"format": name, "write (s)": write_s, "disk (MiB)": f.stat().st_size / 2**20, "128^3 cold (ms)": read_ms(open_fn, f, p3, True),
               "128^3 warm (ms)": read_ms(open_fn, f, p3, False), "slice cold (ms)": read_ms(open_fn, f, p2, True)}
        drop_cache(f)
        t = time.perf_counter()
        full = np.array(open_fn(f)[...], dtype=np.float32)
        rows.append({**row, "full read (s)": time.perf_counter() - t, "max abs error": float(np.abs(full - data).max())})
        shutil.rmtree(folder)
    return {"rows": rows, "case_shape": list(data.shape), "case_mib_float32": data.nbytes / 2**20}
