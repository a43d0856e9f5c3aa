"""Pretrained encoder weights from a local file: ``load_encoder_weights(model, path)``.

The file is a ``.safetensors`` file (read with the ``safetensors`` package) or a torch file
read with ``torch.load(..., weights_only=True)``, so no arbitrary object is ever
unpickled. It holds a state dict (optionally wrapped under ``state_dict``, ``model`` or
``weights``, e.g. an autoliver checkpoint) whose keys name the encoder's tensors:

* exactly (``conv1.weight``, ``layer1.0.conv1.weight``, ``features.0.weight``: the ResNet
  and VGG encoders use torchvision's names, so torchvision's ``resnet50``/``resnet101``/
  ``vgg16_bn`` files load as they are; their classifier, ``fc.*`` / ``classifier.*``, is
  dropped);
* or under one common prefix (``encoder.``, ``module.encoder.``, ``backbone.``...), found
  as the prefix that matches most keys; keys outside it are ignored (the rest of a whole
  model's state dict).

The encoder is ``model.encoder`` when the model has one, else the model itself. Every
encoder tensor must be in the file (batch norm's ``num_batches_tracked`` excepted) with the
same shape, and every file key under the prefix must be an encoder tensor; otherwise a
ValueError names the file and the offending keys. One mismatch is adapted: a first conv
with 3 input channels loaded into an encoder for ``c`` channels gets the RGB kernels
averaged and repeated (scaled by 3/c), so ImageNet weights start a CT network.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

logger = logging.getLogger(__name__)

WRAPPER_KEYS = ("state_dict", "model", "weights", "model_state_dict")
HEAD_PREFIXES = ("fc.", "classifier.")
OPTIONAL_SUFFIX = "num_batches_tracked"
_SHOW = 8


@dataclass(frozen=True)
class EncoderWeights:
    """What ``load_encoder_weights`` did: the keys loaded, the prefix stripped, the file keys
    left out (classifier, outside the prefix) and the first conv adapted (if any)."""

    path: Path
    loaded: tuple[str, ...]
    prefix: str
    ignored: tuple[str, ...]
    adapted: str | None


def _listing(keys: list[str]) -> str:
    keys = sorted(keys)
    more = f" and {len(keys) - _SHOW} more" if len(keys) > _SHOW else ""
    return ", ".join(keys[:_SHOW]) + more


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a weight file, safely (see the module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: weight file not found")
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise ImportError(f"{path}: reading .safetensors files needs the safetensors package: pip install safetensors") from None
        try:
            state: Any = load_file(str(path), device="cpu")
        except Exception as exc:  # safetensors raises its own SafetensorError
            raise ValueError(f"{path}: not a readable safetensors file ({exc})") from None
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # UnpicklingError (refused object), RuntimeError, EOFError, zip errors
            reason = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
            raise ValueError(f"{path}: not a plain tensor state dict, refused by torch.load(weights_only=True) ({reason})") from None
    while isinstance(state, dict) and not any(isinstance(v, torch.Tensor) for v in state.values()):
        inner = next((state[k] for k in WRAPPER_KEYS if isinstance(state.get(k), dict)), None)
        if inner is None:
            break
        state = inner
    if not isinstance(state, dict) or not state or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise ValueError(f"{path}: expected a state dict of named tensors (optionally under {', '.join(WRAPPER_KEYS)}), got {type(state).__name__}")
    return state


def _best_prefix(file_keys: list[str], target: set[str]) -> str:
    """The prefix that, stripped, turns the most file keys into encoder keys."""
    counts: Counter[str] = Counter()
    for key in file_keys:
        for t in target:
            if key.endswith(t) and (len(key) == len(t) or key[-len(t) - 1] == "."):
                counts[key[: len(key) - len(t)]] += 1
    return max(counts, key=lambda p: (counts[p], -len(p))) if counts else ""


def load_encoder_weights(model: nn.Module, path: str | Path, adapt_first_conv: bool = True) -> EncoderWeights:
    """Load the encoder of ``model`` from the weight file ``path`` (see the module docstring)."""
    path = Path(path)
    encoder = model.encoder if isinstance(getattr(model, "encoder", None), nn.Module) else model
    own = encoder.state_dict()
    state = read_state_dict(path)
    prefix = _best_prefix(list(state), set(own))
    selected = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    ignored = [k for k in state if not k.startswith(prefix)]
    heads = [k for k in selected if k not in own and k.startswith(HEAD_PREFIXES)]
    ignored += [prefix + k for k in heads]
    for k in heads:
        del selected[k]
    unexpected = [k for k in selected if k not in own]
    missing = [k for k in own if k not in selected and not k.endswith(OPTIONAL_SUFFIX)]
    problems = []
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s): {_listing(unexpected)}")
    if missing:
        problems.append(f"{len(missing)} missing key(s): {_listing(missing)}")
    first = next((k for k, v in own.items() if v.dim() >= 3), None)
    adapted = None
    mismatched = []
    for k, v in selected.items():
        if k not in own or v.shape == own[k].shape:
            continue
        target = own[k].shape
        if adapt_first_conv and k == first and v.shape[1] == 3 and v.shape[:1] + v.shape[2:] == target[:1] + target[2:]:
            selected[k] = v.float().mean(1, keepdim=True).repeat(1, target[1], *(1,) * (v.dim() - 2)) * (3.0 / target[1])
            adapted = k
        else:
            mismatched.append(f"{k} {tuple(v.shape)} vs {tuple(target)}")
    if mismatched:
        problems.append(f"{len(mismatched)} shape mismatch(es) (file vs model): {_listing(mismatched)}")
    if problems:
        where = f" (prefix {prefix!r} stripped)" if prefix else ""
        raise ValueError(f"{path}: does not fit the encoder of {type(model).__name__}{where}: " + "; ".join(problems))
    for k, v in own.items():
        selected.setdefault(k, v)  # num_batches_tracked absent from older files
    encoder.load_state_dict(selected, strict=True)
    if adapted:
        logger.info("%s: first conv %s adapted from 3 input channels to %d", path, adapted, own[adapted].shape[1])
    if ignored:
        logger.info("%s: %d key(s) not for the encoder left out: %s", path, len(ignored), _listing(ignored))
    logger.info("%s: loaded %d encoder tensors into %s", path, len(own), type(model).__name__)
    return EncoderWeights(path, tuple(sorted(selected)), prefix, tuple(sorted(ignored)), adapted)
