"""Per-case stages on a Dask cluster (``--scheduler``): a local cluster of worker processes gives
the same outputs as a local run, and a worker killed in the middle of a case loses nothing."""

from __future__ import annotations

import os
import shutil
import signal
from pathlib import Path

import pytest
from faults import contents, differing
from helpers import DATASET

from autoliver.cli import main
from autoliver.core.errors import UsageError
from autoliver.core.layout import Workspace
from autoliver.core.parallel import cluster, parallel_map

pytest.importorskip("distributed")
pytestmark = pytest.mark.subprocess


def square_in_another_process(x: int) -> tuple[int, int]:
    return x * x, os.getpid()


def killed_once(marker_dir: str, x: int) -> int:
    """Kills the worker running it the first time it sees ``x`` (as a crash or OOM kill would)."""
    marker = Path(marker_dir) / f"seen-{x}"
    if not marker.exists():
        marker.touch()
        os.kill(os.getpid(), signal.SIGKILL)
    return 10 * x


@pytest.fixture(scope="module")
def local_cluster():
    with cluster("local:2") as client:
        yield client


def test_same_results_in_order_on_other_processes(local_cluster):
    with cluster(None):  # a nested local run is unaffected
        pass
    from autoliver.core import parallel

    token = parallel._client.set(local_cluster)
    try:
        ordered = list(parallel_map(square_in_another_process, [(i,) for i in range(6)], progress=False))
        unordered = list(parallel_map(square_in_another_process, [(i,) for i in range(6)], progress=False, ordered=False))
    finally:
        parallel._client.reset(token)
    assert [v for v, _ in ordered] == [i * i for i in range(6)]
    assert sorted(v for v, _ in unordered) == [i * i for i in range(6)]
    assert os.getpid() not in {pid for _, pid in ordered}


def test_a_killed_worker_loses_no_case(local_cluster, tmp_path):
    from autoliver.core import parallel

    token = parallel._client.set(local_cluster)
    try:
        results = list(parallel_map(killed_once, [(str(tmp_path), i) for i in range(2)], progress=False))
    finally:
        parallel._client.reset(token)
    assert results == [0, 10]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["seen-0", "seen-1"]


def test_preprocessing_on_the_cluster_equals_the_local_run(tiny_ws, tmp_path):
    raw = tmp_path / "raw" / DATASET
    shutil.copytree(tiny_ws.raw / DATASET, raw)
    local, remote = Workspace(tmp_path / "local"), Workspace(tmp_path / "remote")
    argv = ["plan_and_preprocess", str(raw), "--device", "cpu", "--no-progress"]
    assert main([*argv, "-np", "1", "--workspace", str(local.root)]) == 0
    assert main(["--scheduler", "local:2", *argv, "--workspace", str(remote.root)]) == 0
    expected = contents(local.preprocessed(DATASET))
    assert len(expected) > 4
    assert differing(expected, contents(remote.preprocessed(DATASET))) == []


def test_a_malformed_local_address_is_a_usage_error():
    with pytest.raises(UsageError, match="local:N"), cluster("local:x"):
        pass


def test_cross_validation_prediction_on_the_cluster_equals_the_local_run(tiny_ws, caplog):
    import json

    import numpy as np
    from helpers import train_cli

    fast = ["--epochs", "1", "--iters-per-epoch", "2", "--val-iters", "1"]
    assert train_cli(tiny_ws, "3d_fullres", 0, *fast) == 0
    val = tiny_ws.results(DATASET) / "3d_fullres" / "fold_0" / "validation"
    local = {p.name: p.read_bytes() for p in val.iterdir()}
    metrics = (val.parent / "metrics.json").read_text()
    assert any(n.endswith(".npz") for n in local)
    shutil.rmtree(val)
    (val.parent / "metrics.json").unlink()
    with caplog.at_level("INFO", logger="autoliver.train.trainer"):
        assert main(["--scheduler", "local:2", "train", "-d", DATASET, "3d_fullres", "0", "--workspace", str(tiny_ws.root), "--device", "cpu",
                     "--no-progress", *fast, "--continue"]) == 0
    assert "on the Dask cluster" in caplog.text
    assert sorted(p.name for p in val.iterdir()) == sorted(local)
    for name, before in local.items():
        if name.endswith(".npz"):
            with np.load(val / name) as a, np.load(__import__("io").BytesIO(before)) as b:
                np.testing.assert_allclose(a["probabilities"].astype(np.float32), b["probabilities"].astype(np.float32), atol=2e-3)
        else:
            assert json.loads((val / name).read_text())["dice"] == pytest.approx(json.loads(before)["dice"], abs=1e-3)
    assert json.loads((val.parent / "metrics.json").read_text())["mean"] == pytest.approx(json.loads(metrics)["mean"], abs=1e-3)
