"""Dataset discovery: structure of an nnU-Net v2 raw dataset, every problem reported at once."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from autoliver.core.errors import DatasetError
from autoliver.io.dataset import discover, load_dataset_json, open_dataset
from autoliver.io.images import Geometry, write_image

GEOM = Geometry((4, 5, 6), (2.0, 0.8, 0.8), (0.0, 0.0, 0.0), (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))
DATASET_JSON = {"channel_names": {"0": "CT"}, "labels": {"background": 0, "liver": 1, "tumour": 2}, "numTraining": 3, "file_ending": ".nii.gz"}


def make_dataset(root: Path, cases=("a", "b", "c"), test=("t1",), dataset_json: dict | None = None) -> Path:
    """A tiny valid dataset: one 4x5x6 volume per case and its label."""
    image = np.arange(np.prod(GEOM.shape), dtype=np.int16).reshape(GEOM.shape)
    label = (image % 3).astype(np.uint8)
    for case in cases:
        write_image(root / "imagesTr" / f"{case}_0000.nii.gz", image, GEOM)
        write_image(root / "labelsTr" / f"{case}.nii.gz", label, GEOM)
    for case in test:
        write_image(root / "imagesTs" / f"{case}_0000.nii.gz", image, GEOM)
    dj = dict(DATASET_JSON, numTraining=len(cases)) if dataset_json is None else dataset_json
    (root / "dataset.json").write_text(json.dumps(dj))
    return root


def test_valid_dataset_is_discovered(tmp_path):
    root = make_dataset(tmp_path / "Dataset001_Tiny")
    dataset, problems = discover(root)
    assert problems == []
    assert [c.case_id for c in dataset.training] == ["a", "b", "c"]
    assert [c.case_id for c in dataset.test] == ["t1"]
    assert dataset.training[0].images == (root / "imagesTr" / "a_0000.nii.gz",)
    assert dataset.training[0].label == root / "labelsTr" / "a.nii.gz"
    assert dataset.test[0].label is None
    assert dataset.labels == {"background": 0, "liver": 1, "tumour": 2}
    assert dataset.channel_names == {"0": "CT"}
    assert dataset.file_ending == ".nii.gz" and dataset.name == "Dataset001_Tiny"
    assert open_dataset(root) == dataset


def test_missing_and_extra_labels_are_all_reported(tmp_path):
    root = make_dataset(tmp_path / "Dataset001_Tiny")
    (root / "labelsTr" / "b.nii.gz").unlink()
    (root / "labelsTr" / "c.nii.gz").rename(root / "labelsTr" / "zz.nii.gz")
    _, problems = discover(root)
    text = "\n".join(problems)
    assert "b.nii.gz: missing label for training case b" in text
    assert "c.nii.gz: missing label for training case c" in text
    assert "zz.nii.gz: label without an image" in text
    with pytest.raises(DatasetError) as err:
        open_dataset(root)
    assert len(err.value.problems) == len(problems) == 3


def test_badly_named_files_are_reported(tmp_path):
    root = make_dataset(tmp_path / "Dataset001_Tiny")
    (root / "imagesTr" / "a_0000.nii.gz").rename(root / "imagesTr" / "a.nii.gz")  # no channel suffix
    (root / "imagesTr" / "notes.txt").write_text("x")
    (root / "imagesTr" / "b_0001.nii.gz").write_bytes(b"")  # channel 1 of a 1-channel dataset
    (root / "imagesTr" / ".DS_Store").write_text("hidden files are ignored")
    _, problems = discover(root)
    text = "\n".join(problems)
    assert "a.nii.gz: image names must be <case>_0000.nii.gz" in text
    assert "notes.txt: does not end in the dataset's file_ending" in text
    assert "b_0001.nii.gz: channel 1 but dataset.json declares 1 channel" in text
    assert ".DS_Store" not in text


def test_multichannel_case_missing_a_channel(tmp_path):
    dj = dict(DATASET_JSON, channel_names={"0": "CT", "1": "CT_late"})
    root = make_dataset(tmp_path / "Dataset001_Tiny", test=(), dataset_json=dj)
    for case in ("b", "c"):
        (root / "imagesTr" / f"{case}_0001.nii.gz").write_bytes((root / "imagesTr" / f"{case}_0000.nii.gz").read_bytes())
    dataset, problems = discover(root)
    assert problems == [f"{root / 'imagesTr'}: case a has no channel 1 file (a_0001.nii.gz)"]
    assert len(dataset.training[1].images) == 2


@pytest.mark.parametrize(
    "text, expected",
    [
        (None, "dataset.json: missing"),
        ("{not json", "dataset.json: not valid JSON"),
        ("[1, 2]", "must hold a JSON object"),
        (json.dumps({"labels": {"background": 0}, "file_ending": ".nii.gz"}), 'no "channel_names"'),
        (json.dumps({"channel_names": {"0": "CT"}, "file_ending": ".nii.gz"}), 'no "labels"'),
        (json.dumps(dict(DATASET_JSON, labels={"liver": 1})), "must declare background as 0"),
        (json.dumps(dict(DATASET_JSON, labels={"background": 0, "liver": -1})), "non-negative integers"),
        (json.dumps({k: v for k, v in DATASET_JSON.items() if k != "file_ending"}), 'no "file_ending"'),
    ],
)
def test_bad_dataset_json(tmp_path, text, expected):
    root = make_dataset(tmp_path / "Dataset001_Tiny")
    if text is None:
        (root / "dataset.json").unlink()
    else:
        (root / "dataset.json").write_text(text)
    _, problems = discover(root)
    assert any(expected in p and "dataset.json" in p for p in problems), problems
    _, json_problems = load_dataset_json(root)
    assert json_problems


def test_num_training_mismatch(tmp_path):
    root = make_dataset(tmp_path / "Dataset001_Tiny", dataset_json=dict(DATASET_JSON, numTraining=5))
    _, problems = discover(root)
    assert problems == [f"{root / 'dataset.json'}: numTraining is 5 but 3 training cases were found; set it to 3"]


def test_missing_folders_and_empty_dataset(tmp_path):
    root = tmp_path / "Dataset001_Empty"
    root.mkdir()
    (root / "dataset.json").write_text(json.dumps(DATASET_JSON))
    _, problems = discover(root)
    text = "\n".join(problems)
    assert "imagesTr: missing" in text and "labelsTr: missing" in text and "no training cases" in text
    (root / "imagesTr").mkdir()
    (root / "labelsTr").mkdir()
    _, problems = discover(root)
    assert problems == [f"{root}: the dataset has no training cases; add images to imagesTr and labels to labelsTr"]
    dataset, problems = discover(tmp_path / "nowhere")
    assert dataset is None and "no such dataset folder" in problems[0]


def test_explicit_dataset_key_and_escaping_paths(tmp_path):
    root = make_dataset(tmp_path / "Dataset001_Tiny")
    (tmp_path / "outside.nii.gz").write_bytes(b"")
    dj = dict(
        DATASET_JSON,
        numTraining=2,
        dataset={
            "a": {"images": ["imagesTr/a_0000.nii.gz"], "label": "labelsTr/a.nii.gz"},
            "evil": {"images": ["../outside.nii.gz"], "label": "../../etc/passwd"},
            "empty": {"images": [], "label": "labelsTr/b.nii.gz"},
        },
    )
    (root / "dataset.json").write_text(json.dumps(dj))
    dataset, problems = discover(root)
    text = "\n".join(problems)
    assert 'case evil image "../outside.nii.gz" lies outside the dataset folder' in text
    assert 'case evil label "../../etc/passwd" lies outside the dataset folder' in text
    assert "case empty lists no images" in text
    assert "numTraining is 2 but 3" in text
    case_a = next(c for c in dataset.training if c.case_id == "a")
    assert case_a.images == (root / "imagesTr" / "a_0000.nii.gz",)


def test_symlinked_files_count_as_inside(tmp_path):
    store = make_dataset(tmp_path / "store", cases=("a",), test=())
    root = tmp_path / "Dataset001_Linked"
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    (root / "imagesTr" / "a_0000.nii.gz").symlink_to(store / "imagesTr" / "a_0000.nii.gz")
    (root / "labelsTr" / "a.nii.gz").symlink_to(store / "labelsTr" / "a.nii.gz")
    (root / "dataset.json").write_text(json.dumps(dict(DATASET_JSON, numTraining=1, dataset={"a": {"images": ["imagesTr/a_0000.nii.gz"], "label": "labelsTr/a.nii.gz"}})))
    dataset, problems = discover(root)
    assert problems == [] and dataset.training[0].label == root / "labelsTr" / "a.nii.gz"
