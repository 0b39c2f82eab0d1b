"""Bad input around quantized bases: an unknown quantization name, a missing bitsandbytes, merging an adapter
trained on a quantized base without naming the merge path (or merging twice into one directory), a merge path for
a dense adapter, and a re-quantized merged model, which no checkpoint written here can carry back. Each is exit
code 2 and one error line naming the problem and the fix; nothing is written."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from conftest import expect_cli_error, write_config

pytest.importorskip("bitsandbytes")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_classifier_dir) -> dict[str, Path]:
    """Two adapters on the tiny classifier, 2 steps each: one on an NF4 base, one on the dense base."""
    from conftest import POSITIVE, NEGATIVE  # noqa: I001
    from lorakit.cli import main

    root = tmp_path_factory.mktemp("quant-runs")
    rows = [(s, 1) for s in POSITIVE] * 2 + [(s, 0) for s in NEGATIVE] * 2
    train = root / "train.tsv"
    train.write_text("sentence\tlabel\n" + "".join(f"{s}\t{y}\n" for s, y in rows))
    out = {}
    for name, flags in (("nf4", ["--model.quantize=nf4"]), ("dense", [])):
        config = write_config(root / f"{name}.yaml", tiny_classifier_dir, train, train, root / name,
                              optim={"max_steps": 2})
        assert main(["train", str(config), *flags, "--quiet"]) == 0
        out[name] = root / name / "adapter"
    return out


def test_unknown_quantization_name(tmp_path: Path, tiny_classifier_dir, sentiment_tsv, capsys) -> None:
    config = write_config(tmp_path / "c.yaml", tiny_classifier_dir, *sentiment_tsv, tmp_path / "run")
    expect_cli_error(["train", str(config), "--model.quantize=nf3", "--quiet"], capsys,
                     matches=r"model\.quantize.*nf3.*nf4, int8", watch=[tmp_path])
    assert not (tmp_path / "run").exists()


def test_quantized_init_without_a_quantized_base(tmp_path: Path, tiny_classifier_dir, sentiment_tsv,
                                                capsys) -> None:
    config = write_config(tmp_path / "c.yaml", tiny_classifier_dir, *sentiment_tsv, tmp_path / "run")
    expect_cli_error(["train", str(config), "--model.quantize_init=qpissa", "--quiet"], capsys,
                     matches=r"model\.quantize_init=qpissa initialises LoRA on a quantized base: set model\.quantize",
                     watch=[tmp_path])


@pytest.mark.parametrize("flag", ["--run.method=full", "--run.parallel=fsdp"], ids=["full", "fsdp"])
def test_quantized_base_with_a_method_that_changes_it(flag: str, tmp_path: Path, tiny_classifier_dir,
                                                      sentiment_tsv, capsys) -> None:
    config = write_config(tmp_path / "c.yaml", tiny_classifier_dir, *sentiment_tsv, tmp_path / "run")
    expect_cli_error(["train", str(config), "--model.quantize=nf4", flag, "--quiet"], capsys,
                     matches=r"model\.quantize=nf4 freezes the base in nf4, which .* use run\.method=lora",
                     watch=[tmp_path])


def test_quantizing_without_bitsandbytes(tmp_path: Path, tiny_classifier_dir, sentiment_tsv, capsys,
                                         monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    config = write_config(tmp_path / "c.yaml", tiny_classifier_dir, *sentiment_tsv, tmp_path / "run")
    expect_cli_error(["train", str(config), "--model.quantize=nf4", "--quiet"], capsys,
                     matches=r"needs bitsandbytes.*pip install 'lorakit\[quant\]'", watch=[tmp_path])


MERGES = [
    pytest.param("nf4", [], r"trained on a nf4 base; name the merge path with --merge-path", id="no-merge-path"),
    pytest.param("nf4", ["--merge-path", "requantized"],
                 r"re-quantized \(nf4\) merged model cannot be saved as a checkpoint", id="requantized-save"),
    pytest.param("dense", ["--merge-path", "dequantized"], r"--merge-path applies to adapters trained on a "
                 r"quantized base", id="merge-path-on-dense"),
]


@pytest.mark.parametrize("which, flags, matches", MERGES)
def test_bad_quantized_merge(which: str, flags: list[str], matches: str, trained, tmp_path: Path, capsys) -> None:
    expect_cli_error(["merge", "--adapter", trained[which], "--out", tmp_path / "m", *flags], capsys,
                     matches=matches, watch=[trained[which]])
    assert not (tmp_path / "m").exists()


def test_merging_twice_into_one_directory(trained, tmp_path: Path, capsys) -> None:
    from lorakit.cli import main

    argv = ["merge", "--adapter", str(trained["nf4"]), "--out", str(tmp_path / "m"), "--merge-path", "dequantized"]
    assert main(argv) == 0
    expect_cli_error(argv, capsys, matches=r"(already|exists|not empty|--force)", watch=[tmp_path])


SVD_FLAGS = [
    pytest.param(["--model.quantize_svd_iters=2"], r"model\.quantize_svd_iters sets the SVD of quantize_init qpissa "
                 r"or loftq, and model\.quantize_init is qlora", id="svd-iters-with-plain-qlora"),
    pytest.param(["--model.quantize_init=qpissa", "--model.quantize_svd_iters=-1"], r"model\.quantize_svd_iters",
                 id="negative-svd-iters"),
    pytest.param(["--model.quantize_init=qpissa", "--lora.svd_iters=2"], r"svd_iters applies only to "
                 r"init='principal'", id="lora-svd-iters-for-qpissa"),
]


@pytest.mark.parametrize("flags, matches", SVD_FLAGS)
def test_bad_svd_settings_of_a_quantized_init(flags: list[str], matches: str, tmp_path: Path, tiny_classifier_dir,
                                              sentiment_tsv, capsys) -> None:
    config = write_config(tmp_path / "c.yaml", tiny_classifier_dir, *sentiment_tsv, tmp_path / "run")
    expect_cli_error(["train", str(config), "--model.quantize=nf4", *flags, "--quiet"], capsys, matches=matches,
                     watch=[tmp_path])
    assert not (tmp_path / "run").exists()
