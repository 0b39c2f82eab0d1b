"""A working directory for the page: the tiny classifier and the toy sentiment data copied in, a recipe under
recipes/ that trains on them in a few steps, and the page's settings with a small upload cap."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml
from ui_helpers import UPLOAD_CAP, tiny_recipe


@pytest.fixture
def workdir(tmp_path: Path, tiny_classifier_dir: Path, sentiment_tsv, monkeypatch) -> Path:
    """The page's working directory (also the process's): tiny-bert/, data/, recipes/tiny.yaml."""
    root = tmp_path / "work"
    root.mkdir()
    shutil.copytree(tiny_classifier_dir, root / "tiny-bert")
    (root / "data").mkdir()
    for source in sentiment_tsv:
        shutil.copy(source, root / "data" / source.name)
    (root / "recipes").mkdir()
    (root / "recipes" / "tiny.yaml").write_text(yaml.safe_dump(tiny_recipe()))
    monkeypatch.chdir(root)
    return root


@pytest.fixture
def settings(workdir: Path):
    from lorakit.ui.security import UiSettings

    return UiSettings(root=workdir, runs_dir=Path("runs"), max_upload_bytes=UPLOAD_CAP)
