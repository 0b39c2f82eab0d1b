"""What a trained adapter's update ΔW learned: `lorakit analyze`.

    from lorakit.analysis import analyze_adapter, write_report
    analysis = analyze_adapter("runs/r8/adapter", against="runs/r64/adapter")
    write_report(analysis, "runs/r8/analysis")      # analysis.json, PNG figures, report.md

The modules, each small and read top to bottom:

    factors        an adapter's ΔW per module as thin factors (principal adapters measured from their init)
    spectrum       the exact SVD of ΔW from its factors; stable rank, effective rank, energy
    subspace       φ, the subspace similarity of Hu et al. 2021 §7.2, and its random-subspace expectation
    amplification  ΔW against W, §7.3: ‖UᵀWV‖_F and the amplification factor
    tokens         the tokens ΔW's output directions raise and lower, through a causal LM's unembedding
    probe          the inputs readout modules see on texts, which orient those directions (promoted vs suppressed)
    base           loading the base model an adapter records, and its W per module
    analyze        `analyze_adapter` and the `Analysis` it returns
    plots, report  figures (matplotlib, Agg canvas) and `write_report`
    run            `run_analysis`, what `lorakit analyze` calls: the cheap checks first, then the work
"""

from lorakit.analysis.analyze import Analysis, ModuleAnalysis, ModuleSimilarity, analyze_adapter
from lorakit.analysis.factors import AdapterFactors, check_comparable, read_factors
from lorakit.analysis.report import ANALYSIS_KIND, write_report
from lorakit.analysis.run import run_analysis

__all__ = ["ANALYSIS_KIND", "AdapterFactors", "Analysis", "ModuleAnalysis", "ModuleSimilarity", "analyze_adapter",
           "check_comparable", "read_factors", "run_analysis", "write_report"]
