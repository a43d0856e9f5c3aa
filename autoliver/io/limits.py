"""How many voxels one image may declare: checked on the header, before anything is allocated.

Every reader (NIfTI, MetaImage, NRRD, DICOM: slices x rows x columns) asks ``voxel_budget_problem``
with the sizes its header declares. A file is refused when it declares more than ``MAX_VOXELS``
(far beyond any CT: LiTS' largest is 512 x 512 x 987 = 2.6e8) or when its voxels, read and then
converted to float32, would not fit in this machine's memory. The message gives the size, so a
damaged header ("2^40 voxels, 4 TiB as float32") is told from a real but too large scan.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

MAX_VOXELS = 2**31  # about 8 GiB of float32


def machine_memory_bytes() -> int | None:
    """Physical memory of this machine in bytes, or None where the OS does not say."""
    try:
        return int(os.sysconf("SC_PHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (AttributeError, OSError, ValueError):
        return None


def human_bytes(n: float) -> str:
    """``n`` bytes as '4 TiB', '24 GiB', '512 MiB'."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"):
        if abs(n) < 1024 or unit == "EiB":
            return f"{n:.0f} {unit}" if unit == "B" or n >= 10 else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.0f} EiB"  # pragma: no cover


def _power_of_two(n: int) -> str:
    exponent = math.log2(n) if n > 0 else 0.0
    if abs(exponent - round(exponent)) < 1e-9:
        return f"2^{exponent:.0f}"
    return f"about 2^{exponent:.0f}" if abs(exponent - round(exponent)) < 0.05 else f"about 2^{exponent:.1f}"


def voxel_budget_problem(sizes: Sequence[int], itemsize: int = 4, memory_bytes: int | None = -1, max_voxels: int = MAX_VOXELS) -> str | None:
    """Why an image of ``sizes`` voxels (stored with ``itemsize`` bytes each) cannot be read here,
    or None. ``memory_bytes``: the machine's memory (-1: ask the OS; None: unknown, not checked).

    Reading needs the stored voxels plus their float32 copy."""
    n = math.prod(int(s) for s in sizes)
    if memory_bytes == -1:
        memory_bytes = machine_memory_bytes()
    need = n * (max(int(itemsize), 1) + 4)
    too_many = n > max_voxels
    too_big = memory_bytes is not None and need > memory_bytes
    if not (too_many or too_big):
        return None
    shape = " x ".join(str(int(s)) for s in sizes)
    limits = " and ".join(([f"the {_power_of_two(max_voxels)} autoliver reads"] if too_many else []) + (["this machine can hold"] if too_big else []))
    memory = "" if memory_bytes is None else f" and this machine has {human_bytes(memory_bytes)}"
    return (f"declares {shape} = {n} voxels ({n * itemsize / 2**30:.1f} GiB): {_power_of_two(n)} voxels, more than {limits}; reading it "
            f"needs {human_bytes(need)} ({human_bytes(n * 4)} as float32){memory}. The header is damaged or this is not a CT volume: "
            "re-export the image")
