"""`analyze_adapter`: every number the analysis reports for one adapter (and, with `against`, for a pair).

    analysis = analyze_adapter("runs/sst2/adapter")                       # spectra, §7.3, tokens
    analysis = analyze_adapter("runs/r8/adapter", against="runs/r64/adapter")   # + §7.2 subspace similarity
    analysis = analyze_adapter("runs/mt/adapter", texts=prompts)          # tokens promoted/suppressed on prompts
    analysis.summary(); analysis.as_json()

Per module: the singular values of ΔW (from its factors, `lowrank.factor_svd`), stable and effective rank and
energy at each rank; with the base loaded, ΔW against W (`amplification`, Hu et al. 2021 §7.3) and, for a causal LM,
the tokens ΔW's output directions promote (`tokens`), oriented and averaged on `texts` when given (`probe`). With a
second adapter, φ between the two (§7.2, `subspace`)
on the modules both adapt.
"""

from __future__ import annotations

import dataclasses
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorakit.analysis.amplification import Amplification, amplifications
from lorakit.analysis.base import Base, base_name, base_weights, head_for, load_base
from lorakit.analysis.factors import AdapterFactors, check_comparable, module_kind_and_layer, read_factors
from lorakit.analysis.probe import MAX_TEXTS, MAX_TOKENS, InputProbe, probe_inputs
from lorakit.analysis.spectrum import effective_rank, energy, stable_rank
from lorakit.analysis.subspace import phi_grid, right_singular_vectors
from lorakit.analysis.tokens import (
    RESIDUAL_WRITERS,
    TokenDirection,
    TokenProbe,
    lm_readout,
    net_effects,
    readout_modules,
    token_directions,
)
from lorakit.errors import LorakitError
from lorakit.init import principal_factors
from lorakit.io import load_adapter
from lorakit.lowrank import FactorSVD, factor_svd


@dataclass
class ModuleAnalysis:
    """One module's ΔW: its spectrum and summary numbers, and §7.3's numbers when the base was loaded."""

    name: str
    kind: str  # the path after the layer index, e.g. `self_attn.q_proj`
    layer: int | None
    shape: tuple[int, int]  # (out, in)
    rank: int  # the factors' rank (2r for a principal adapter, measured from its initial factors)
    scaling: float
    singular_values: list[float]
    stable_rank: float
    effective_rank: float
    energy: list[float]  # energy[k-1]: share of ‖ΔW‖_F² in the top k directions
    amplification: Amplification | None = None


@dataclass
class ModuleSimilarity:
    """§7.2's φ(i, j) grids for one module both adapters adapt: rows i of this adapter, columns j of the other.
    The random-subspace expectation is max(i, j) / d (d = `dims` of the space: in for A and V, out for U)."""

    name: str
    kind: str
    layer: int | None
    ranks: tuple[int, int]
    dims: tuple[int, int]  # (in, out)
    phi_a: list[list[float]]  # right-singular vectors of the A factors, as in the paper
    phi_input: list[list[float]]  # ΔW's right-singular vectors V
    phi_output: list[list[float]]  # ΔW's left-singular vectors U


@dataclass
class Analysis:
    """Everything `write_report` writes; `as_json()` is analysis.json."""

    adapter: str
    base: str | None
    lora: dict[str, Any]
    modules: list[ModuleAnalysis]
    skipped: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    against: str | None = None
    similarity: list[ModuleSimilarity] = field(default_factory=list)
    tokens: list[TokenDirection] | None = None
    probe: TokenProbe | None = None  # the texts that oriented `tokens`, and each readout's mean effect on them

    def summary(self) -> dict[str, Any]:
        """The headline numbers: means over modules (medians for the amplification factor, which is skewed)."""
        factors = [m.amplification.factor for m in self.modules if m.amplification and m.amplification.factor]
        out: dict[str, Any] = {
            "adapter": self.adapter, "base": self.base, "modules": len(self.modules), "skipped": len(self.skipped),
            "mean_stable_rank": _mean([m.stable_rank for m in self.modules]),
            "mean_effective_rank": _mean([m.effective_rank for m in self.modules]),
            "mean_energy_top1": _mean([m.energy[0] for m in self.modules if m.energy]),
            "median_amplification": statistics.median(factors) if factors else None,
        }
        if self.probe is not None:
            out |= {"texts": self.probe.texts, "text_tokens": self.probe.tokens}
        if self.against is not None:
            out |= {"against": self.against, "compared_modules": len(self.similarity),
                    "mean_phi_a_top1": _mean([s.phi_a[0][0] for s in self.similarity]),
                    "mean_phi_a_full": _mean([_phi_full(s.phi_a) for s in self.similarity]),
                    # E φ(i, j) = max(i, j) / d for random subspaces of R^d (`subspace`): 1/d and k/d here
                    "random_phi_a_top1": _mean([1 / s.dims[0] for s in self.similarity]),
                    "random_phi_a_full": _mean([min(len(s.phi_a), len(s.phi_a[0])) / s.dims[0]
                                                for s in self.similarity]),
                    # the same on ΔW's output directions U, where a short run's learning shows (plots._PHI_FIELDS)
                    "mean_phi_u_top1": _mean([s.phi_output[0][0] for s in self.similarity]),
                    "mean_phi_u_full": _mean([_phi_full(s.phi_output) for s in self.similarity]),
                    "random_phi_u_top1": _mean([1 / s.dims[1] for s in self.similarity]),
                    "random_phi_u_full": _mean([min(len(s.phi_output), len(s.phi_output[0])) / s.dims[1]
                                                for s in self.similarity])}
        return out

    def as_json(self) -> dict[str, Any]:
        """Every number, floats to 6 significant digits (the JSON stays small with hundreds of modules)."""
        return _rounded({"summary": self.summary(), **dataclasses.asdict(self)})


def analyze_adapter(adapter: str | Path | AdapterFactors, *, against: str | Path | AdapterFactors | None = None,
                    model: str | None = None, base: bool = True, token_layers: int = 2,
                    texts: list[str] | None = None) -> Analysis:
    """Analyse the update ΔW of every linear module of `adapter` (a directory, or factors already read).

    against: a second adapter on the same base: adds φ between the two (§7.2) on the modules both adapt.
    model: the base model (default: the one the adapter records); base=False skips loading it (and so §7.3 and
        the token projection). token_layers: how many of the last layers the token projection reads.
    texts: inputs to run through the adapted model (the first `probe.MAX_TEXTS`): each token direction is then
        oriented so that its + end is what the update promotes on them, and each readout module's mean effect
        ΔW x̄ is read as tokens (`tokens.net_effects`). Needs a causal LM; without texts a sign convention orients.
    Raises LorakitError for a path that is not an adapter, two adapters of different bases or with no module in
    common, a base the adapter does not fit, and texts that cannot be used (see `check_analysable`).
    """
    factors = adapter if isinstance(adapter, AdapterFactors) else read_factors(adapter)
    other = against if against is None or isinstance(against, AdapterFactors) else read_factors(against)
    texts = [t for t in texts if t.strip()] if texts is not None else None
    common = check_analysable(factors, other, model=model, base=base, texts=texts)
    notes = [f"skipped {name}: {why}" for name, why in factors.skipped.items()]
    loaded = load_base(factors, model) if base else None
    weights = base_weights(loaded, factors) if loaded is not None else None
    for f in (factors, *([other] if other is not None else [])):
        if f.principal_missing:
            notes.append(_fill_principal(f, weights))
    if factors.config.init == "principal":
        notes.append("principal (PiSSA) adapter: ΔW = s·(B A - B₀ A₀), its update relative to the original W, of "
                     "rank up to 2r")
    svds = {name: factor_svd(*m.update()) for name, m in factors.modules.items()}
    amps = amplifications({n: (weights[n], svds[n]) for n in svds}) if weights is not None else {}
    modules = [_module(factors, name, svd, amps.get(name)) for name, svd in svds.items()]
    zero = [m.name for m in modules if not m.singular_values or m.singular_values[0] == 0]
    if zero:
        notes.append(f"{len(zero)} module(s) have ΔW = 0 (B is zero: an untrained adapter?), e.g. {zero[0]}")
    inputs, probe = _probe(loaded, factors, svds, token_layers, texts, notes) if loaded and texts else (None, None)
    tokens = _tokens(loaded, svds, token_layers, notes, inputs)
    analysis = Analysis(str(factors.path), loaded.name if loaded else factors.base, _lora(factors), modules,
                        dict(factors.skipped), notes, tokens=tokens, probe=probe)
    if other is not None:
        analysis.against = str(other.path)
        analysis.similarity = [_similarity(factors, other, name, svds[name]) for name in common]
    return analysis


def check_analysable(factors: AdapterFactors, other: AdapterFactors | None, *, model: str | None, base: bool,
                     texts: list[str] | None = None) -> list[str]:
    """Every check that needs no model: the pair (see `check_comparable`; returns the modules in common), a base
    to load when `base`, the base's W for a principal adapter saved without its initial factors, and for `texts`:
    at least one, a base to run them through, an adapter of a causal LM (as far as it records its task) that
    adapts a module writing into the residual stream."""
    common = check_comparable(factors, other) if other is not None else []
    if base:
        base_name(factors, model)
    if texts is not None:
        _check_texts(factors, texts, base=base)
    for f in (factors, *([other] if other is not None else [])):
        if f.principal_missing and not base:
            raise LorakitError(f"principal adapter {str(f.path)!r} has no principal_init.safetensors; its update "
                               "relative to W needs the base's W to recompute the initial factors: drop --no-base")
    return common


def _check_texts(factors: AdapterFactors, texts: list[str], *, base: bool) -> None:
    path = str(factors.path)
    if not any(t.strip() for t in texts):
        raise LorakitError("no texts to run through the model (none given, or only blank ones); give at least one")
    if not base:
        raise LorakitError("texts run through the base model with the adapter applied: drop --no-base (or the texts)")
    head = head_for(factors)
    if head not in ("causal-lm", "auto"):
        raise LorakitError(f"adapter {path!r} was trained with a {head} head; texts orient the token projection of "
                           "a causal LM's update: drop the texts for this adapter")
    if not readout_modules(list(factors.modules), 1):
        raise LorakitError(f"adapter {path!r} adapts no module that writes into the residual stream "
                           f"({', '.join(RESIDUAL_WRITERS[:3])}, ...), so its update has no token projection for the "
                           "texts to orient: drop the texts")


def _probe(loaded: Base, factors: AdapterFactors, svds: dict[str, FactorSVD], layers: int, texts: list[str],
           notes: list[str]) -> tuple[InputProbe, TokenProbe]:
    """Apply the adapter to the loaded base and gather the readout modules' inputs on `texts` (`probe`)."""
    if lm_readout(loaded.model) is None:
        raise LorakitError(f"{loaded.name!r} loads as {type(loaded.model).__name__}, not a causal LM; texts orient "
                           "the token projection of a causal LM's update: drop the texts")
    if len(texts) > MAX_TEXTS:
        notes.append(f"the first {MAX_TEXTS} of {len(texts)} texts were used")
    load_adapter(loaded.model, factors.path)  # after everything that reads W: a principal adapter rewrites it
    names = readout_modules(list(svds), layers)
    inputs = probe_inputs(loaded.model, loaded.tokenizer, texts[:MAX_TEXTS], {n: svds[n].v for n in names})
    if inputs.truncated:
        notes.append(f"{inputs.truncated} text(s) were cut to their first {MAX_TOKENS} tokens")
    probe = TokenProbe(inputs.texts, inputs.tokens, inputs.truncated,
                       net_effects(loaded.model, loaded.tokenizer, svds, inputs))
    return inputs, probe


def _fill_principal(factors: AdapterFactors, weights: dict[str, Any] | None) -> str:
    """A principal adapter saved without its initial factors: recompute them from W, as loading does."""
    assert weights is not None, "check_analysable requires the base for a principal adapter without its init"
    config = factors.config
    for name, module in factors.modules.items():
        w = weights.get(name)
        if w is None:  # a module of the `against` adapter that the analysed one does not adapt: never compared
            continue
        module.a0, module.b0 = principal_factors(w, module.rank, module.scaling, svd_iters=config.svd_iters)
    return (f"{factors.path}: no principal_init.safetensors; the initial factors were recomputed from W by SVD"
            + (" (randomized: close to, not equal to, the trained ones)" if config.svd_iters is not None else ""))


def _module(factors: AdapterFactors, name: str, svd: FactorSVD, amp: Amplification | None) -> ModuleAnalysis:
    kind, layer = module_kind_and_layer(name)
    m = factors.modules[name]
    s = svd.s
    return ModuleAnalysis(name, kind, layer, m.shape, int(s.numel()), m.scaling, s.tolist(), stable_rank(s),
                          effective_rank(s), energy(s), amp)


def _tokens(loaded: Base | None, svds: dict[str, FactorSVD], layers: int, notes: list[str],
            inputs: InputProbe | None) -> list[TokenDirection] | None:
    if loaded is None:
        notes.append("no base model loaded: ΔW against W (§7.3) and the token projection were skipped")
        return None
    tokens = token_directions(loaded.model, loaded.tokenizer, svds, layers=layers, inputs=inputs)
    if tokens is None:
        notes.append(f"{type(loaded.model).__name__} is not a causal LM: the token projection was skipped")
    elif not tokens:
        notes.append("no adapted module writes into the residual stream (o_proj, down_proj, c_proj, ...): the "
                     "token projection was skipped")
    return tokens


def _similarity(first: AdapterFactors, second: AdapterFactors, name: str, svd: FactorSVD) -> ModuleSimilarity:
    a, b = first.modules[name], second.modules[name]
    other = factor_svd(*b.update())
    kind, layer = module_kind_and_layer(name)
    return ModuleSimilarity(
        name, kind, layer, (a.rank, b.rank), (a.shape[1], a.shape[0]),
        phi_grid(right_singular_vectors(a.a), right_singular_vectors(b.a)).tolist(),
        phi_grid(svd.v, other.v).tolist(), phi_grid(svd.u, other.u).tolist())


def _lora(factors: AdapterFactors) -> dict[str, Any]:
    c = factors.config
    return {"rank": c.rank, "alpha": c.alpha, "rslora": c.rslora, "init": c.init,
            "ranks": sorted({m.rank for m in factors.modules.values()})}


def _phi_full(grid: list[list[float]]) -> float:
    """φ(k, k) at k = the smaller rank: the overlap of the two top-k subspaces (random: k / d)."""
    k = min(len(grid), len(grid[0]))
    return grid[k - 1][k - 1]


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _rounded(value: Any) -> Any:
    if isinstance(value, float):
        return float(f"{value:.6g}")
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_rounded(v) for v in value]
    return value
