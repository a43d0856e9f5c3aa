"""A fixed-width text table of a plan, for ``autoliver plan``."""

from __future__ import annotations

from planning.plans import Plans

COLUMNS = ("configuration", "network", "data", "spacing (z,y,x) mm", "median shape", "patch", "batch", "stages", "features", "est. memory GiB")


def _row(name: str, c) -> tuple[str, ...]:
    derived = c.inherits_from is not None  # a recipe's network: the planned topology columns do not apply
    features = "-" if derived and c.network != "unet" else f"{c.features_per_stage[0]}..{max(c.features_per_stage)}"
    patch = "x".join(str(p) for p in c.patch_size)
    if c.in_slices > 1:
        patch += f" ({c.in_slices} slices)"
    return (
        name + (f" <- {c.previous_stage}" if c.previous_stage else "") + (f" <- {c.liver_stage}" if c.liver_stage else ""),
        c.network + (f" ({c.stage} stage)" if c.stage != "single" else ""),
        c.data_identifier,
        " x ".join(f"{s:.3f}".rstrip("0").rstrip(".") if s != int(s) else f"{s:.1f}" for s in c.spacing),
        "x".join(str(m) for m in c.median_shape),
        patch,
        str(c.batch_size),
        "-" if derived and c.network != "unet" else str(c.n_stages),
        features,
        f"{c.estimated_memory_gb:.2f}",
    )


def plans_table(plans: Plans) -> str:
    """One line per configuration, columns aligned, preceded by the dataset and budget."""
    rows = [COLUMNS] + [_row(n, c) for n, c in plans.configurations.items()]
    widths = [max(len(r[i]) for r in rows) for i in range(len(COLUMNS))]
    lines = [
        f"{plans.dataset_name}: {plans.device} budget {plans.memory_budget_gb:.1f} GiB; "
        f"CT normalisation clip [{plans.normalisation.clip_low:.1f}, {plans.normalisation.clip_high:.1f}] HU, "
        f"mean {plans.normalisation.mean:.1f}, std {plans.normalisation.std:.1f}",
    ]
    for i, r in enumerate(rows):
        lines.append("  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip())
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)
