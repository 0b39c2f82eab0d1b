"""Bad input to `lorakit allocate`, and bad rank-pattern files given to training (`lora.rank_pattern: PATH`): exit
code 2, one `error:` line naming the problem and the fix, no traceback, and every file there before unchanged."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import expect_cli_error, write_config

# (tmp_path, model dir, train, dev) -> argv
Setup = Callable[[Path, Path, Path, Path], list[str]]


def _config(tmp: Path, model: Path, train: Path, dev: Path, **sections: dict) -> Path:
    return write_config(tmp / "c.yaml", model, train, dev, tmp / "run", **sections)


def allocate(*flags: str) -> Setup:
    """`allocate` on the good config with `flags`; `{tmp}` in a flag is the test's directory."""
    return lambda tmp, model, train, dev: ["allocate", str(_config(tmp, model, train, dev)),
                                           *(f.format(tmp=tmp) for f in flags)]


def with_file(name: str, content: str, then: Setup) -> Setup:
    """`then`, with a file `name` holding `content` written first in the test's directory."""
    def setup(tmp: Path, model: Path, train: Path, dev: Path) -> list[str]:
        (tmp / name).write_text(content)
        return then(tmp, model, train, dev)
    return setup


def train_with_pattern(value: str, *, in_yaml: bool = False) -> Setup:
    """`train` with lora.rank_pattern set to `value` (a path), by a flag or in the config file."""
    def setup(tmp: Path, model: Path, train: Path, dev: Path) -> list[str]:
        if in_yaml:
            return ["train", str(_config(tmp, model, train, dev, lora={"rank_pattern": value})), "--quiet"]
        return ["train", str(_config(tmp, model, train, dev)), f"--lora.rank_pattern={value}", "--quiet"]
    return setup


OUT = "--out={tmp}/pattern.yaml"
CASES = [
    pytest.param(allocate("--budget", "100", OUT),
                 r"a budget of 100 adapter parameters is below rank 1 on every module: the 4 modules that "
                 r"lora\.targets selects need at least 256; raise the budget to 256 or more",
                 id="budget-below-one-rank-each"),
    pytest.param(allocate("--budget", "1000", "--like-rank", "2", OUT),
                 r"argument --like-rank: not allowed with argument --budget", id="budget-and-like-rank"),
    pytest.param(allocate(OUT), r"one of the arguments --budget --like-rank is required", id="no-budget"),
    pytest.param(allocate("--like-rank", "0", OUT), r"the uniform rank to match must be a positive int, got 0",
                 id="like-rank-zero"),
    pytest.param(allocate("--budget", "-5", OUT), r"the budget must be a positive int, got -5", id="budget-negative"),
    pytest.param(allocate("--like-rank", "2", "--probe-batches", "0", OUT),
                 r"the number of probe batches must be a positive int, got 0", id="probe-batches-zero"),
    pytest.param(allocate("--like-rank", "2", "--probe", "weights", OUT),
                 r"argument --probe: invalid choice: 'weights'", id="unknown-probe"),
    pytest.param(allocate("--like-rank", "2"), r"the following arguments are required: --out", id="no-out"),
    pytest.param(allocate("--like-rank", "2", "--lora.rnak=3", OUT), r"flag --lora\.rnak=3: unknown key lora\.rnak",
                 id="bad-override"),
    pytest.param(with_file("pattern.yaml", "q: 1\n", allocate("--like-rank", "2", OUT)),
                 r"pattern\.yaml already exists; pass --force to replace it", id="out-exists"),
    pytest.param(allocate("--like-rank", "2", "--out={tmp}/c.yaml", "--force"),
                 r"output .*c\.yaml is the input .*c\.yaml; a command never writes over what it reads",
                 id="out-is-the-config"),
    pytest.param(allocate("--like-rank", "2", "--out={tmp}"), r"is a directory; give the path of the YAML file",
                 id="out-is-a-directory"),
    pytest.param(train_with_pattern("missing.yaml"),
                 r"flag --lora\.rank_pattern=missing\.yaml: lora\.rank_pattern file 'missing\.yaml' does not exist; "
                 r"give a YAML file mapping module names to ranks", id="pattern-file-missing"),
    pytest.param(train_with_pattern("missing.yaml", in_yaml=True),
                 r"c\.yaml line \d+: lora\.rank_pattern file 'missing\.yaml' does not exist",
                 id="pattern-file-missing-in-config"),
    pytest.param(with_file("p.yaml", "- bert.encoder.layer.0.attention.self.query\n", train_with_pattern("p.yaml",
                                                                                                          in_yaml=True)),
                 r"lora\.rank_pattern file 'p\.yaml' holds a YAML list, not a mapping of module names to ranks",
                 id="pattern-file-a-list"),
    pytest.param(with_file("p.yaml", "# nothing\n", train_with_pattern("p.yaml", in_yaml=True)),
                 r"lora\.rank_pattern file 'p\.yaml' holds nothing, not a mapping", id="pattern-file-empty"),
    pytest.param(with_file("p.yaml", "query: 0\nvalue: two\n", train_with_pattern("p.yaml", in_yaml=True)),
                 r"ranks must be positive ints \(or \{rank: R, alpha: A\}\) keyed by module names; bad entries: "
                 r"'query': 0, 'value': 'two'", id="pattern-file-bad-ranks"),
    pytest.param(with_file("p.yaml", "value: 2\nquery: {rank: 2, alfa: 4}\n", train_with_pattern("p.yaml")),
                 r"lora\.rank_pattern file 'p\.yaml' entry 'query' \(line 2\): unknown key 'alfa' \(did you mean "
                 r"'alpha'\?\); write the entry as a rank or \{rank: R, alpha: A\}", id="pattern-entry-unknown-key"),
    pytest.param(with_file("p.yaml", "query: {rank: 2, alpha: 0}\n", train_with_pattern("p.yaml", in_yaml=True)),
                 r"c\.yaml line \d+: lora\.rank_pattern file 'p\.yaml' entry 'query' \(line 1\): alpha must be a "
                 r"positive number, got 0;", id="pattern-entry-alpha-zero"),
    pytest.param(with_file("p.yaml", "query: {rank: 2, alpha: -1.5}\n", train_with_pattern("p.yaml")),
                 r"entry 'query' \(line 1\): alpha must be a positive number, got -1\.5",
                 id="pattern-entry-alpha-negative"),
    pytest.param(with_file("p.yaml", "query: {rank: 2, alpha: .nan}\n", train_with_pattern("p.yaml")),
                 r"entry 'query' \(line 1\): alpha must be a positive number, got nan", id="pattern-entry-alpha-nan"),
    pytest.param(with_file("p.yaml", "query: {rank: 2, alpha: four}\n", train_with_pattern("p.yaml")),
                 r"entry 'query' \(line 1\): alpha must be a positive number, got 'four'",
                 id="pattern-entry-alpha-text"),
    pytest.param(with_file("p.yaml", "query: {alpha: 4.0}\n", train_with_pattern("p.yaml")),
                 r"entry 'query' \(line 1\): no rank; write the entry as a rank or \{rank: R, alpha: A\}",
                 id="pattern-entry-no-rank"),
    pytest.param(with_file("p.yaml", "query: {rank: 1.5, alpha: 3.0}\n", train_with_pattern("p.yaml")),
                 r"entry 'query' \(line 1\): rank must be a positive int, got 1\.5", id="pattern-entry-rank-float"),
    pytest.param(allocate("--like-rank", "2", "--scaling", "kept", OUT),
                 r"argument --scaling: invalid choice: 'kept'", id="unknown-scaling"),
    pytest.param(with_file("p.yaml", "query: 2\nquery: 3\n", train_with_pattern("p.yaml", in_yaml=True)),
                 r"lora\.rank_pattern file 'p\.yaml' line 2: duplicate module query \(first at line 1\)",
                 id="pattern-file-duplicate"),
    pytest.param(with_file("p.yaml", "query: [2\n", train_with_pattern("p.yaml", in_yaml=True)),
                 r"lora\.rank_pattern file 'p\.yaml' is not UTF-8 YAML", id="pattern-file-not-yaml"),
    pytest.param(train_with_pattern("."), r"lora\.rank_pattern file '\.' is a directory", id="pattern-is-a-directory"),
]


@pytest.mark.parametrize("setup, message", CASES)
def test_bad_allocate_input_is_one_error_line(setup: Setup, message: str, tmp_path, tiny_classifier_dir,
                                              sentiment_tsv, capsys, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)  # relative pattern paths of flags are read from here
    argv = setup(tmp_path, tiny_classifier_dir, *sentiment_tsv)
    expect_cli_error(argv, capsys, matches=message, watch=[tmp_path])
    assert not (tmp_path / "run").exists()
