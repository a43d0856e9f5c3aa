"""Inference engines: a network as a tile predictor run by torch, ONNX Runtime or OpenVINO.

``EngineFactory(engine, device, ...).build(network, input_shape, checkpoint)`` returns an
``Engine``: a callable from a float32 tensor (N, C, *patch) to float32 logits (N, n_classes,
*patch), what the sliding window calls. ``engine``:

* ``torch``: the network itself (``autoliver.infer.volume.make_predictor``, autocast as asked);
* ``onnxruntime`` / ``openvino``: the network exported once to ONNX (OpenVINO: to its IR),
  cached next to the weights (``<fold_dir>/.engine_cache/<key>/``, see
  ``autoliver.infer.engine_cache``; a private temporary folder when there is no checkpoint or
  the fold folder is read-only), run on the CPU with torch's thread count. The batch is static
  (calls with another batch size are split into, or zero-padded up to, the exported batch); the
  spatial axes too, unless exported ``dynamic`` (3d networks: their inference tiles follow the volume);
* ``auto``: torch on a GPU; on a CPU the first installed of ``AUTO_ORDER`` (OpenVINO, then
  ONNX Runtime), else torch. Measured at 2 threads on an AVX-512 CPU (benchmarks/cpu_engines.py):
  per 3D patch OpenVINO 1.4-1.5x torch float32 on a quiet machine (2.3-3.9x under the load of
  other jobs), with the bfloat16 hint 3.1-3.5x (torch bf16 autocast: 2.3-2.5x); ONNX Runtime
  behind OpenVINO on every 3D network, the two within 10 % on 2D ones.

A fresh export is checked against torch on a seeded random input before it is used or
published (largest logit difference within ``tolerance`` x the logit range). A runtime that
is not installed, an export or a check that fails, an entry that does not load: the engine
falls back to torch with one warning per reason and factory, never to a wrong result.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from autoliver.core.errors import UsageError
from autoliver.infer.engine_backends import ArrayFn, Runtime, default_runtimes
from autoliver.infer.engine_cache import cache_dir_for, cached_build, discard, engine_key, key_fields, prune_stale, read_meta
from autoliver.infer.volume import make_predictor

log = logging.getLogger(__name__)

ENGINES = ("auto", "torch", "onnxruntime", "openvino")
AUTO_ORDER = ("openvino", "onnxruntime")  # fastest first, as measured on CPUs (benchmarks/cpu_engines.py)
DEFAULT_OPSET = 17
TOLERANCE = 1e-3  # largest |engine - torch| logit difference allowed, as a fraction of torch's logit range (at least 1)
CHECK_SEED = 20240917
INSTALL_HINT = "install it with `pip install 'autoliver[fast-cpu]'`, or choose --engine torch"


@dataclass(frozen=True)
class Engine:
    """A tile predictor. ``name``: what runs (``torch`` after a fallback); ``requested``: what
    was asked for; ``entry``: the cache entry loaded; ``fallback``: why torch runs instead."""

    name: str
    requested: str
    input_shape: tuple[int, ...]
    run: Callable[[torch.Tensor], torch.Tensor]
    entry: Path | None = None
    fallback: str | None = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.run(x)


def runtime_installed(name: str) -> bool:
    """Whether the runtime behind engine ``name`` can be imported (without importing it)."""
    module = {"onnxruntime": "onnxruntime", "openvino": "openvino"}.get(name)
    return module is None or importlib.util.find_spec(module) is not None


def select_engine(name: str, device: torch.device | str = "cpu", installed: Callable[[str], bool] = runtime_installed) -> str:
    """The concrete engine for ``name`` on ``device``: ``auto`` resolved (module doc); a GPU is
    always ``torch``. UsageError for an unknown name."""
    if name not in ENGINES:
        raise UsageError(f"engine must be one of {', '.join(ENGINES)}, got {name!r}")
    if torch.device(device).type != "cpu":
        if name not in ("auto", "torch"):
            log.info("engine %s runs on the CPU only; using torch on %s", name, device)
        return "torch"
    if name != "auto":
        return name
    return next((e for e in AUTO_ORDER if installed(e)), "torch")


def engine_input_shape(config, n_classes: int = 3, batch: int | None = None) -> tuple[int, ...]:
    """(N, C, *patch) the sliding window sends for a plan configuration: N = ``batch``, else 1
    tile per call in 3D and 8 slices per call in 2D / 2.5D (``predict_slicewise``'s default);
    C = the image channels plus a cascade's one-hot channels (as ``net_spec``)."""
    channels = int(config.in_slices) + (n_classes - 1 if config.previous_stage else 0)
    n = batch if batch is not None else (1 if config.network_dims == 3 else 8)
    return (int(n), channels, *(int(p) for p in config.patch_size))


def static_batches(fn: ArrayFn, input_shape: Sequence[int], dynamic: bool = False) -> Callable[[torch.Tensor], torch.Tensor]:
    """``fn`` (a static-batch array function) as a tile predictor for any batch size: the batch
    is cut into runs of the exported size, the last one zero-padded; the padding's outputs are
    dropped. ``dynamic``: any spatial size (else the exported one)."""
    shape = tuple(int(v) for v in input_shape)
    size = shape[0]

    def run(x: torch.Tensor) -> torch.Tensor:
        fixed = shape[1:2] if dynamic else shape[1:]
        if tuple(x.shape[1 : 1 + len(fixed)]) != fixed or x.ndim != len(shape):
            raise ValueError(f"engine exported for inputs (N, {', '.join(map(str, fixed))}{', ...' if dynamic else ''}), got {tuple(x.shape)}")
        device = x.device
        a = x.detach().to("cpu", torch.float32).contiguous().numpy()
        outs = []
        for i in range(0, a.shape[0], size):
            part = a[i : i + size]
            n = part.shape[0]
            if n < size:
                part = np.concatenate([part, np.zeros((size - n, *part.shape[1:]), np.float32)])
            out = fn(np.ascontiguousarray(part))
            if out.shape[0] != size or tuple(out.shape[2:]) != tuple(part.shape[2:]):
                raise RuntimeError(f"engine returned shape {tuple(out.shape)} for input {part.shape}")
            outs.append(out[:n])
        result = torch.from_numpy(outs[0] if len(outs) == 1 else np.concatenate(outs))
        return result if device.type == "cpu" else result.to(device)

    return run


def check_export(network: torch.nn.Module, fn: ArrayFn, input_shape: Sequence[int], tolerance: float = TOLERANCE) -> dict:
    """Compare ``fn`` with ``network`` (float32, torch) on a seeded random input; ValueError when
    the largest logit difference exceeds ``tolerance`` x max(1, torch's logit range)."""
    x = torch.randn(tuple(input_shape), generator=torch.Generator().manual_seed(CHECK_SEED))
    with torch.inference_mode():
        ref = make_predictor(network, torch.device("cpu"), None)(x).numpy()
    out = fn(x.numpy())
    if out.shape != ref.shape:
        raise ValueError(f"exported network returns shape {out.shape}, torch {ref.shape}")
    diff = float(np.max(np.abs(out - ref)))
    scale = max(1.0, float(ref.max() - ref.min()))
    agree = float(np.mean(out.argmax(1) == ref.argmax(1)))
    if not diff <= tolerance * scale:
        raise ValueError(f"exported network differs from torch by up to {diff:.3g} (logit range {scale:.3g})")
    return {"check_max_abs_diff": diff, "check_logit_range": scale, "check_argmax_agreement": agree}


class EngineFactory:
    """Builds the engines of one prediction run (one per fold network) and remembers which
    fallbacks it has warned about. ``threads``: the runtimes' threads (torch's count by
    default); ``precision``: fp32 / bf16 / fp16 (torch: autocast; OpenVINO: its precision hint;
    ONNX Runtime: float32 always); ``runtimes``: engine name -> runtime (tests inject fakes)."""

    def __init__(self, engine: str = "auto", device: torch.device | str = "cpu", *, threads: int | None = None,
                 precision: str = "fp32", opset: int = DEFAULT_OPSET, runtimes: Mapping[str, Runtime] | None = None,
                 tolerance: float = TOLERANCE) -> None:
        self.device = torch.device(device)
        self.runtimes = dict(default_runtimes() if runtimes is None else runtimes)
        self.name = select_engine(engine, self.device, lambda e: e in self.runtimes and (runtimes is not None or runtime_installed(e)))
        self.requested = engine
        self.threads = int(threads or torch.get_num_threads())
        self.precision = precision
        self.opset = int(opset)
        self.tolerance = tolerance
        self._warned: set[str] = set()
        self._scratch: tempfile.TemporaryDirectory | None = None

    def torch_engine(self, network: torch.nn.Module, input_shape: Sequence[int], fallback: str | None = None) -> Engine:
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision)
        run = make_predictor(network, self.device, dtype)
        return Engine("torch", self.requested, tuple(input_shape), run, fallback=fallback)

    def build(self, network: torch.nn.Module, input_shape: Sequence[int], checkpoint: str | os.PathLike | None = None,
              cache_dir: str | os.PathLike | None = None, dynamic: bool = False) -> Engine:
        """The engine for ``network`` fed (N, C, *patch) = ``input_shape`` (``dynamic``: any spatial
        size; the export is checked at ``input_shape``); its export is cached in ``cache_dir``
        (default: next to ``checkpoint``; none: a folder kept for this factory's life)."""
        shape = tuple(int(v) for v in input_shape)
        if len(shape) not in (4, 5) or min(shape) < 1:
            raise UsageError(f"input_shape must be (N, C, *patch) with a 2D or 3D patch, got {shape}")
        if self.name == "torch":
            return self.torch_engine(network, shape)
        runtime = self.runtimes[self.name]
        try:
            version = runtime.version()
        except ImportError as exc:
            return self._fall_back(network, shape, f"{self.name} is not installed ({exc}); {INSTALL_HINT}", key=f"missing:{self.name}")
        fields = key_fields(network, shape, self.opset, self.name, version, checkpoint)
        if dynamic:
            fields["dynamic_spatial"] = True
        try:
            entry, fn = self._load_or_export(network, runtime, shape, fields, cache_dir, checkpoint, dynamic)
        except Exception as exc:  # noqa: BLE001 - any failure of an optional runtime: torch instead
            reason = f"{self.name} engine failed ({type(exc).__name__}: {exc}); predicting with torch"
            return self._fall_back(network, shape, reason, key=f"failed:{self.name}:{type(exc).__name__}")
        return Engine(self.name, self.requested, shape, static_batches(fn, shape, dynamic), entry=entry)

    def _fall_back(self, network: torch.nn.Module, shape: tuple[int, ...], reason: str, key: str) -> Engine:
        if key not in self._warned:
            self._warned.add(key)
            log.warning("%s", reason)
        return self.torch_engine(network, shape, fallback=reason)

    def _cache_dir(self, cache_dir, checkpoint) -> Path:
        if cache_dir is not None:
            return Path(cache_dir)
        if checkpoint is not None:
            return cache_dir_for(checkpoint)
        return self._scratch_dir()

    def _scratch_dir(self) -> Path:
        if self._scratch is None:
            self._scratch = tempfile.TemporaryDirectory(prefix="autoliver-engines-")
        return Path(self._scratch.name)

    def _load_or_export(self, network, runtime: Runtime, shape, fields: dict, cache_dir, checkpoint,
                        dynamic: bool = False) -> tuple[Path, ArrayFn]:
        key = engine_key(fields)
        folder = self._cache_dir(cache_dir, checkpoint)

        def export(tmp: Path) -> dict:
            example = torch.randn(shape, generator=torch.Generator().manual_seed(CHECK_SEED))
            facts = runtime.export(network, example, tmp, self.opset, **({"dynamic": True} if dynamic else {}))
            return {**facts, **check_export(network, runtime.load(tmp, self.threads, "fp32"), shape, self.tolerance)}

        try:
            entry = cached_build(folder, key, fields, export)
        except OSError as exc:  # a read-only or full model folder: export into this factory's scratch folder
            if folder == self._scratch_dir():
                raise
            log.info("%s: cannot write the engine cache (%s); exporting to a temporary folder", folder, exc)
            entry = cached_build(self._scratch_dir(), key, fields, export)
        prune_stale(entry.parent, fields)
        try:
            return entry, runtime.load(entry, self.threads, self.precision)
        except Exception as exc:  # noqa: BLE001 - a damaged entry: export again once
            log.warning("%s: cached %s export does not load (%s: %s); exporting it again", entry, self.name, type(exc).__name__, exc)
            discard(entry)
            entry = cached_build(entry.parent, key, fields, export)
            return entry, runtime.load(entry, self.threads, self.precision)


def build_engine(network: torch.nn.Module, input_shape: Sequence[int], engine: str = "auto", device: torch.device | str = "cpu",
                 checkpoint: str | os.PathLike | None = None, **options) -> Engine:
    """One engine (a factory of its own; see ``EngineFactory`` for ``options``)."""
    return EngineFactory(engine, device, **options).build(network, input_shape, checkpoint)


def cached_engine_info(entry: str | os.PathLike) -> dict | None:
    """The ``engine.json`` of a cache entry (None when it is not a complete entry)."""
    return read_meta(Path(entry))
