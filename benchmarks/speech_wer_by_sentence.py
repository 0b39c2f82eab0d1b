"""The speech recipe's held-out WER split by sentence: clips whose sentence also occurs in training (spoken by
other voices) and clips whose sentence does not, for the base Whisper tiny.en and an adapter. Shows whether LoRA
learnt the voices' acoustics or only memorised the training sentences. The figures are in docs/vision-speech.md.

    python benchmarks/speech_wer_by_sentence.py --data runs/speech-commands --adapter runs/speech-whisper/adapter

Prints one JSON line per model and its first few transcripts. Decodes as `Transcription.evaluate` does (greedy,
max_length 48, the recipe's), on every held-out clip.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from lorakit.inference import load_for_inference
from lorakit.train.data import read_records
from lorakit.train.tasks.transcription import Transcription, word_error_rates


def transcripts(adapter: str | None, manifest: Path, max_length: int) -> tuple[list[str], list[str], list[dict]]:
    """(normalised hypotheses, normalised references, records) of every clip in `manifest`."""
    loaded = load_for_inference("whisper-tiny", adapter)
    task = Transcription(loaded.tokenizer, max_length=max_length)
    records = read_records(manifest)
    task.check_records(records, str(manifest))
    features = task.encode(records)
    hypotheses: list[str] = []
    with torch.no_grad():
        for start in range(0, len(features), 16):
            batch = task.collate(features[start:start + 16])
            encoded = loaded.model.get_encoder()(batch["input_features"]).last_hidden_state  # type: ignore[operator]
            hypotheses += task.decode(task.greedy(loaded.model, encoded))
    return ([task.normalizer(h) for h in hypotheses], [task.normalizer(f["text"]) for f in features],
            [{**r, "transcript": h} for r, h in zip(records, hypotheses, strict=True)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="runs/speech-commands", help="the directory lorakit speech-data wrote")
    parser.add_argument("--adapter", required=True, help="the adapter trained by recipes/speech-whisper.yaml")
    parser.add_argument("--max-length", type=int, default=48)
    args = parser.parse_args()
    data = Path(args.data)
    train_texts = {r["text"] for r in read_records(data / "train.jsonl")}
    for name, adapter in (("base", None), ("lora", args.adapter)):
        hypotheses, references, records = transcripts(adapter, data / "eval.jsonl", args.max_length)
        seen = [i for i, r in enumerate(records) if r["text"] in train_texts]
        unseen = [i for i in range(len(records)) if i not in seen]
        scores = {"model": name, "all": word_error_rates(hypotheses, references), "clips_seen_sentence": len(seen),
                  "clips_unseen_sentence": len(unseen)}
        for label, rows in (("seen_sentence", seen), ("unseen_sentence", unseen)):
            scores[label] = word_error_rates([hypotheses[i] for i in rows], [references[i] for i in rows])
        print(json.dumps(scores))
        for r in records[:8]:
            print(f"  {r['voice']:<22} {r['text']!r} -> {r['transcript']!r}")


if __name__ == "__main__":
    main()
