"""lorakit.compress.command.factorize_model: the factorize command as a library function."""

from __future__ import annotations

import pytest

from lorakit import LorakitError
from lorakit.compress import factorize_model
from lorakit.factorized import LowRankLinear
from lorakit.models import load_model


def test_factorize_model_writes_a_directory_load_model_reads_back(tmp_path, tiny_classifier_dir):
    report = factorize_model(str(tiny_classifier_dir), tmp_path / "f", rank=2)
    model, _ = load_model(str(tmp_path / "f"))
    assert report.factorized and all(isinstance(dict(model.named_modules())[n], LowRankLinear)
                                     for n in report.factorized)


def test_a_refusal_after_loading_removes_only_a_directory_it_created(tmp_path, tiny_classifier_dir):
    with pytest.raises(LorakitError):
        factorize_model(str(tiny_classifier_dir), tmp_path / "new", rank=10_000)
    assert not (tmp_path / "new").exists()
    (tmp_path / "mine").mkdir()
    with pytest.raises(LorakitError):
        factorize_model(str(tiny_classifier_dir), tmp_path / "mine", rank=10_000)
    assert (tmp_path / "mine").is_dir()  # it was there before: left in place
