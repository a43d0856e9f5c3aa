"""The CPU runtimes an exported network runs on: ONNX Runtime and OpenVINO.

A runtime has a ``name``, ``version()`` (ImportError when it is not installed), ``export(network,
example, folder, opset[, dynamic=True])`` (writes its files into ``folder``, returns facts for
engine.json; ``dynamic``: the spatial axes of any size, not only the example's)
and ``load(folder, threads, precision)`` -> a function from a float32 array (N, C, *patch) to
the logits array (N, n_classes, *patch), a fresh array per call.

Both start from one ONNX export (``export_onnx``: torch's TorchScript-based exporter, which
gives ONNX Runtime a faster graph than the dynamo exporter for these networks; the dynamo
exporter is the fallback). Batch and channels are static; the spatial axes are the example's
or, exported ``dynamic``, any size (3d inference tiles follow the volume: ``throughput_tiling``). OpenVINO converts the ONNX file to its IR (``model.xml`` + ``model.bin``, weights
kept float32) and compiles it for the CPU with an explicit precision hint (it would otherwise
pick bfloat16 by itself on CPUs with AMX).
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

log = logging.getLogger(__name__)

ArrayFn = Callable[[np.ndarray], np.ndarray]
ONNX_FILE = "model.onnx"
IR_FILES = ("model.xml", "model.bin")


class Runtime(Protocol):
    name: str

    def version(self) -> str: ...

    def export(self, network: torch.nn.Module, example: torch.Tensor, folder: Path, opset: int, dynamic: bool = False) -> dict: ...

    def load(self, folder: Path, threads: int, precision: str) -> ArrayFn: ...


class _FirstOutput(torch.nn.Module):
    """The network with one output: the full-resolution logits (deep supervision's first)."""

    def __init__(self, network: torch.nn.Module) -> None:
        super().__init__()
        self.network = network

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.network(x)
        return out[0] if isinstance(out, (list, tuple)) else out


@contextlib.contextmanager
def _eval_mode(network: torch.nn.Module):
    was_training = network.training
    network.eval()
    try:
        yield
    finally:
        network.train(was_training)


def export_onnx(network: torch.nn.Module, example: torch.Tensor, path: Path, opset: int, dynamic: bool = False) -> str:
    """Export ``network`` (evaluated on ``example``'s shape; ``dynamic``: its spatial axes of
    any size) to ``path``; returns the exporter used ("torchscript", else "dynamo")."""
    wrapped = _FirstOutput(network)
    axes = {i: f"s{i}" for i in range(2, example.ndim)} if dynamic else None
    dynamic_axes = {"x": axes, "logits": axes} if axes else None
    errors = []
    for exporter in ("torchscript", "dynamo"):
        try:
            with _eval_mode(network), torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.onnx.export(wrapped, (example.detach().clone(),), str(path), dynamo=exporter == "dynamo", opset_version=opset,
                                  input_names=["x"], output_names=["logits"], do_constant_folding=True, external_data=False,
                                  dynamic_axes=dynamic_axes)
            return exporter
        except Exception as exc:  # noqa: BLE001 - any exporter failure: try the other one, then fall back to torch
            errors.append(f"{exporter}: {type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}")
            for leftover in path.parent.glob(path.name + "*"):
                leftover.unlink()
    raise RuntimeError("ONNX export failed (" + "; ".join(errors) + ")")


class OnnxRuntime:
    """ONNX Runtime, CPUExecutionProvider, ``threads`` intra-op threads, one inter-op thread,
    no spinning between calls (the sliding window stitches on the same cores)."""

    name = "onnxruntime"

    def version(self) -> str:
        import onnxruntime

        return str(onnxruntime.__version__)

    def export(self, network: torch.nn.Module, example: torch.Tensor, folder: Path, opset: int, dynamic: bool = False) -> dict:
        return {"exporter": export_onnx(network, example, folder / ONNX_FILE, opset, dynamic), "files": [ONNX_FILE]}

    def load(self, folder: Path, threads: int, precision: str) -> ArrayFn:
        import onnxruntime as ort

        if precision != "fp32":
            log.info("onnxruntime runs float32 here (asked for %s)", precision)
        so = ort.SessionOptions()
        so.intra_op_num_threads = int(threads)
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.log_severity_level = 3
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        session = ort.InferenceSession(str(folder / ONNX_FILE), so, providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name

        def run(x: np.ndarray) -> np.ndarray:
            return session.run(None, {name: x})[0]

        return run


OV_PRECISION = {"fp32": "f32", "bf16": "bf16", "fp16": "f16"}


class OpenVino:
    """OpenVINO on the CPU device: ``threads`` inference threads, a performance ``hint``
    (LATENCY: one stream, every thread on the one request the sliding window sends at a time)."""

    name = "openvino"

    def __init__(self, hint: str = "LATENCY") -> None:
        self.hint = hint

    def version(self) -> str:
        import openvino

        return str(openvino.__version__).split("-")[0]

    def export(self, network: torch.nn.Module, example: torch.Tensor, folder: Path, opset: int, dynamic: bool = False) -> dict:
        import openvino as ov

        onnx_path = folder / ONNX_FILE
        exporter = export_onnx(network, example, onnx_path, opset, dynamic)
        ov.save_model(ov.convert_model(str(onnx_path)), str(folder / IR_FILES[0]), compress_to_fp16=False)
        onnx_path.unlink()
        return {"exporter": exporter, "files": list(IR_FILES)}

    def load(self, folder: Path, threads: int, precision: str) -> ArrayFn:
        import openvino as ov

        config = {"PERFORMANCE_HINT": self.hint, "INFERENCE_NUM_THREADS": int(threads),
                  "INFERENCE_PRECISION_HINT": OV_PRECISION.get(precision, "f32")}
        compiled = ov.Core().compile_model(str(folder / IR_FILES[0]), "CPU", config)
        request = compiled.create_infer_request()

        def run(x: np.ndarray) -> np.ndarray:
            return np.array(request.infer({0: x})[0], dtype=np.float32, copy=True)

        return run


def default_runtimes() -> dict[str, Runtime]:
    """The runtimes by engine name (constructing one imports nothing)."""
    return {"onnxruntime": OnnxRuntime(), "openvino": OpenVino()}
