"""The workspace: one root folder holding raw/, preprocessed/<dataset>/ and results/<dataset>/.

A dataset is named by its folder path, or by its name (``Dataset003_Liver``) or numeric id
(``3``) under ``raw/``. Its artefacts go under the workspace either way.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from autoliver.errors import DatasetError

DATASET_NAME_RE = re.compile(r"^Dataset(?P<id>\d{3})_(?P<name>[A-Za-z0-9_\-]+)$")


@dataclass(frozen=True)
class Workspace:
    root: Path

    @property
    def raw(self) -> Path:
        return self.root / "raw"

    def preprocessed(self, dataset_name: str) -> Path:
        return self.root / "preprocessed" / dataset_name

    def results(self, dataset_name: str) -> Path:
        return self.root / "results" / dataset_name


def resolve_dataset(spec: str | Path, workspace: Workspace) -> Path:
    """Turn a path, a dataset name or a numeric id into the raw dataset's folder."""
    spec_str = str(spec)
    path = Path(spec_str).expanduser()
    if path.is_dir():
        return path.resolve()
    candidates = workspace.raw / spec_str
    if candidates.is_dir():
        return candidates.resolve()
    if spec_str.isdigit():
        wanted = int(spec_str)
        matches = []
        if workspace.raw.is_dir():
            for child in sorted(workspace.raw.iterdir()):
                m = DATASET_NAME_RE.match(child.name)
                if child.is_dir() and m and int(m["id"]) == wanted:
                    matches.append(child)
        if len(matches) == 1:
            return matches[0].resolve()
        if len(matches) > 1:
            raise DatasetError(f"dataset id {spec_str} is ambiguous under {workspace.raw}: {', '.join(m.name for m in matches)}; use the full name")
    raise DatasetError(
        f"dataset {spec_str!r}: not a folder and not found under {workspace.raw}; give the dataset "
        "folder's path, or put it in the workspace's raw/ (see --workspace) and use its name or id"
    )
