"""`run_analysis`: what `lorakit analyze` does, in the order that makes bad input cheap.

Every check that needs no model comes first: both adapters are read and paired, the texts file read, the base named
and the output directory claimed (`lorakit.outputs.claim_output_dir`); only then does the base load and the
analysis run, and the report is written last.
"""

from __future__ import annotations

from pathlib import Path

from lorakit.analysis.analyze import Analysis, analyze_adapter, check_analysable
from lorakit.analysis.factors import read_factors
from lorakit.analysis.probe import read_texts
from lorakit.analysis.report import ANALYSIS_KIND, write_report
from lorakit.outputs import claim_output_dir


def run_analysis(adapter: str | Path, *, against: str | Path | None = None, model: str | None = None,
                 base: bool = True, out_dir: str | Path | None = None, force: bool = False,
                 texts: str | Path | None = None) -> tuple[Analysis, Path | None]:
    """Analyse `adapter` (see `analyze_adapter`) and, when `out_dir` is given, write the report there (see
    `write_report`). texts: a file of texts, one per line (`probe.read_texts`), to orient the token directions on.
    Returns the analysis and report.md's path (None without `out_dir`).

    Raises LorakitError, before any model loads or any file is written, for what `check_analysable` refuses (a
    path that is not an adapter, two adapters of different bases or with no module in common, no base to load,
    texts for an adapter that is not a causal LM's), a texts file that cannot be read, and an output directory that
    may not be written.
    """
    factors = read_factors(adapter)
    other = read_factors(against) if against is not None else None
    lines = read_texts(texts) if texts is not None else None
    check_analysable(factors, other, model=model, base=base, texts=lines)
    if out_dir is not None:
        inputs = [adapter, *([against] if against is not None else []), *([model] if model else [])]
        claim_output_dir(out_dir, kind=ANALYSIS_KIND, force=force, inputs=inputs)
    analysis = analyze_adapter(factors, against=other, model=model, base=base, texts=lines)
    report = write_report(analysis, out_dir, force=force) if out_dir is not None else None
    return analysis, report
