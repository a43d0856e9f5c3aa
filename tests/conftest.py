"""Fixtures shared by the test modules, and the markers.

Session-scoped templates are built once and never handed to a test: tests get a private copy
(function scope, or module scope for a module's read-mostly data), so no test can delete or
change what another test uses. At the end of the session every template is checked against the
snapshot taken when it was built.

- ``workspace``: an empty ``Workspace`` in the test's tmp_path.
- ``tiny_ws``: a copy of the tiny phantom workspace (4 phantoms, 24x48x48 at 8 mm, planned and
  preprocessed on the CPU, plans shrunk to tiny networks, with 3d_lowres and the cascade
  planned and the lowres data preprocessed); ``results/`` empty.
- ``model_ws``: a copy of that workspace with a random-weight model folder in
  ``results/<dataset>`` (plans.json, splits.json, ``fold_k/checkpoint_final.pt`` of 2d folds 0
  and 1, 3d_fullres, 3d_lowres and 3d_cascade_fullres fold 0), for prediction tests.
- ``tiny_ws_module`` / ``model_ws_module``: the same, one copy per test module, for modules
  whose tests only read it.
- ``fake_clock``: a ``FakeClock`` (tests.helpers) for the trainer's injected clock.
- ``single_thread``: torch runs on one intra-op thread during the test and gets its previous
  setting back after it (in-process ``--threads 1`` would otherwise leak into later tests).
"""

from __future__ import annotations

import os

import pytest
from helpers import FakeClock, copy_workspace, snapshot, torch_threads, write_random_models

MARKERS = (
    "slow: longer end-to-end tests (still run in CI); deselect with -m 'not slow'",
    "subprocess: runs autoliver (the CLI or a script) in a child process",
)


def pytest_configure(config):
    for line in MARKERS:
        config.addinivalue_line("markers", line)
    # `autoliver predict` run in the test process uses torch unless a test asks for --engine: an
    # installed CPU runtime is never loaded into the long-lived pytest process by a default
    os.environ.setdefault("AUTOLIVER_ENGINE", "torch")


@pytest.fixture(scope="session")
def _templates(tmp_path_factory):
    """Templates built on first use, checked untouched when the session ends."""
    built = {}
    yield built
    changed = [name for name, (ws, snap) in built.items() if snapshot(ws.root) != snap]
    assert not changed, f"a test wrote into the shared template(s) {changed}; tests must use the copies the fixtures hand out"


def _template(templates, tmp_path_factory, name, build):
    if name not in templates:
        ws = build(tmp_path_factory.mktemp(f"template_{name}"))
        templates[name] = (ws, snapshot(ws.root))
    return templates[name][0]


def _build_tiny(root):
    from helpers import build_tiny_workspace

    return build_tiny_workspace(root)


@pytest.fixture(scope="session")
def _tiny_template(_templates, tmp_path_factory):
    return _template(_templates, tmp_path_factory, "tiny", _build_tiny)


@pytest.fixture(scope="session")
def _model_template(_templates, _tiny_template, tmp_path_factory):
    def build(root):
        ws = copy_workspace(_tiny_template, root / "ws")
        write_random_models(ws)
        return ws

    return _template(_templates, tmp_path_factory, "models", build)


@pytest.fixture()
def workspace(tmp_path):
    from autoliver.core.layout import Workspace

    return Workspace(tmp_path / "ws")


@pytest.fixture()
def tiny_ws(_tiny_template, tmp_path):
    return copy_workspace(_tiny_template, tmp_path / "tiny_ws")


@pytest.fixture()
def model_ws(_model_template, tmp_path):
    return copy_workspace(_model_template, tmp_path / "model_ws")


@pytest.fixture(scope="module")
def tiny_ws_module(_tiny_template, tmp_path_factory):
    return copy_workspace(_tiny_template, tmp_path_factory.mktemp("tiny_ws_module") / "ws")


@pytest.fixture(scope="module")
def model_ws_module(_model_template, tmp_path_factory):
    return copy_workspace(_model_template, tmp_path_factory.mktemp("model_ws_module") / "ws")


@pytest.fixture()
def fake_clock():
    return FakeClock()


@pytest.fixture()
def single_thread():
    with torch_threads(1):
        yield
