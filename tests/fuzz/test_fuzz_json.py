"""Every JSON artefact autoliver reads, with hostile structure: deep nesting, wrong types, lists
for objects, strings for lists, NaN/Infinity/null numbers, huge numbers, path-like names
(``../x``, ``/abs``, ``a/b``, empty, NUL, very long), invalid text.

Each case starts from a valid artefact and replaces, deletes or wraps values at random places
(or writes raw hostile text). The property: the artefact's public reader, and what the next
stage does first with its result, either works or raises an ``AutoliverError`` naming the file.
An untouched artefact always loads.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from autoliver.core.artefacts import FoldMetrics, InferencePlan, PostprocessStep
from autoliver.core.errors import PlanError
from autoliver.io.images import Geometry, write_image
from autoliver.io.inference_plan import load_inference_plan
from autoliver.io.jsonfile import read_json
from autoliver.io.validate import validate_dataset
from fuzz.conftest import scaled
from fuzz.counting import count
from fuzz.strategies import outcome, scratch
from planning.fingerprint import load_fingerprint
from planning.planner import plan_experiment
from planning.plans import Plans

PATH_LIKE = ("../x", "/abs", "a/b", "", "\x00", "a\x00b", "x" * 5000, ".hidden", "..", "imagesTr/a_0000.nii.gz", "C:\\x", " a ")
RAW_TEXTS = ("[" * 100_000 + "]" * 100_000, '{"a":' * 50_000 + "1" + "}" * 50_000, "NaN", "Infinity", "-Infinity", "null", "",
             "1" + "0" * 5000, '{"a": 1e400}', '{"a": 1', "\ufeff{}", "[1, 2,]")

leaves = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.sampled_from((10**400, -(10**400))),
                   st.floats(allow_nan=True, allow_infinity=True), st.sampled_from(PATH_LIKE), st.text(max_size=8))
hostile = st.recursive(leaves, lambda children: st.one_of(st.lists(children, max_size=3), st.dictionaries(st.text(max_size=5), children, max_size=3)),
                       max_leaves=8)

FINGERPRINT = {
    "schema_version": 1, "input_hash": "0" * 16, "dataset_name": "Dataset001_Fuzz", "n_cases": 4,
    "spacing": {"median": [2.5, 0.8, 0.8], "percentiles": {"10": [2.0, 0.7, 0.7]}},
    "shape_after_crop": {"median": [60, 160, 160]},
    "intensity": {"foreground": {"mean": 90.0, "std": 40.0, "percentile_00_5": -80.0, "percentile_99_5": 250.0}, "per_class": {}},
    "labels": {"background": 0, "liver": 1, "tumour": 2}, "channel_names": {"0": "CT"},
    "cases": {"a": {"shape_after_crop": [60, 160, 160], "spacing": [2.5, 0.8, 0.8]}},
}
DATASET_JSON = {"channel_names": {"0": "CT"}, "labels": {"background": 0, "liver": 1, "tumour": 2}, "numTraining": 1, "file_ending": ".nii.gz",
                "dataset": {"a": {"images": ["imagesTr/a_0000.nii.gz"], "label": "labelsTr/a.nii.gz"}}}


def _templates() -> dict[str, object]:
    plans = plan_experiment(FINGERPRINT, device="cpu", cpu_ram_gb=4).to_json()
    plan = InferencePlan(dataset="Dataset001_Fuzz", plans_hash="0" * 16, configurations=("2d",), folds={"2d": ("0", "1")},
                         postprocessing=(PostprocessStep("largest_liver_component", True, {}),)).to_json()
    return {"dataset": DATASET_JSON, "fingerprint": FINGERPRINT, "plans": plans, "inference_plan": plan,
            "splits": [{"train": ["a", "b"], "val": ["c"]}, {"train": ["a", "c"], "val": ["b"]}],
            "metrics": FoldMetrics({"a": {"liver": 0.9, "tumour": 0.5}, "b": {"liver": 1.0, "tumour": 1}}).to_json()}


TEMPLATES = _templates()


@st.composite
def mutated(draw, template):
    """``template`` with 0..3 edits at random places: replace with a hostile value, delete a
    key, wrap in a list, turn a list into a string."""
    doc = copy.deepcopy(template)
    for _ in range(draw(st.integers(0, 3))):
        holder, key, node = None, None, doc
        while isinstance(node, (dict, list)) and node and draw(st.booleans()):
            key = draw(st.sampled_from(sorted(node, key=str))) if isinstance(node, dict) else draw(st.integers(0, len(node) - 1))
            holder, node = node, node[key]
        action = draw(st.sampled_from(("replace", "replace", "delete", "wrap", "stringify")))
        if action == "replace":
            new = draw(hostile)
        elif action == "wrap":
            new = [node]
        else:
            new = json.dumps(node, allow_nan=True)[:200] if action == "stringify" else None
        if holder is None:
            doc = new
        elif action == "delete" and isinstance(holder, dict):
            del holder[key]
        else:
            holder[key] = new
    return doc


def artefact_text(kind: str):
    return st.one_of(mutated(TEMPLATES[kind]).map(lambda d: json.dumps(d, allow_nan=True).encode("utf-8", "surrogatepass")),
                     st.sampled_from(RAW_TEXTS).map(str.encode), st.binary(max_size=20))


def _write(folder: Path, name: str, content: bytes) -> Path:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    return path


def _dataset(folder: Path, content: bytes) -> Path:
    root = folder / "Dataset001_Fuzz"
    geometry = Geometry((2, 3, 3), (2.0, 1.0, 1.0), (0.0, 0.0, 0.0), (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))
    write_image(root / "imagesTr" / "a_0000.nii.gz", np.zeros((2, 3, 3), np.int16), geometry)
    write_image(root / "labelsTr" / "a.nii.gz", np.ones((2, 3, 3), np.uint8), geometry)
    _write(root, "dataset.json", content)
    return root


def read_dataset(root: Path):
    dataset, problems = validate_dataset(root, progress=False)
    assert all(isinstance(p, str) and str(root) in p for p in problems), problems
    return dataset, problems


def read_plans(path: Path):
    plans = Plans.load(path)
    return plans.plans_hash, [plans.configuration_hash(c) for c in plans.ordered_configurations()]


def read_fingerprint(path: Path):
    return plan_experiment(load_fingerprint(path), device="cpu", cpu_ram_gb=4)


def read_plan(path: Path):
    plan = load_inference_plan(path)
    return plan.enabled_steps, plan.to_json()


def read_splits(path: Path):
    from autoliver.train.splits import load_or_create_splits

    (path.parent / "splits.json").write_bytes(path.read_bytes())
    return load_or_create_splits(path.parent, ["a", "b", "c"])


def read_metrics(path: Path):
    metrics = FoldMetrics.from_json(read_json(path, PlanError), str(path))
    return metrics.mean


READERS = {"plans": ("plans.json", read_plans), "fingerprint": ("fingerprint.json", read_fingerprint),
           "inference_plan": ("inference_plan.json", read_plan), "splits": ("splits.json", read_splits), "metrics": ("metrics.json", read_metrics)}


@settings(max_examples=scaled(60))
@given(content=artefact_text("dataset"))
def test_dataset_json_never_breaks_validation(content):
    with scratch() as folder:
        root = _dataset(folder, content)
        outcome(read_dataset, root)
        count("json")


def _artefact(kind: str, content: bytes) -> None:
    name, reader = READERS[kind]
    with scratch() as folder:
        path = _write(folder, name, content)
        outcome(reader, path)
        count("json")


@settings(max_examples=scaled(60))
@given(kind=st.sampled_from(sorted(READERS)), data=st.data())
def test_json_artefacts_load_or_refuse_naming_the_file(kind, data):
    _artefact(kind, data.draw(artefact_text(kind)))


EXAMPLES_PER_KIND = {"plans": 50, "fingerprint": 50, "inference_plan": 50, "splits": 40, "metrics": 40}


@pytest.mark.parametrize("kind", list(EXAMPLES_PER_KIND))
def test_each_json_artefact(kind):
    @settings(max_examples=scaled(EXAMPLES_PER_KIND[kind]))
    @given(content=artefact_text(kind))
    def check(content):
        _artefact(kind, content)

    check()


def test_untouched_artefacts_load(tmp_path):
    for kind, (name, reader) in READERS.items():
        path = _write(tmp_path / kind, name, json.dumps(TEMPLATES[kind]).encode())
        result, error = outcome(reader, path)
        assert error is None and result is not None, (kind, error)
    dataset, problems = read_dataset(_dataset(tmp_path, json.dumps(DATASET_JSON).encode()))
    assert dataset is not None and not problems


def test_a_string_for_the_list_of_images_is_one_problem(tmp_path):
    broken = copy.deepcopy(DATASET_JSON)
    broken["dataset"]["a"]["images"] = "imagesTr/a_0000.nii.gz"
    _, problems = read_dataset(_dataset(tmp_path, json.dumps(broken).encode()))
    about_a = [p for p in problems if "case a" in p]
    assert len(about_a) == 1 and "must be a list" in about_a[0], problems
    broken["dataset"]["a"] = ["imagesTr/a_0000.nii.gz"]
    _, problems = read_dataset(_dataset(tmp_path / "list", json.dumps(broken).encode()))
    assert len([p for p in problems if "case a" in p]) == 1, problems


def test_nesting_thousands_deep_is_one_clear_error_in_every_artefact(tmp_path):
    deep = ("[" * 100_000 + "]" * 100_000).encode()
    for kind, (name, reader) in READERS.items():
        path = _write(tmp_path / kind, name, deep)
        _, error = outcome(reader, path)
        assert error is not None and "nested too deeply" in str(error), (kind, error)
    _, problems = read_dataset(_dataset(tmp_path, deep))
    assert len(problems) == 1 and "nested too deeply" in problems[0]
