"""Dataset names, ids and paths resolve to the raw folder; bad names get a clear error."""

import pytest

from autoliver.core.errors import DatasetError
from autoliver.core.layout import Workspace, resolve_dataset


def make(ws_root, name):
    d = ws_root / "raw" / name
    d.mkdir(parents=True)
    return d


def test_resolves_path_name_and_id(tmp_path):
    ws = Workspace(tmp_path / "ws")
    d = make(ws.root, "Dataset003_Liver")
    make(ws.root, "Dataset004_Other")
    assert resolve_dataset(str(d), ws) == d.resolve()
    assert resolve_dataset("Dataset003_Liver", ws) == d.resolve()
    assert resolve_dataset("3", ws) == d.resolve()
    assert resolve_dataset("003", ws) == d.resolve()


def test_unknown_dataset_names_workspace(tmp_path):
    ws = Workspace(tmp_path / "ws")
    with pytest.raises(DatasetError) as err:
        resolve_dataset("Dataset009_Missing", ws)
    assert "Dataset009_Missing" in str(err.value) and str(ws.raw) in str(err.value)
    with pytest.raises(DatasetError):
        resolve_dataset("9", ws)


def test_ambiguous_id(tmp_path):
    ws = Workspace(tmp_path / "ws")
    make(ws.root, "Dataset005_A")
    make(ws.root, "Dataset005_B")
    with pytest.raises(DatasetError, match="ambiguous"):
        resolve_dataset("5", ws)


def test_artefact_folders_live_under_workspace(tmp_path):
    ws = Workspace(tmp_path)
    assert ws.preprocessed("Dataset003_Liver") == tmp_path / "preprocessed" / "Dataset003_Liver"
    assert ws.results("Dataset003_Liver") == tmp_path / "results" / "Dataset003_Liver"


def test_atomic_writes_get_default_permissions(tmp_path):
    import os

    from autoliver.io.atomic import write_json

    mask = os.umask(0o022)
    try:
        write_json(tmp_path / "a.json", {"x": 1})
    finally:
        os.umask(mask)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]
