"""Inference engines (autoliver.infer.engines): selection, the export cache (key, invalidation,
atomic publication, concurrent exporters, damaged entries), the fallback to torch, and, where
the runtimes are installed, ONNX Runtime and OpenVINO against torch on a real network."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from autoliver.core.errors import UsageError
from autoliver.infer.engine_cache import CACHE_DIR_NAME, cached_build, engine_key, key_fields, read_meta
from autoliver.infer.engines import AUTO_ORDER, EngineFactory, engine_input_shape, select_engine, static_batches
from autoliver.infer.sliding_window import Window, sliding_window_predict
from autoliver.infer.volume import make_predictor
from autoliver.io import atomic
from autoliver.nets.registry import NetSpec, build_network

SHAPE = (1, 1, 8, 16, 16)


def tiny_net(seed: int = 0, dims: int = 3) -> torch.nn.Module:
    torch.manual_seed(seed)
    spec = NetSpec(dims=dims, in_channels=1, n_classes=3, features_per_stage=(4, 8), kernel_sizes=((3,) * dims,) * 2,
                   strides=((1,) * dims, (2,) * dims), deep_supervision=False)
    net = build_network("unet", spec)
    net.deep_supervision = False
    return net.eval()


def torch_logits(net, x):
    with torch.inference_mode():
        return make_predictor(net, torch.device("cpu"), None)(x)


class FakeRuntime:
    """A runtime whose 'export' saves the weights and whose 'load' runs them in torch (plus
    ``offset``, to play a wrong export); counts exports and loads."""

    name = "onnxruntime"

    def __init__(self, offset: float = 0.0, fail_export: bool = False, missing: bool = False, version: str = "1.0"):
        self.offset, self.fail_export, self.missing, self._version = offset, fail_export, missing, version
        self.exports = self.loads = 0
        self.batches: list[int] = []

    def version(self) -> str:
        if self.missing:
            raise ImportError("No module named 'onnxruntime'")
        return self._version

    def export(self, network, example, folder: Path, opset: int, dynamic: bool = False) -> dict:
        self.exports += 1
        self.dynamic = dynamic
        torch.save(network.state_dict(), folder / "weights.pt")
        if self.fail_export:
            raise RuntimeError("unsupported operator")
        self.template = network
        return {"files": ["weights.pt"]}

    def load(self, folder: Path, threads: int, precision: str):
        self.loads += 1
        import copy

        net = copy.deepcopy(self.template)
        net.load_state_dict(torch.load(folder / "weights.pt", weights_only=True))

        def run(a: np.ndarray) -> np.ndarray:
            self.batches.append(a.shape[0])
            return torch_logits(net, torch.from_numpy(a)).numpy() + self.offset

        return run


def factory(runtime, **kw) -> EngineFactory:
    return EngineFactory("onnxruntime", "cpu", threads=1, runtimes={"onnxruntime": runtime}, **kw)


def checkpoint(tmp_path: Path, net, name: str = "checkpoint_final.pt") -> Path:
    fold = tmp_path / "results" / "Dataset001_X" / "3d_fullres" / "fold_0"
    fold.mkdir(parents=True, exist_ok=True)
    torch.save({"weights": net.state_dict()}, fold / name)
    return fold / name


# --- selection ---------------------------------------------------------------------------------

def test_select_engine_resolves_auto_from_what_is_installed():
    assert select_engine("auto", "cpu", lambda e: True) == AUTO_ORDER[0]
    assert select_engine("auto", "cpu", lambda e: e == "onnxruntime") == "onnxruntime"
    assert select_engine("auto", "cpu", lambda e: False) == "torch"
    assert select_engine("openvino", "cuda", lambda e: True) == "torch"  # a GPU is always torch
    assert select_engine("auto", torch.device("cuda", 0), lambda e: True) == "torch"
    assert select_engine("onnxruntime", "cpu", lambda e: False) == "onnxruntime"  # named: tried, then falls back
    with pytest.raises(UsageError, match="onnxruntime"):
        select_engine("tensorrt", "cpu")


def test_engine_input_shape_follows_the_sliding_window():
    from types import SimpleNamespace as NS

    full = NS(in_slices=1, previous_stage=None, network_dims=3, patch_size=(32, 80, 96))
    assert engine_input_shape(full) == (1, 1, 32, 80, 96)
    assert engine_input_shape(NS(in_slices=1, previous_stage="3d_lowres", network_dims=3, patch_size=(8, 8, 8))) == (1, 3, 8, 8, 8)
    assert engine_input_shape(NS(in_slices=5, previous_stage=None, network_dims=2, patch_size=(224, 256))) == (8, 5, 224, 256)
    assert engine_input_shape(full, batch=2)[0] == 2


# --- the cache key -----------------------------------------------------------------------------

def test_key_is_stable_and_changes_with_every_input(tmp_path):
    net = tiny_net(0)
    base = key_fields(net, SHAPE, 17, "onnxruntime", "1.0")
    assert engine_key(base) == engine_key(key_fields(tiny_net(0), SHAPE, 17, "onnxruntime", "1.0"))  # same weights: same key
    changed = [key_fields(tiny_net(1), SHAPE, 17, "onnxruntime", "1.0"), key_fields(net, (2, *SHAPE[1:]), 17, "onnxruntime", "1.0"),
               key_fields(net, SHAPE, 18, "onnxruntime", "1.0"), key_fields(net, SHAPE, 17, "openvino", "1.0"),
               key_fields(net, SHAPE, 17, "onnxruntime", "1.1")]
    keys = {engine_key(f) for f in [base, *changed]}
    assert len(keys) == 6
    ds = tiny_net(0)
    ds.deep_supervision = True  # same weights, other outputs
    assert engine_key(key_fields(ds, SHAPE, 17, "onnxruntime", "1.0")) != engine_key(base)
    ckpt = checkpoint(tmp_path, net)
    with_file = key_fields(net, SHAPE, 17, "onnxruntime", "1.0", ckpt)
    ckpt.write_bytes(ckpt.read_bytes() + b"\0")  # the checkpoint file changed, weights in memory the same
    assert engine_key(key_fields(net, SHAPE, 17, "onnxruntime", "1.0", ckpt)) != engine_key(with_file)


# --- build, cache, invalidation ----------------------------------------------------------------

def test_export_is_cached_next_to_the_checkpoint_and_reused(tmp_path):
    net, rt = tiny_net(), FakeRuntime()
    ckpt = checkpoint(tmp_path, net)
    x = torch.randn(*SHAPE)
    first = factory(rt).build(net, SHAPE, ckpt)
    assert first.name == "onnxruntime" and first.fallback is None
    assert first.entry.parent == ckpt.parent / CACHE_DIR_NAME
    meta = read_meta(first.entry)
    assert meta["key"] == first.entry.name and meta["checkpoint"] == ckpt.name and meta["check_max_abs_diff"] == 0.0
    second = factory(rt).build(net, SHAPE, ckpt)  # another run: loaded, not exported again
    assert second.entry == first.entry and rt.exports == 1
    torch.testing.assert_close(second(x), torch_logits(net, x))
    leftovers = [p.name for p in first.entry.parent.iterdir() if p.name.startswith(".")]
    assert leftovers == []


def test_a_changed_checkpoint_is_exported_again_and_the_stale_export_removed(tmp_path):
    rt = FakeRuntime()
    old_net = tiny_net(0)
    ckpt = checkpoint(tmp_path, old_net)
    old = factory(rt).build(old_net, SHAPE, ckpt)
    other = factory(rt).build(old_net, SHAPE, checkpoint(tmp_path, old_net, "checkpoint_best.pt"))
    new_net = tiny_net(1)
    checkpoint(tmp_path, new_net)  # retrained: same file name, other bytes
    new = factory(rt).build(new_net, SHAPE, ckpt)
    assert rt.exports == 3 and new.entry != old.entry
    assert not old.entry.exists() and other.entry.exists()  # only that checkpoint's stale export goes
    x = torch.randn(*SHAPE)
    torch.testing.assert_close(new(x), torch_logits(new_net, x))
    assert not torch.allclose(new(x), torch_logits(old_net, x))


def test_a_failed_export_leaves_nothing_and_falls_back_to_torch_with_one_warning(tmp_path, caplog):
    net, rt = tiny_net(), FakeRuntime(fail_export=True)
    ckpt = checkpoint(tmp_path, net)
    f = factory(rt)
    with caplog.at_level(logging.WARNING, logger="autoliver.infer.engines"):
        engines = [f.build(net, SHAPE, ckpt) for _ in range(2)]
    assert all(e.name == "torch" and "unsupported operator" in e.fallback for e in engines)
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 1
    cache = ckpt.parent / CACHE_DIR_NAME
    assert list(cache.iterdir()) == []  # no entry, no temporary folder
    x = torch.randn(*SHAPE)
    torch.testing.assert_close(engines[0](x), torch_logits(net, x))


def test_a_wrong_export_is_never_used(tmp_path, caplog):
    net, rt = tiny_net(), FakeRuntime(offset=0.5)  # exports that compute something else
    with caplog.at_level(logging.WARNING, logger="autoliver.infer.engines"):
        engine = factory(rt).build(net, SHAPE, checkpoint(tmp_path, net))
    assert engine.name == "torch" and "differs from torch" in engine.fallback
    assert "differs from torch" in caplog.text
    x = torch.randn(*SHAPE)
    torch.testing.assert_close(engine(x), torch_logits(net, x))


def test_a_missing_runtime_falls_back_to_torch(tmp_path, caplog):
    net = tiny_net()
    with caplog.at_level(logging.WARNING, logger="autoliver.infer.engines"):
        engine = factory(FakeRuntime(missing=True)).build(net, SHAPE)
    assert engine.name == "torch" and engine.requested == "onnxruntime"
    assert "not installed" in caplog.text and "fast-cpu" in caplog.text and "--engine torch" in caplog.text
    # auto with no runtime installed is plain torch, without a warning
    auto = EngineFactory("auto", "cpu", runtimes={})
    assert auto.name == "torch" and auto.build(net, SHAPE).fallback is None


def test_a_damaged_entry_is_exported_again(tmp_path):
    net, rt = tiny_net(), FakeRuntime()
    ckpt = checkpoint(tmp_path, net)
    entry = factory(rt).build(net, SHAPE, ckpt).entry
    (entry / "weights.pt").write_bytes(b"truncated")
    again = factory(rt).build(net, SHAPE, ckpt)
    assert again.name == "onnxruntime" and rt.exports == 2 and again.entry == entry
    x = torch.randn(*SHAPE)
    torch.testing.assert_close(again(x), torch_logits(net, x))


def test_an_unwritable_cache_folder_exports_to_a_temporary_one(tmp_path):
    net, rt = tiny_net(), FakeRuntime()
    blocked = tmp_path / "not_a_folder"
    blocked.write_text("a file where the cache folder would go")
    f = factory(rt)
    engine = f.build(net, SHAPE, cache_dir=blocked)
    assert engine.name == "onnxruntime" and tmp_path not in engine.entry.parents
    assert f.build(net, SHAPE).entry == engine.entry  # no checkpoint: the factory's scratch folder, reused


# --- atomic publication and concurrent exporters -----------------------------------------------

def test_concurrent_exporters_keep_the_first_published_entry(tmp_path):
    calls = []

    def build_loser(folder: Path) -> dict:
        # while this process builds, another one publishes the same key
        calls.append("loser")
        cached_build(tmp_path, "k" * 24, {"who": "winner"}, lambda f: (f / "model.bin").write_text("winner") and None)
        (folder / "model.bin").write_text("loser")
        return {"who": "loser"}

    entry = cached_build(tmp_path, "k" * 24, {}, build_loser)
    assert read_meta(entry)["who"] == "winner" and (entry / "model.bin").read_text() == "winner"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k" * 24]  # the loser's copy is gone
    assert cached_build(tmp_path, "k" * 24, {}, lambda f: calls.append("rebuilt")) == entry and calls == ["loser"]


def test_an_incomplete_entry_is_replaced(tmp_path):
    (tmp_path / "key").mkdir()
    (tmp_path / "key" / "model.onnx").write_bytes(b"half")  # no engine.json: never published whole
    entry = cached_build(tmp_path, "key", {"a": 1}, lambda f: (f / "model.onnx").write_bytes(b"whole") and None)
    assert (entry / "model.onnx").read_bytes() == b"whole" and read_meta(entry)["a"] == 1


def test_a_killed_exporter_leaves_temporaries_the_next_one_removes(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = atomic._host()  # temporaries are named by autoliver.io.atomic
    leftover = tmp_path / f".key.{host}-{dead.pid}.abcd1234.building"
    leftover.mkdir()
    (leftover / "model.onnx").write_bytes(b"partial")
    live = tmp_path / f".key.{host}-{os.getpid()}.abcd5678.building"  # this process: still writing
    live.mkdir()
    cached_build(tmp_path, "key", {}, lambda f: None)
    assert not leftover.exists() and live.exists()


def test_an_interrupted_build_publishes_nothing(tmp_path):
    def build(folder: Path) -> None:
        (folder / "model.onnx").write_bytes(b"x")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        cached_build(tmp_path, "key", {}, build)
    assert list(tmp_path.iterdir()) == []


# --- running -----------------------------------------------------------------------------------

def test_static_batches_split_and_pad_to_the_exported_batch():
    seen = []

    def fn(a: np.ndarray) -> np.ndarray:
        seen.append(a.shape[0])
        return np.repeat(a.sum(axis=1, keepdims=True), 3, axis=1) * np.array([1, 2, 3], np.float32)[None, :, None, None]

    run = static_batches(fn, (2, 2, 4, 4))
    x = torch.randn(5, 2, 4, 4)
    out = run(x)
    assert seen == [2, 2, 2] and out.shape == (5, 3, 4, 4)
    torch.testing.assert_close(out[:, 1], 2 * x.sum(1))
    with pytest.raises(ValueError, match="exported for inputs"):
        run(torch.randn(2, 2, 4, 8))


def test_dynamic_batches_take_any_spatial_size_but_not_other_channels():
    def fn(a: np.ndarray) -> np.ndarray:
        return np.repeat(a.sum(axis=1, keepdims=True), 3, axis=1)

    run = static_batches(fn, (1, 2, 4, 4, 4), dynamic=True)
    x = torch.randn(3, 2, 8, 12, 4)
    torch.testing.assert_close(run(x)[:, 0], x.sum(1))
    with pytest.raises(ValueError, match="exported for inputs"):
        run(torch.randn(1, 3, 4, 4, 4))
    with pytest.raises(ValueError, match="exported for inputs"):
        run(torch.randn(1, 2, 4, 4))


def test_a_dynamic_export_is_its_own_cache_entry_and_runs_other_tile_sizes(tmp_path):
    net, rt = tiny_net(), FakeRuntime()
    ckpt = checkpoint(tmp_path, net)
    static = factory(rt).build(net, SHAPE, ckpt)
    dynamic = factory(rt).build(net, SHAPE, ckpt, dynamic=True)
    assert rt.exports == 2 and rt.dynamic and static.entry != dynamic.entry
    assert read_meta(dynamic.entry)["dynamic_spatial"] is True and "dynamic_spatial" not in read_meta(static.entry)
    x = torch.randn(1, 1, 16, 24, 32)
    torch.testing.assert_close(dynamic(x), torch_logits(net, x))
    with pytest.raises(ValueError, match="exported for inputs"):
        static(x)


def test_the_sliding_window_gives_the_torch_result_through_an_engine(tmp_path):
    net, rt = tiny_net(dims=2), FakeRuntime()
    engine = factory(rt).build(net, (4, 1, 16, 16))
    window = Window((16, 16), step=0.5, n_classes=3)
    image = torch.randn(1, 40, 28)
    with torch.inference_mode():
        expected = sliding_window_predict(make_predictor(net, torch.device("cpu"), None), image, window)
        got = sliding_window_predict(engine, image, window)
    torch.testing.assert_close(got, expected)
    assert set(rt.batches) == {4}  # padded up to the exported batch


# --- the real runtimes, where installed --------------------------------------------------------

@pytest.mark.parametrize("runtime", ["onnxruntime", "openvino"])
def test_real_runtime_agrees_with_torch_and_is_cached(runtime, tmp_path):
    pytest.importorskip(runtime)
    net = tiny_net(3)
    ckpt = checkpoint(tmp_path, net)
    shape = (2, 1, 16, 32, 32)
    engine = EngineFactory(runtime, "cpu", threads=1).build(net, shape, ckpt)
    assert engine.name == runtime, engine.fallback
    x = torch.randn(3, *shape[1:])
    ref, out = torch_logits(net, x), engine(x)
    assert (out - ref).abs().max().item() < 1e-3 * max(1.0, (ref.max() - ref.min()).item())
    assert (out.argmax(1) == ref.argmax(1)).float().mean().item() >= 0.999
    meta = read_meta(engine.entry)
    assert meta["engine"] == runtime and meta["check_max_abs_diff"] < 1e-3
    again = EngineFactory(runtime, "cpu", threads=1).build(net, shape, ckpt)
    assert again.entry == engine.entry and read_meta(again.entry) == meta


@pytest.mark.parametrize("runtime", ["onnxruntime", "openvino"])
def test_real_runtime_exported_dynamic_agrees_with_torch_at_other_sizes(runtime, tmp_path):
    pytest.importorskip(runtime)
    net = tiny_net(3)
    engine = EngineFactory(runtime, "cpu", threads=1).build(net, (1, 1, 16, 32, 32), checkpoint(tmp_path, net), dynamic=True)
    assert engine.name == runtime, engine.fallback
    for shape in [(1, 1, 16, 32, 32), (1, 1, 24, 40, 16)]:
        x = torch.randn(shape)
        ref, out = torch_logits(net, x), engine(x)
        assert out.shape == ref.shape
        assert (out - ref).abs().max().item() < 1e-3 * max(1.0, (ref.max() - ref.min()).item())


def test_predict_defaults_to_auto_unless_the_site_sets_an_engine():
    from autoliver.cli import ENGINE_ENV, default_engine

    assert default_engine({}) == "auto" and default_engine({ENGINE_ENV: " "}) == "auto"
    assert default_engine({ENGINE_ENV: "torch"}) == "torch"
    with pytest.raises(UsageError, match=ENGINE_ENV):
        default_engine({ENGINE_ENV: "tensorrt"})
