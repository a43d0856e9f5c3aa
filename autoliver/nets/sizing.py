"""Sizing a derived configuration's network for the plan's memory budget.

The planner sizes its own U-Net analytically (``planning.memory``); a configuration that a
recipe derives uses another family, possibly with a fixed input size (e.g. 256 x 256 slices).
Here the family's registered estimate (parameters, activation bytes per sample) gives the
largest batch that fits the plan's budget with the same memory model the planner uses, the
patch is rounded up to the network's input divisor, and a note says so when even one sample
does not fit.
"""

from __future__ import annotations

import math
from dataclasses import replace

from autoliver.core.labels import N_CLASSES
from autoliver.nets.registry import estimate_network, input_divisor, net_spec
from planning.memory import GIB, model_for
from planning.plans import Configuration, Plans


def round_up(patch: tuple[int, ...], divisor: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(int(math.ceil(p / d) * d) for p, d in zip(patch, divisor))


def training_bytes(config: Configuration, batch_size: int, device: str) -> float:
    """Estimated peak training memory of ``config``'s network at ``batch_size``."""
    model = model_for(device)
    est = estimate_network(config.network, net_spec(config, N_CLASSES), config.patch_size)
    activations = batch_size * est.activation_bytes_per_sample * model.bytes_per_activation / 4  # estimates count fp32
    return model.fixed_bytes + (est.parameters * model.bytes_per_parameter + activations) * model.fragmentation


def size_configuration(config: Configuration, budget_gb: float, device: str) -> Configuration:
    """``config`` with its patch rounded up to the network's divisor and the largest batch (at
    most the planner's) that fits ``budget_gb``; ``extra["sizing"]`` says what was done."""
    spec = net_spec(config, N_CLASSES)
    divisor = input_divisor(config.network, spec)
    planned = patch = round_up(tuple(config.patch_size), divisor)
    config = replace(config, patch_size=patch)
    budget = float(budget_gb) * GIB
    one = training_bytes(config, 1, device)
    while one > budget and not config.extra.get("fixed_patch") and max(p // d for p, d in zip(patch, divisor)) > 2:
        axis = max(range(len(patch)), key=lambda a: patch[a] // divisor[a])  # shrink the axis with the most divisor steps
        patch = tuple(p - divisor[a] * max(1, p // divisor[a] // 8) if a == axis else p for a, p in enumerate(patch))
        config = replace(config, patch_size=patch)
        one = training_bytes(config, 1, device)
    two = training_bytes(config, 2, device)
    per_sample = max(1.0, two - one)
    fits = int((budget - one) // per_sample) + 1 if one <= budget else 0
    batch = max(1, min(int(config.batch_size), fits))
    need = training_bytes(config, batch, device)
    note = (f"{config.network} at patch {list(patch)}: batch {batch} estimated at {need / GIB:.2f} GiB "
            f"of the {budget_gb:.1f} GiB {device} budget")
    if patch != planned:
        note += f" (patch shrunk from {list(planned)} to fit)"
    if fits == 0:
        note = (f"does not fit: {config.network} at patch {list(patch)} needs about {one / GIB:.2f} GiB for one sample, more than the "
                f"{budget_gb:.1f} GiB {device} budget; train it with a smaller patch (--patch) or on a larger device")
    return replace(config, batch_size=batch, estimated_memory_gb=round(need / GIB, 3),
                   extra={**config.extra, "sizing": note, "fits_budget": fits > 0})


def size_plans(plans: Plans, names: tuple[str, ...] | list[str]) -> Plans:
    """``plans`` with configurations ``names`` sized for the plans' budget."""
    configs = dict(plans.configurations)
    for n in names:
        configs[n] = size_configuration(configs[n], plans.memory_budget_gb, plans.device)
    return replace(plans, configurations=configs)
