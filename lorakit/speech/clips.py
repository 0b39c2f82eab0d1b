"""A spoken-command data set synthesised with espeak-ng: deterministic from a seed, held out by voice.

    manifests = generate_speech_commands("data/speech-commands", train=240, eval=80, seed=0)
    manifests["train"], manifests["eval"]          # JSON Lines: audio, text, voice, speed, pitch, noise_snr_db

Each clip is one smart-home command ("Set a timer for twenty five minutes.", "Turn off the garage heater.") built
from the templates below, spoken by one espeak-ng voice: an English accent (`en-us`, `en-gb-scotland`, ...) with a
voice variant (`+m3`, `+f2`, ...), at a speaking rate (words per minute) and a pitch (0-99) drawn per clip.
The held-out split uses voices never heard in training: its accents and its variants are both disjoint from the
training ones (`TRAIN_ACCENTS` / `EVAL_ACCENTS`, `TRAIN_VARIANTS` / `EVAL_VARIANTS`), so a model cannot pass it by
remembering a voice. `noise_snr_db` adds seeded white noise at that signal-to-noise ratio to every clip.

The plan (text, voice, speed, pitch of every clip) is a pure function of the seed (`plan_clips`); the audio is
espeak-ng's output for that plan (22,050 Hz, 16-bit mono), so the same seed and espeak-ng version give the same
files. Only the generator and its seed live in the repository, never the audio.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
import subprocess
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from lorakit.errors import LorakitError
from lorakit.fileio import atomic_write_bytes
from lorakit.outputs import claim_output_dir
from lorakit.speech.audio import read_wav, write_wav

log = logging.getLogger(__name__)

OUTPUT_KIND = "speech commands"
ESPEAK = "espeak-ng"
SPLITS = ("train", "eval")
# Accents (espeak-ng's English voices) and voice variants, split so that no held-out voice shares either part
# with a training voice.
TRAIN_ACCENTS = ("en-us", "en-gb", "en-gb-x-rp", "en-gb-x-gbclan", "en-gb-x-gbcwmd")
EVAL_ACCENTS = ("en-gb-scotland", "en-029", "en-us-nyc")
TRAIN_VARIANTS = ("m1", "m2", "m3", "m4", "f1", "f2", "f3", "klatt")
EVAL_VARIANTS = ("m5", "m6", "m7", "f4", "f5", "klatt2")
SPEEDS = (140, 260)   # words per minute, uniform; espeak-ng's default is 175
PITCHES = (15, 85)    # 0-99, uniform; espeak-ng's default is 50

_DEVICES = ("light", "lamp", "fan", "heater", "radio", "television", "oven", "kettle", "speaker", "blinds")
_ROOMS = ("kitchen", "bedroom", "living room", "bathroom", "garage", "hallway", "office", "garden")
_MUSIC = ("jazz", "rock", "classical", "reggae", "country", "blues", "techno", "opera")
_NAMES = ("mum", "dad", "grandma", "alice", "oliver", "sophie", "the doctor", "the office")
_CITIES = ("london", "paris", "glasgow", "madrid", "boston", "dublin", "berlin", "toronto")
_ONES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve",
         "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen")
_TENS = ("", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety")
TEMPLATES = (
    "turn on the {room} {device}",
    "turn off the {room} {device}",
    "dim the {room} lights to {percent} percent",
    "set a timer for {minutes} minutes",
    "set the {room} temperature to {degrees} degrees",
    "play {music} music in the {room}",
    "call {name}",
    "what is the weather in {city}",
    "remind me at {hour} o'clock",
    "open the {room} blinds",
)


@dataclass(frozen=True)
class Clip:
    """One planned clip: where its audio goes (relative to the manifest), what is said and by which voice."""

    audio: str
    text: str
    voice: str
    speed: int
    pitch: int
    noise_snr_db: float | None


def number_words(n: int) -> str:
    """0 <= n < 100 in words: 7 -> "seven", 25 -> "twenty five" (as a speaker says it, no hyphen)."""
    if not 0 <= n < 100:
        raise LorakitError(f"number_words covers 0-99, got {n}")
    if n < 20:
        return _ONES[n]
    tens, ones = divmod(n, 10)
    return _TENS[tens] + (f" {_ONES[ones]}" if ones else "")


def command_text(rng: random.Random) -> str:
    """One command drawn from `TEMPLATES`, written as a sentence ("Set a timer for five minutes.")."""
    template = rng.choice(TEMPLATES)
    words = template.format(room=rng.choice(_ROOMS), device=rng.choice(_DEVICES), music=rng.choice(_MUSIC),
                            name=rng.choice(_NAMES), city=rng.choice(_CITIES),
                            percent=number_words(rng.choice(range(10, 100, 10))),
                            minutes=number_words(rng.randint(2, 59)), degrees=number_words(rng.randint(16, 28)),
                            hour=number_words(rng.randint(1, 12)))
    words = " ".join(w.capitalize() if w in {n for n in _NAMES + _CITIES if " " not in n} else w
                     for w in words.split())
    return words[0].upper() + words[1:] + ("?" if template.startswith("what") else ".")


def plan_clips(split: str, count: int, *, seed: int = 0, noise_snr_db: float | None = None) -> list[Clip]:
    """The clips of `split` (`train` or `eval`): a pure function of (split, count, seed, noise_snr_db).

    Raises LorakitError for an unknown split, a count below 1 or a negative seed.
    """
    if split not in SPLITS:
        raise LorakitError(f"unknown split {split!r}; expected one of: {', '.join(SPLITS)}")
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise LorakitError(f"{split} clip count must be a positive int, got {count!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise LorakitError(f"seed must be a non-negative int, got {seed!r}")
    accents, variants = (TRAIN_ACCENTS, TRAIN_VARIANTS) if split == "train" else (EVAL_ACCENTS, EVAL_VARIANTS)
    rng = random.Random(f"{seed}/{split}")  # each split its own stream: changing one count leaves the other alone
    clips = []
    for i in range(count):
        voice = f"{rng.choice(accents)}+{rng.choice(variants)}"
        clips.append(Clip(audio=f"clips/{split}-{i:05d}.wav", text=command_text(rng), voice=voice,
                          speed=rng.randint(*SPEEDS), pitch=rng.randint(*PITCHES), noise_snr_db=noise_snr_db))
    return clips


def espeak_path() -> str:
    """The espeak-ng executable; raises LorakitError naming the package to install when it is missing."""
    found = shutil.which(ESPEAK)
    if found is None:
        raise LorakitError("espeak-ng is not installed (the speech data set is synthesised with it); install it, "
                           "e.g. apt-get install espeak-ng")
    return found


def synthesise(clip: Clip, target: Path, *, seed: int, index: int) -> None:
    """Speak `clip` with espeak-ng into the wav file `target` (22,050 Hz, 16-bit mono), with the clip's noise
    drawn from a generator seeded by (seed, index)."""
    command = [espeak_path(), "-v", clip.voice, "-s", str(clip.speed), "-p", str(clip.pitch), "-w", str(target),
               clip.text]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0 or not target.is_file():
        raise LorakitError(f"espeak-ng failed for voice {clip.voice!r} ({done.stderr.strip() or done.returncode})")
    if clip.noise_snr_db is None:
        return
    audio, rate = read_wav(target, target_rate=None)
    write_wav(target, add_noise(audio, clip.noise_snr_db, np.random.default_rng([seed, index])), rate)


def add_noise(audio: np.ndarray, snr_db: float, rng: np.random.Generator) -> np.ndarray:
    """`audio` (float32 in [-1, 1]) plus white noise whose power is the speech's power / 10^(snr_db / 10),
    clipped back to [-1, 1]. The speech's power is measured over its non-silent samples (|x| > 1% of the peak)."""
    voiced = audio[np.abs(audio) > 0.01 * float(np.abs(audio).max(initial=0.0))]
    power = float(np.mean(voiced.astype(np.float64) ** 2)) if voiced.size else 0.0
    noise = rng.standard_normal(audio.shape) * np.sqrt(power / 10 ** (snr_db / 10))
    return np.clip(audio + noise, -1.0, 1.0).astype(np.float32)


def generate_speech_commands(out_dir: str | Path, *, train: int = 240, eval: int = 80, seed: int = 0,
                             noise_snr_db: float | None = None, force: bool = False) -> dict[str, Path]:
    """Synthesise the data set into `out_dir`: `clips/*.wav`, `train.jsonl` and `eval.jsonl` (one clip per line:
    audio path relative to the manifest, text, voice, speed, pitch, noise_snr_db) and `dataset.json` (the
    arguments). Returns the manifests' paths by split.

    `out_dir` must be new or empty; an earlier data set written here is replaced with `force`, and a directory
    holding anything else is refused (nothing is written). Raises LorakitError for bad counts, seed or noise, or
    a missing espeak-ng.
    """
    if noise_snr_db is not None and not (isinstance(noise_snr_db, int | float) and -20 <= noise_snr_db <= 100):
        raise LorakitError(f"noise_snr_db must be a number of decibels in [-20, 100] or None, got {noise_snr_db!r}")
    plans = {"train": plan_clips("train", train, seed=seed, noise_snr_db=noise_snr_db),
             "eval": plan_clips("eval", eval, seed=seed, noise_snr_db=noise_snr_db)}
    espeak_path()
    out = Path(out_dir).expanduser()
    if claim_output_dir(out, kind=OUTPUT_KIND, force=force, replace_hint="pass --force to replace it"):
        for name in ("clips", "train.jsonl", "eval.jsonl", "dataset.json"):
            target = out / name
            shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
    (out / "clips").mkdir()
    manifests: dict[str, Path] = {}
    for split, clips in plans.items():
        for i, clip in enumerate(clips):
            with tempfile.TemporaryDirectory(dir=out) as tmp:  # a killed run leaves no half-written wav
                staged = Path(tmp) / "clip.wav"
                synthesise(clip, staged, seed=seed, index=i if split == "train" else train + i)
                staged.rename(out / clip.audio)
        manifests[split] = out / f"{split}.jsonl"
        atomic_write_bytes(manifests[split], "".join(json.dumps(asdict(c)) + "\n" for c in clips).encode(),
                           what="manifest")
        log.info("wrote %d %s clips (%d voices) to %s", len(clips), split, len({c.voice for c in clips}), out)
    settings = {"generator": "lorakit.speech.clips", "seed": seed, "train": train, "eval": eval,
                "noise_snr_db": noise_snr_db}
    atomic_write_bytes(out / "dataset.json", (json.dumps(settings, indent=2) + "\n").encode(), what="data set record")
    return manifests
