"""The raw dataset: nnU-Net v2 layout, so a dataset prepared for nnU-Net works unchanged.

    DatasetNNN_Name/
        dataset.json        channel_names, labels, numTraining, file_ending (optional "dataset")
        imagesTr/<case>_0000<file_ending>
        labelsTr/<case><file_ending>
        imagesTs/<case>_0000<file_ending>   (optional)

Discovery never raises on the first problem: it returns the cases it could form together with
every problem found, so ``validate`` can report them all at once.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from autoliver.core.errors import AutoliverError, DatasetError
from autoliver.core.layout import plain_name
from autoliver.io.jsonfile import read_json

DATASET_JSON = "dataset.json"
CHANNEL_RE = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


@dataclass(frozen=True)
class Case:
    case_id: str
    images: tuple[Path, ...]  # one file (or DICOM folder) per channel, channel order
    label: Path | None


@dataclass(frozen=True)
class RawDataset:
    root: Path
    dataset_json: dict
    training: tuple[Case, ...]
    test: tuple[Case, ...]

    @property
    def name(self) -> str:
        return self.root.name

    @property
    def file_ending(self) -> str:
        return str(self.dataset_json.get("file_ending", ".nii.gz"))

    @property
    def labels(self) -> dict[str, int]:
        """Label name -> value, as declared in dataset.json (region lists and values that are not
        integers, which ``load_dataset_json`` reports, are not used)."""
        labels = self.dataset_json.get("labels", {})
        return {str(k): int(v) for k, v in labels.items() if isinstance(v, int) and not isinstance(v, bool)} if isinstance(labels, dict) else {}

    @property
    def channel_names(self) -> dict[str, str]:
        names = self.dataset_json.get("channel_names", self.dataset_json.get("modality", {}))
        return {str(k): str(v) for k, v in names.items()} if isinstance(names, dict) else {}


def load_dataset_json(root: Path) -> tuple[dict | None, list[str]]:
    """Parse ``root/dataset.json`` and check its required keys; returns (dict or None, problems)."""
    path = root / DATASET_JSON
    if not path.is_file():
        return None, [f"{path}: missing; write a dataset.json with channel_names, labels, numTraining and file_ending (see README, 'Dataset layout')"]
    try:
        dj = read_json(path, DatasetError, "fix the syntax")
    except DatasetError as exc:
        return None, [str(exc)]
    if not isinstance(dj, dict):
        return None, [f"{path}: must hold a JSON object, got {type(dj).__name__}; see README, 'Dataset layout'"]
    fatal = _structure_problems(path, dj)
    if fatal:
        return None, fatal
    problems = []
    if "channel_names" not in dj and "modality" not in dj:
        problems.append(f'{path}: no "channel_names"; add e.g. {{"0": "CT"}}')
    labels = dj.get("labels")
    if not isinstance(labels, dict) or not labels:
        problems.append(f'{path}: no "labels"; add e.g. {{"background": 0, "liver": 1, "tumour": 2}}')
    else:
        values = [v for v in labels.values() if not isinstance(v, (list, tuple))]
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
            problems.append(f'{path}: "labels" values must be non-negative integers, got {labels}')
        elif 0 not in values:
            problems.append(f'{path}: "labels" must declare background as 0, got {labels}')
    if "file_ending" not in dj:
        problems.append(f'{path}: no "file_ending"; add e.g. ".nii.gz"')
    n = dj.get("numTraining")
    if n is not None and (not isinstance(n, int) or isinstance(n, bool) or n < 0):
        problems.append(f'{path}: "numTraining" must be a whole number, got {n!r:.40}')
    return dj, problems


MAX_REL_PATH = 1024  # characters in a path listed in dataset.json


def _structure_problems(path: Path, dj: dict) -> list[str]:
    """Keys whose type is so wrong that the dataset cannot be discovered (one message each)."""
    out = []
    names = dj.get("channel_names", dj.get("modality", {"0": "CT"}))
    if not isinstance(names, dict) or not names:
        out.append(f'{path}: "channel_names" must be an object such as {{"0": "CT"}}, got {names!r:.60}')
    ending = dj.get("file_ending", ".nii.gz")
    if not isinstance(ending, str) or not ending.startswith(".") or len(ending) > 16 or re.search(r"[/\\\x00-\x1f]", ending):
        out.append(f'{path}: "file_ending" must be a file suffix such as ".nii.gz", got {ending!r:.60}')
    if "dataset" in dj and not isinstance(dj["dataset"], dict):
        out.append(f'{path}: "dataset" must be an object {{case id: {{"images": [...], "label": "..."}}}}, got {type(dj["dataset"]).__name__}')
    return out


def _path_problem(rel: str) -> str | None:
    """Why a relative path from dataset.json cannot name a file (empty, control characters, too long)."""
    if not rel.strip():
        return "is empty"
    if re.search(r"[\x00-\x1f]", rel):
        return "holds control characters"
    if len(rel) > MAX_REL_PATH or any(len(part) > 255 for part in rel.split("/")):
        return "is too long for a file name"
    return None


def _inside(root: Path, rel: str) -> tuple[Path, bool]:
    """Absolute path of ``rel`` and whether it stays inside ``root``. The test is lexical ("../"
    escapes), so files symlinked into the dataset folder are accepted."""
    path = Path(os.path.abspath(root / rel))
    return path, path.is_relative_to(os.path.abspath(root))


def _from_explicit_list(root: Path, entries: dict) -> tuple[list[Case], list[str]]:
    """nnU-Net v2's optional ``"dataset"`` key: {case: {"images": [...], "label": ...}}."""
    cases, problems = [], []
    where = root / DATASET_JSON
    for case_id, entry in sorted(entries.items()):
        try:
            plain_name(case_id, "case id", str(where))
        except AutoliverError as exc:
            problems.append(f"{exc} (a case id becomes part of output file names)")
            continue
        if not isinstance(entry, dict):
            problems.append(f'{where}: case {case_id}: expected {{"images": [...], "label": "..."}}, got {type(entry).__name__}')
            continue
        rels = entry.get("images", [])
        if not isinstance(rels, list) or not all(isinstance(r, str) for r in rels):
            problems.append(f'{where}: case {case_id}: "images" must be a list of file paths, got {rels!r:.80}')
            continue
        if entry.get("label") is not None and not isinstance(entry["label"], str):
            problems.append(f'{where}: case {case_id}: "label" must be a file path, got {entry["label"]!r:.80}')
            continue
        bad = [(rel, why) for rel in rels + ([entry["label"]] if entry.get("label") is not None else []) if (why := _path_problem(rel))]
        if bad:
            problems.append(f'{where}: case {case_id}: path {bad[0][0]!r:.60} {bad[0][1]}; give each file\'s path inside the dataset folder')
            continue
        images = []
        for rel in rels:
            path, ok = _inside(root, rel)
            if not ok:
                problems.append(f'{where}: case {case_id} image "{rel}" lies outside the dataset folder; keep all files inside {root}')
            images.append(path)
        label = None
        if entry.get("label") is not None:
            label, ok = _inside(root, entry["label"])
            if not ok:
                problems.append(f'{where}: case {case_id} label "{entry["label"]}" lies outside the dataset folder; keep all files inside {root}')
        if not images:
            problems.append(f'{where}: case {case_id} lists no images')
        cases.append(Case(case_id, tuple(images), label))
    return cases, problems


def _scan_images(folder: Path, file_ending: str, n_channels: int) -> tuple[dict[str, list[Path | None]], list[str]]:
    """Group ``folder/<case>_<CCCC><file_ending>`` by case; report files that do not fit."""
    groups: dict[str, list[Path | None]] = {}
    problems = []
    for path in sorted(folder.iterdir()):
        if path.name.startswith("."):
            continue
        if not path.name.endswith(file_ending):
            problems.append(f"{path}: does not end in the dataset's file_ending {file_ending!r}; rename or remove it")
            continue
        m = CHANNEL_RE.match(path.name[: -len(file_ending)])
        if not m:
            problems.append(f"{path}: image names must be <case>_0000{file_ending} (channel suffix missing); rename it")
            continue
        channel = int(m["channel"])
        slots = groups.setdefault(m["case"], [None] * n_channels)
        if channel >= n_channels:
            problems.append(f"{path}: channel {channel} but dataset.json declares {n_channels} channel(s)")
            continue
        slots[channel] = path
    for case_id, slots in groups.items():
        for c, p in enumerate(slots):
            if p is None:
                problems.append(f"{folder}: case {case_id} has no channel {c} file ({case_id}_{c:04d}{file_ending})")
    return groups, problems


def discover(root: str | Path) -> tuple[RawDataset | None, list[str]]:
    """Find every training and test case of a raw dataset; never raises for content problems."""
    root = Path(root)
    if not root.is_dir():
        return None, [f"{root}: no such dataset folder; give a path or a dataset name/id under the workspace's raw/"]
    dj, problems = load_dataset_json(root)
    if dj is None:
        return None, problems
    file_ending = str(dj.get("file_ending", ".nii.gz"))
    n_channels = max(1, len(dj.get("channel_names", dj.get("modality", {"0": "CT"}))))

    if isinstance(dj.get("dataset"), dict):
        training, more = _from_explicit_list(root, dj["dataset"])
        problems += more
    else:
        images_tr, labels_tr = root / "imagesTr", root / "labelsTr"
        if not images_tr.is_dir():
            problems.append(f"{images_tr}: missing; put the training images there as <case>_0000{file_ending}")
            groups = {}
        else:
            groups, more = _scan_images(images_tr, file_ending, n_channels)
            problems += more
        label_files = {}
        if not labels_tr.is_dir():
            problems.append(f"{labels_tr}: missing; put one label map per training case there as <case>{file_ending}")
        else:
            for path in sorted(labels_tr.iterdir()):
                if path.name.startswith("."):
                    continue
                if not path.name.endswith(file_ending):
                    problems.append(f"{path}: does not end in the dataset's file_ending {file_ending!r}; rename or remove it")
                    continue
                label_files[path.name[: -len(file_ending)]] = path
        training = []
        for case_id in sorted(groups):
            label = label_files.get(case_id)
            if label is None:
                problems.append(f"{labels_tr / (case_id + file_ending)}: missing label for training case {case_id}; add it or remove the case's images")
            training.append(Case(case_id, tuple(p for p in groups[case_id] if p is not None), label))
        for case_id in sorted(set(label_files) - set(groups)):
            problems.append(f"{label_files[case_id]}: label without an image ({images_tr / (case_id + '_0000' + file_ending)} missing); add the image or remove the label")

    test = []
    images_ts = root / "imagesTs"
    if images_ts.is_dir():
        groups, more = _scan_images(images_ts, file_ending, n_channels)
        problems += more
        test = [Case(cid, tuple(p for p in slots if p is not None), None) for cid, slots in sorted(groups.items())]

    if not training:
        problems.append(f"{root}: the dataset has no training cases; add images to imagesTr and labels to labelsTr")
    n_declared = dj.get("numTraining")
    if isinstance(n_declared, int) and training and n_declared != len(training):
        problems.append(f"{root / DATASET_JSON}: numTraining is {n_declared} but {len(training)} training cases were found; set it to {len(training)}")
    return RawDataset(root, dj, tuple(training), tuple(test)), problems


def open_dataset(root: str | Path) -> RawDataset:
    """Discover a dataset and raise one DatasetError listing every structural problem."""
    dataset, problems = discover(root)
    if problems or dataset is None:
        raise DatasetError(problems)
    return dataset
