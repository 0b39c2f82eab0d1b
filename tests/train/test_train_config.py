"""Every recipe in recipes/ loads as a valid training config."""

from __future__ import annotations

import pytest
from conftest import REPO_ROOT

from lorakit.train.config import load_train_config

RECIPES = sorted((REPO_ROOT / "recipes").rglob("*.yaml"))


def test_recipe_count():
    assert len(RECIPES) == 7, [p.name for p in RECIPES]


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_recipe_loads(path):
    config = load_train_config(path)
    assert config.data.train and config.run.out_dir.startswith("runs/")
