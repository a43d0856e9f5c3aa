"""The engines inside prediction: ``predict --engine`` runs each fold through its exported
runtime (cached beside the checkpoint) with the labels torch gives; ``auto`` without a runtime
installed is plain torch."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import DATASET

from autoliver.infer import engines
from autoliver.infer.ensemble import load_ensemble
from autoliver.infer.pipeline import predict_case
from autoliver.io.images import read_image

pytestmark = pytest.mark.usefixtures("single_thread")


def _labels(model_ws, engine: str, config: str) -> tuple[np.ndarray, object]:
    image, geometry = read_image(next((model_ws.raw / DATASET / "imagesTr").iterdir()))
    ensemble = load_ensemble(model_ws.results(DATASET), config, ["0"], "cpu", "fp32", engine=engine)
    return predict_case(ensemble, image, geometry, tta=True, roi=False).seg, ensemble


def test_auto_without_runtimes_is_torch(model_ws, monkeypatch):
    monkeypatch.setattr(engines, "runtime_installed", lambda name: name not in ("onnxruntime", "openvino"))
    _, ensemble = _labels(model_ws, "auto", "2d")
    assert all(f.engine is None for m in ensemble.models for f in m.folds)
    assert not list(model_ws.results(DATASET).rglob(".engine_cache"))


@pytest.mark.parametrize("engine", ["onnxruntime", "openvino"])
@pytest.mark.parametrize("config", ["2d", "3d_fullres"])
def test_exported_engine_gives_torch_labels(model_ws, engine, config):
    pytest.importorskip(engine)
    pytest.importorskip("onnx")
    reference, _ = _labels(model_ws, "torch", config)
    labels, ensemble = _labels(model_ws, engine, config)
    assert all(f.engine is not None and f.engine.name == engine for f in ensemble.models[0].folds)
    assert (labels == reference).mean() >= 0.999
    assert list((model_ws.results(DATASET) / config / "fold_0").glob(".engine_cache/*"))
