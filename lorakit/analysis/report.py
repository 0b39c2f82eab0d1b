"""`write_report`: an analysis as a directory: analysis.json (every number), PNG figures and report.md, one page
that links them.

Everything is rendered in memory first; then the directory is claimed (`lorakit.outputs.claim_output_dir`, kind
`analysis`) and each file written atomically, so an error leaves nothing half written.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from lorakit.analysis.analyze import Analysis, ModuleAnalysis
from lorakit.analysis.plots import PLOTS
from lorakit.fileio import atomic_write_bytes
from lorakit.outputs import claim_output_dir

ANALYSIS_KIND = "analysis"
JSON_NAME, REPORT_NAME = "analysis.json", "report.md"


def write_report(analysis: Analysis, out_dir: str | Path, *, force: bool = False) -> Path:
    """Write analysis.json, the figures and report.md to `out_dir` and return report.md's path.

    `out_dir` must be new or empty, or an earlier analysis that `force` replaces (its figures this analysis does not
    draw are removed); it may not be, contain or lie inside an analysed adapter. Raises LorakitError (nothing
    written) otherwise.
    """
    images = {name: png for name, draw in PLOTS.items() if (png := draw(analysis)) is not None}
    numbers = json.dumps(analysis.as_json(), indent=1, allow_nan=False, ensure_ascii=False) + "\n"
    markdown = render_markdown(analysis, list(images))
    out = Path(out_dir)
    inputs = [analysis.adapter] + ([analysis.against] if analysis.against else [])
    claim_output_dir(out, kind=ANALYSIS_KIND, force=force, inputs=inputs)
    for name in PLOTS:
        if name not in images:
            (out / name).unlink(missing_ok=True)  # an earlier analysis's figure that this one has no numbers for
    for name, data in images.items():
        atomic_write_bytes(out / name, data, what="figure")
    atomic_write_bytes(out / JSON_NAME, numbers.encode(), what="analysis")
    atomic_write_bytes(out / REPORT_NAME, markdown.encode(), what="report")
    return out / REPORT_NAME


def render_markdown(analysis: Analysis, images: list[str]) -> str:
    """report.md: the headline numbers per module kind, the figures in `images`, the tokens and the notes."""
    lora = analysis.lora
    lines = [f"# What `{analysis.adapter}` learned", "",
             f"Base `{analysis.base}`; rank {lora['rank']}, alpha {lora['alpha']:g}"
             f"{' (rsLoRA)' if lora['rslora'] else ''}, init {lora['init']}; {len(analysis.modules)} linear modules "
             f"analysed, {len(analysis.skipped)} skipped. Every number is in [{JSON_NAME}]({JSON_NAME}).", "",
             "## Spectrum of ΔW", "",
             "Stable rank ‖ΔW‖_F²/‖ΔW‖_2² and effective rank exp(H(σ/Σσ)) (Roy & Vetterli 2007) say how many "
             "directions ΔW really uses; energy at k is the share of ‖ΔW‖_F² its top k directions hold.", "",
             "| module kind | modules | stable rank | effective rank | energy at 1 | energy at r/2 |"
             " amplification (median) |", "|---|---|---|---|---|---|---|"]
    for kind, group in _by_kind(analysis.modules).items():
        factors = [m.amplification.factor for m in group if m.amplification and m.amplification.factor]
        half = [m.energy[max(0, len(m.energy) // 2 - 1)] for m in group if m.energy]
        lines.append(f"| `{kind}` | {len(group)} | {_mean(m.stable_rank for m in group):.2f} | "
                     f"{_mean(m.effective_rank for m in group):.2f} | {_mean(m.energy[0] for m in group):.2f} | "
                     f"{_mean(half):.2f} | {f'{statistics.median(factors):.1f}' if factors else '-'} |")
    lines += [""] + [f"![{n}]({n})" for n in ("spectra.png", "ranks.png") if n in images]
    lines += _amplification_section(analysis, images) + _similarity_section(analysis, images)
    lines += _token_section(analysis)
    if analysis.notes:
        lines += ["", "## Notes", ""] + [f"- {note}" for note in analysis.notes]
    return "\n".join(lines) + "\n"


def _amplification_section(analysis: Analysis, images: list[str]) -> list[str]:
    rows = [m for m in analysis.modules if m.amplification is not None]
    if not rows:
        return []
    lines = ["", "## ΔW against W (Hu et al. 2021, §7.3)", "",
             "‖UᵀWV‖_F projects W onto r directions: ΔW's own top singular vectors, W's, or random ones (the root "
             "mean square over random directions). The amplification factor ‖ΔW‖_F / ‖UᵀWV‖_F (ΔW's directions) "
             "is large when ΔW amplifies directions W has but does not emphasise.", "",
             "| module kind | ‖ΔW‖_F | ‖UᵀWV‖_F, ΔW's U V | W's U V | random | ‖W‖_F | amplification |",
             "|---|---|---|---|---|---|---|"]
    for kind, group in _by_kind(rows).items():
        a = [m.amplification for m in group if m.amplification is not None]
        factors = [x.factor for x in a if x.factor]
        lines.append(f"| `{kind}` | {_mean(x.delta_norm for x in a):.3g} | {_mean(x.delta_directions for x in a):.3g}"
                     f" | {_mean(x.weight_directions for x in a):.3g} | {_mean(x.random_directions for x in a):.3g} | "
                     f"{_mean(x.weight_norm for x in a):.3g} | "
                     f"{f'{statistics.median(factors):.1f}' if factors else '-'} |")
    lines.append("")
    lines += ["Means over layers; the amplification factor is the median."]
    return lines + (["", "![amplification.png](amplification.png)"] if "amplification.png" in images else [])


def _similarity_section(analysis: Analysis, images: list[str]) -> list[str]:
    if analysis.against is None:
        return []
    lines = ["", f"## Subspace similarity with `{analysis.against}` (§7.2)", "",
             "φ(i, j) = ‖U₁ᵢᵀU₂ⱼ‖_F² / min(i, j) between the top-i and top-j right-singular vectors of the two A "
             "factors (the paper's choice), and between the top output directions U of the two ΔW: 1 when one "
             "subspace contains the other, max(i, j)/d on average for random subspaces of R^d. A starts random and "
             "B at zero, so after a short run (or with LoRA+, where B learns faster) A stays close to its random draw "
             "and what was learned shows in U. The grids on ΔW's input directions V are in the JSON.", "",
             "| module kind | modules | ranks | φ_A(1, 1) | φ_A(k, k) | φ_U(1, 1) | φ_U(k, k) | random φ(1, 1) A / U | "
             "random φ(k, k) A / U |",
             "|---|---|---|---|---|---|---|---|---|"]
    kinds: dict[str, list] = {}
    for s in analysis.similarity:
        kinds.setdefault(s.kind, []).append(s)
    for kind, group in sorted(kinds.items()):
        k = min(min(len(s.phi_a), len(s.phi_a[0])) for s in group)
        d_in, d_out = group[0].dims
        lines.append(f"| `{kind}` | {len(group)} | {group[0].ranks[0]} vs {group[0].ranks[1]} | "
                     f"{_mean(s.phi_a[0][0] for s in group):.3f} | {_mean(s.phi_a[k - 1][k - 1] for s in group):.3f} "
                     f"| {_mean(s.phi_output[0][0] for s in group):.3f} | "
                     f"{_mean(s.phi_output[k - 1][k - 1] for s in group):.3f} | {1 / d_in:.4f} / {1 / d_out:.4f} | "
                     f"{k / d_in:.3f} / {k / d_out:.3f} |")
    lines += ["", "k is the smaller rank of the two adapters."]
    return lines + [""] + [f"![{n}]({n})" for n in ("similarity.png", "similarity_grid.png") if n in images]


def _token_section(analysis: Analysis) -> list[str]:
    if not analysis.tokens:
        return []
    probe = analysis.probe
    lines = ["", "## What the update writes: the tokens it promotes and suppresses", "",
             "ΔW's output in the last layers' residual-stream writers, read through the final norm's scale and the "
             "unembedding (the logit lens: it leaves out the norm's division by the residual's RMS, which scales "
             "every score of a position alike, and what later blocks do with the output)."]
    if probe is not None:
        lines += ["", f"Measured on {probe.texts} texts ({probe.tokens} tokens) run through the adapted model. "
                  "Each module's mean contribution ΔW x̄ (x̄ its mean input over the tokens) raises and lowers these "
                  "tokens on average, in logits before the RMS division:", "",
                  "| module | ‖ΔW x̄‖ | raised most | lowered most |", "|---|---|---|---|"]
        lines += [f"| `{e.module}` | {e.norm:.3g} | {_tokens(e.raised)} | {_tokens(e.lowered)} |"
                  for e in probe.effects]
        lines += ["", "Its top directions u_k, each oriented by the sign of the mean v_kᵀx on the texts: the update "
                  "promotes the + end and suppresses the − end there. mean v_kᵀx (oriented, so positive) says how far "
                  "the texts drive a direction on average, mean |v_kᵀx| how strongly they drive it either way; "
                  "σ_k · mean v_kᵀx is its share of ‖ΔW x̄‖ along u_k.", "",
                  "| module | k | σ_k | mean v_kᵀx | mean abs(v_kᵀx) | + end (promoted) | − end (suppressed) |",
                  "|---|---|---|---|---|---|---|"]
        lines += [f"| `{t.module}` | {t.index} | {t.sigma:.3g} | {_number(t.mean_projection)} | "
                  f"{_number(t.mean_abs_projection)} | {_tokens(t.plus)} | {_tokens(t.minus)} |"
                  for t in analysis.tokens]
        return lines
    lines += ["", "The top output directions u_k. A singular direction has no sign of its own: inputs with "
              "v_kᵀx > 0 raise the + tokens and lower the − tokens, inputs with v_kᵀx < 0 the reverse; each "
              "direction is oriented by convention so that its strongest token is at the + end. Which end the "
              "update promotes on real inputs needs texts (`--texts FILE`).", "",
              "| module | k | σ_k | + end | − end |", "|---|---|---|---|---|"]
    for t in analysis.tokens:
        lines.append(f"| `{t.module}` | {t.index} | {t.sigma:.3g} | {_tokens(t.plus)} | {_tokens(t.minus)} |")
    return lines


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}"


def _tokens(tokens: list[str]) -> str:
    return " ".join("`" + t.replace("`", "'").replace("|", "\\|").replace("\n", "\\n") + "`" for t in tokens)


def _by_kind(modules: list[ModuleAnalysis]) -> dict[str, list[ModuleAnalysis]]:
    out: dict[str, list[ModuleAnalysis]] = {}
    for m in modules:
        out.setdefault(m.kind, []).append(m)
    return dict(sorted(out.items()))


def _mean(values: object) -> float:
    items = list(values)  # type: ignore[call-overload]
    return sum(items) / len(items) if items else float("nan")
