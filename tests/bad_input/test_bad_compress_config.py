"""Bad `compress` sections through `lorakit train`: each is exit code 2 and one error line naming the keys and the
fix, before any model loads (targets lora and compress both match: once it has loaded, before factorising); no file
of the run changes."""

from __future__ import annotations

import pytest
from conftest import expect_cli_error, write_config

CASES = [
    pytest.param(["--run.method=factors", "--compress.ratio=0.5", "--compress.rank=4"],
                 r"compress\.ratio and compress\.rank are set; set at most one of compress\.ratio, "
                 r"compress\.energy and compress\.rank", id="ratio-and-rank"),
    pytest.param(["--run.method=factors", "--compress.energy=0.9", "--compress.rank=4"],
                 r"compress\.energy and compress\.rank are set", id="energy-and-rank"),
    pytest.param(["--run.method=factors", "--compress.ratio=1.5"],
                 r"flag --compress\.ratio=1\.5: compress\.ratio must be in \(0, 1\] or null, got 1\.5",
                 id="ratio-above-1"),
    pytest.param(["--run.method=factors", "--compress.ratio=0"],
                 r"compress\.ratio must be in \(0, 1\] or null, got 0", id="ratio-zero"),
    pytest.param(["--run.method=lora", "--compress.ratio=0.5"],
                 r"lora\.targets and compress\.targets both match bert\.encoder\.layer\.0\.attention\.self\.query, "
                 r".*: choose disjoint targets, e\.g\. compress\.targets=\[intermediate\.dense, output\.dense\] with "
                 r"lora\.targets=\[query, value\]", id="lora-and-compress-on-the-same-layers"),
    pytest.param(["--run.method=lora", "--compress.ratio=0.5", "--lora.targets=[all-linear]"],
                 r"lora\.targets and compress\.targets both match .*, and \d+ more; LoRA trains on top of the "
                 r"factorised model", id="lora-and-compress-both-all-linear"),
    pytest.param(["--run.method=factors"],
                 r"run\.method=factors trains the factors of a factorised model; set one of compress\.ratio",
                 id="factors-without-compress"),
    pytest.param(["--run.method=factors", "--compress.ratio=0.5", "--compress.method=asvd"],
                 r"compress\.method must be one of svd, activation, got 'asvd'", id="unknown-method"),
    pytest.param(["--run.method=factors", "--compress.rank=4", "--compress.calibration_examples=0"],
                 r"compress\.calibration_examples must be >= 1, got 0", id="no-calibration-examples"),
]


@pytest.mark.parametrize("flags, message", CASES)
def test_bad_compress_config_is_one_error_line(flags: list[str], message: str, tmp_path, tiny_classifier_dir,
                                               sentiment_tsv, capsys) -> None:
    config = write_config(tmp_path / "c.yaml", tiny_classifier_dir, *sentiment_tsv, tmp_path / "run")
    expect_cli_error(["train", str(config), *flags, "--quiet"], capsys, matches=message, watch=[tmp_path])
