"""`lorakit factorize` as one library function: load a model, factorise it, write the result.

    report = factorize_model("minilm", "runs/minilm-f", ratio=0.5)                   # a factorised model directory
    report = factorize_model("smollm2", "runs/s-f", ratio=0.7, method="activation",
                             calibration_texts="texts.txt", targets=["llama"], dense=True)  # a dense checkpoint
"""

from __future__ import annotations

import shutil
from pathlib import Path

from lorakit.compress.factorize import FactorizeReport, check_factorize_args, factorize
from lorakit.compress.saved import DENSE_KIND, KIND, export_dense, save_factorized
from lorakit.errors import LorakitError
from lorakit.outputs import claim_output_dir

MAX_CALIBRATION_TOKENS = 512  # per text


def factorize_model(model: str, out_dir: str | Path, *, targets: list[str] | None = None, rank: int | None = None,
                    energy: float | None = None, ratio: float | None = None, method: str = "svd",
                    calibration_texts: str | Path | None = None, rank_multiple: int = 1, dense: bool = False,
                    force: bool = False, command: str | None = None) -> FactorizeReport:
    """Load `model` (a name `load_model` knows, or a directory), factorise its `targets` (default all-linear) and
    write a factorised model directory to `out_dir` (`load_model` reads it back), or with `dense` a plain
    transformers checkpoint with U·Vᵀ multiplied out. The activation-aware method calibrates on
    `calibration_texts` (UTF-8, one text per line, each its own batch, at most 512 tokens).

    Raises LorakitError before anything loads for bad sizes, a missing method/calibration pairing or an unreadable
    texts file, and after loading for a rank or targets the model does not fit; in that case a directory this call
    created is removed again, so nothing is left behind."""
    from lorakit.analysis.probe import read_texts
    from lorakit.models import load_model

    check_factorize_args(rank, energy, ratio, method, rank_multiple)
    if method == "activation" and calibration_texts is None:
        raise LorakitError("--method activation needs --calibration-texts FILE (UTF-8 texts, one per line)")
    texts = read_texts(calibration_texts) if calibration_texts is not None else []
    inputs: list[str | Path] = [model, *([calibration_texts] if calibration_texts is not None else [])]
    out = Path(out_dir).expanduser()
    existed = out.exists()
    claim_output_dir(out, kind=DENSE_KIND if dense else KIND, force=force, inputs=inputs)
    try:
        loaded, tokenizer = load_model(model)
        calibration = [dict(tokenizer(t, return_tensors="pt", truncation=True, max_length=MAX_CALIBRATION_TOKENS))
                       for t in texts]
        report = factorize(loaded, targets or ["all-linear"], rank=rank, energy=energy, ratio=ratio, method=method,
                           calibration=calibration or None, rank_multiple=rank_multiple)
        if dense:
            export_dense(loaded, out, tokenizer=tokenizer, force=force)
        else:
            save_factorized(loaded, tokenizer, out, report, force=force, inputs=inputs, command=command)
    except BaseException:
        if not existed:  # only a directory this call created
            shutil.rmtree(out, ignore_errors=True)
        raise
    return report
