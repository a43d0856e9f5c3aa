"""A preprocessed case's properties (``<case>.json`` next to its arrays), typed.

They say how the case was made (data identifier, target spacing, seed) and what maps a
prediction back to the original image exactly (its geometry, the crop box, the shape after
cropping and after resampling); for a labelled case also where the liver and each tumour
component lie (the sampler's foreground locations). Dicts exist only at the JSON boundary.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from autoliver.core.errors import StaleArtefactError
from autoliver.io.images import Geometry

REQUIRED = ("geometry", "crop_box", "shape_after_crop", "spacing", "shape_after_resampling")
KNOWN = REQUIRED + ("spacing_after_crop", "data_identifier", "data_dtype", "seed", "n_locations", "class_locations",
                    "tumour_components", "plans_hash", "source_image")


def _ints(values, n: int = 3) -> tuple[int, ...]:
    out = tuple(int(v) for v in values)
    if len(out) != n:
        raise ValueError(f"expected {n} integers, got {list(values)}")
    return out


@dataclass(frozen=True)
class CaseProperties:
    geometry: Geometry  # the original image's geometry (size, spacing, origin, direction)
    crop_box: tuple[tuple[int, int], ...]  # half-open (z, y, x) box of the original grid kept by cropping
    shape_after_crop: tuple[int, int, int]
    spacing: tuple[float, float, float]  # the preprocessed grid's spacing (mm)
    shape_after_resampling: tuple[int, int, int]  # the preprocessed grid's shape
    data_identifier: str = ""
    seed: int = 0
    class_locations: Mapping[str, Any] = field(default_factory=dict)  # "1" (liver), "2" (tumour) -> [[z, y, x], ...]
    tumour_components: Mapping[str, Any] = field(default_factory=dict)  # "locations": one list per component
    plans_hash: str | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)  # every other recorded field, kept as written

    @classmethod
    def from_json(cls, d: object, source: str = "case properties") -> CaseProperties:
        fix = "run `autoliver plan_and_preprocess DATASET --overwrite` to rebuild the preprocessed data"
        if isinstance(d, CaseProperties):
            return d
        if not isinstance(d, Mapping):
            raise StaleArtefactError(f"{source}: not a JSON object; {fix}")
        missing = [k for k in REQUIRED if k not in d]
        if missing:
            raise StaleArtefactError(f"{source}: missing {', '.join(missing)}; {fix}")
        try:
            return cls(
                geometry=Geometry.from_json(d["geometry"]),
                crop_box=tuple((int(lo), int(hi)) for lo, hi in d["crop_box"]),
                shape_after_crop=_ints(d["shape_after_crop"]),  # type: ignore[arg-type]
                spacing=tuple(float(s) for s in d["spacing"]),  # type: ignore[arg-type]
                shape_after_resampling=_ints(d["shape_after_resampling"]),  # type: ignore[arg-type]
                data_identifier=str(d.get("data_identifier", "")),
                seed=int(d.get("seed", 0)),
                class_locations=dict(d.get("class_locations") or {}),
                tumour_components=dict(d.get("tumour_components") or {}),
                plans_hash=d.get("plans_hash"),
                extra={k: v for k, v in d.items() if k not in KNOWN},
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise StaleArtefactError(f"{source}: malformed ({type(exc).__name__}: {exc}); {fix}") from None
