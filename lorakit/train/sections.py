"""The sections of a training configuration (`model`, `data`, `lora`, `optim`, `run`, `compress`, `distill`) as
dataclasses: the only place their defaults live. Each docstring documents its keys; `CHOICES` and `BOUNDS` hold what
values are allowed. `lorakit.train.config` reads YAML files and flags into these.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from lorakit.allocator import ALLOCATORS
from lorakit.config import BIAS_MODES, INIT_METHODS, LoraConfig
from lorakit.gemm import CHOICES as CPU_MATMULS
from lorakit.train.data import FORMATS
from lorakit.train.readers import check_encoding


@dataclass
class ModelSection:
    """The base model.

    name: `smollm2` or `minilm` (the bundled models), a local model directory or a Hugging Face hub id.
    dtype: the dtype the base model's weights are loaded in.
    quantize: `nf4` or `int8` stores the linear layers of the transformer blocks quantized through bitsandbytes
        (QLoRA; `pip install 'lorakit[quant]'`), dequantized to `dtype` for each matmul; embeddings, norms and
        task heads stay dense. null: a dense base.
    quantize_init: how the adapter starts on a quantized base (docs/quantization.md): `qlora` (lora.init over Q(W)),
        `qpissa` (the top-r of W in A, B; only the residual quantized) or `loftq` (loftq_iters alternations
        between quantizing W - s·B A and re-fitting A, B to W - Q). Needs model.quantize.
    loftq_iters: LoftQ's alternations.
    quantize_svd_iters: for quantize_init `qpissa` and `loftq`: null for the exact SVD, or the power iterations of
        the randomized SVD (as lora.svd_iters does for lora.init=principal on a dense base).
    """

    name: str = "smollm2"
    dtype: str = "float32"
    quantize: str | None = None
    quantize_init: str = "qlora"
    loftq_iters: int = 5
    quantize_svd_iters: int | None = None


@dataclass
class DataSection:
    """The data, how it is read and how it is cut. A relative path in a YAML file (train, eval) is looked up from
    the working directory first, then from the YAML file's directory; a flag's path only from the working
    directory.

    task: what is learnt: classification, instruction (tuning), ner (a tag per word), qa (extractive),
        translation (instruction tuning on parallel text, scored by BLEU and chrF; its format is `parallel`) or
        image-classification (an image model with a new head; train/eval `mnist-5k:train`, `mnist-5k:test` or an
        MNIST-layout .csv/.csv.gz), or transcription (speech to text with Whisper, scored by word error rate: a
        .jsonl or .csv manifest of wav paths in `audio`, relative to the manifest, and transcripts in `text`).
    train: the training data: a .json, .jsonl, .csv, .tsv or .conll file, a directory saved with `datasets`'
        `save_to_disk`, `hf:NAME[:CONFIG]` from the hub, or `PREFIX.{SRC,TGT}` with format `parallel`.
    eval: the evaluation data, written as `train`; null: hold out eval_fraction of train, or evaluate nothing.
    format: the file format (see `lorakit.train.data.FORMATS`): `conll`, `squad`, or `parallel` (the translation
        task's, and its default); null: from the file's suffix.
    encoding: the text encoding of the data files, e.g. latin-1 or utf-16; utf-8 also drops a byte-order mark.
    columns: maps a task field (text, text_pair, label, instruction, input, output, tokens, tags) to a column of
        the data file.
    max_length: tokens per example (per window for qa); longer inputs are truncated. At most the model's
        positions (max_position_embeddings).
    train_limit: use only the first train_limit training records (after any eval_fraction hold-out); null: all.
    eval_limit: use only the first eval_limit evaluation records; null: all.
    eval_fraction: the share of train held out for evaluation when there is no eval file.
    labels: the label (classification) or tag (ner) names in the order of the model's outputs; null: the
        distinct values of the training data, sorted.
    train_articles / eval_articles: `[start, stop)` article indices to take from a `squad` file (a split by
        article: no context on both sides).
    image_size: image-classification: the side images are resized to (square); null: the model's own (224 for
        EfficientNet-Lite0 and DINOv2).
    """

    task: str = "instruction"
    train: str = ""
    eval: str | None = None
    format: str | None = None
    encoding: str = "utf-8"
    columns: dict[str, str] = field(default_factory=dict)
    max_length: int = 256
    train_limit: int | None = None
    eval_limit: int | None = None
    eval_fraction: float = 0.0
    labels: list[str] | None = None
    train_articles: list[int] | None = None
    eval_articles: list[int] | None = None
    image_size: int | None = None


@dataclass
class OptimSection:
    """AdamW, a linear warm-up, then a cosine, linear or constant learning rate. Steps are optimizer steps.

    lr: the peak learning rate.
    lora_plus_ratio: the B factors learn at lr x lora_plus_ratio (LoRA+, Hayou et al. 2024, section 3: about 16);
        1: plain LoRA.
    weight_decay: AdamW's decoupled weight decay (biases get none).
    schedule: the learning rate after warm-up: cosine or linear decay to 0 at the last step, or constant.
    warmup_steps: optimizer steps of linear warm-up from 0 to lr.
    epochs: passes over the training data (a fraction is allowed); max_steps overrides it.
    max_steps: optimizer steps to train; null: from epochs.
    batch_size: examples per forward pass and process.
    grad_accum: forward passes per optimizer step (the batch of a step: batch_size x grad_accum x processes).
    clip_norm: clip the gradients' global norm to this; null: no clipping.
    """

    lr: float = 2e-4
    lora_plus_ratio: float = 1.0
    weight_decay: float = 0.0
    schedule: str = "cosine"
    warmup_steps: int = 0
    epochs: float = 1.0
    max_steps: int | None = None
    batch_size: int = 16
    grad_accum: int = 1
    clip_norm: float | None = 1.0


@dataclass
class RunSection:
    """Where the run writes, what trains, when it evaluates and saves, and on which device.

    out_dir: the run's directory: checkpoints, config.json, the loss curve and the published adapter (or model).
        Checked before the model loads: it must be (or be creatable as) a directory you can write.
    seed: seeds the new weights' initialisation, the data order and the eval_fraction hold-out.
    eval_every: evaluate every eval_every optimizer steps (0: only at the end).
    save_every: save a checkpoint every save_every optimizer steps (0: only at evaluations and the end).
    keep_last: checkpoints kept besides the best (the newest is what --resume continues from).
    early_stopping: stop after this many evaluations without improvement; null: never.
    log_every: log the loss every log_every optimizer steps.
    eval_batch_size: examples per forward pass in evaluation.
    group_by_length: batch examples of similar length together (less padding; the order stays random).
    method: what trains: `lora` (the adapter, plus any new task head), `head-only` (the task head alone),
        `full` (every parameter; the baseline LoRA is measured against) or `factors` (with `compress`, or a
        factorised model.name: only the factorised layers' U and V, plus the task head: recovery fine-tuning).
    activation_checkpointing: recompute activations in backward instead of keeping them (less memory, slower).
    fused_swiglu: LLaMA-family MLPs keep gate and up only and recompute SiLU(gate) and the product in backward:
        two (tokens, intermediate) tensors less per layer for about 2% more step time, the same numbers bit for
        bit (lorakit.swiglu); false: the model's own forward.
    mixed_precision: autocast the forward pass to bf16 or fp16 (fp16 needs CUDA); no: full precision.
    device: auto (CUDA when there is one), cpu or cuda.
    parallel: how processes under torchrun share the work: ddp (each holds the whole model and trains on its share
        of the batch) or fsdp (each holds 1/N of every weight, gathered block by block: for a base too big for one
        device; needs torchrun; see docs/distributed.md).
    fsdp_offload: with fsdp on CUDA, keep the weight shards, gradients and optimizer state in CPU memory.
    allocator: the memory allocator of the lorakit command: system (the C library's malloc) or jemalloc, for which
        the command starts itself again with jemalloc preloaded (lorakit.allocator; install libjemalloc2, or set
        LORAKIT_JEMALLOC to the library). On CPU, glibc's malloc leaves a training step's freed activations as
        holes it does not refill in place, and the process holds more memory than its tensors need: measured in
        docs/quantization.md.
    cpu_matmul: the kernel of the fp32 products on the CPU (the frozen base's and the language-model head's):
        auto (oneDNN where torch has it, else torch's own), onednn, or blas (torch's own, oneMKL in the x86
        wheels). On the AMD EPYC of docs/benchmarks.md oneDNN runs them 2.2-2.4x faster than oneMKL; the results
        equal torch's to fp32 rounding (lorakit.gemm).
    """

    out_dir: str = "runs/default"
    seed: int = 0
    eval_every: int = 0
    save_every: int = 0
    keep_last: int = 2
    early_stopping: int | None = None
    log_every: int = 10
    eval_batch_size: int = 32
    group_by_length: bool = True
    method: str = "lora"
    activation_checkpointing: bool = False
    fused_swiglu: bool = True
    mixed_precision: str = "no"
    device: str = "auto"
    parallel: str = "ddp"
    fsdp_offload: bool = False
    allocator: str = "system"
    cpu_matmul: str = "auto"


@dataclass
class CompressSection:
    """Factorise the base model's linear layers into low-rank pairs U·Vᵀ before training (see
    `lorakit.compress.factorize`); off unless one of ratio, energy and rank is set (at most one). The task head is
    never factorised. Then `run.method` says what trains: `factors` (recovery fine-tuning), `full`, `head-only`
    (the truncated model as it is) or `lora` (U and V frozen; the adapter and the head train). With `lora`,
    lora.targets must not match a layer compress.targets factorises (checked once the model loads), and the run
    publishes the factorised model as `model` and the adapter, which records that directory as its base, as
    `adapter`.

    ratio: keep this share of the chosen layers' parameters, in (0, 1], spent where the spectra need it most.
    energy: per layer the smallest rank keeping this share of its energy, in (0, 1].
    rank: the same rank for every chosen layer.
    method: svd (the best approximation of each weight) or activation (of each layer's outputs on calibration
        inputs: the first calibration_examples training examples).
    targets: the layers to factorise (lorakit's pattern syntax and presets, as for lora.targets); only linear layers.
    calibration_examples: training examples the activation method calibrates on.
    rank_multiple: ratio and energy ranks are multiples of this (16 runs the thin products faster on AVX-512 CPUs).
    """

    ratio: float | None = None
    energy: float | None = None
    rank: int | None = None
    method: str = "svd"
    targets: list[str] = field(default_factory=lambda: ["all-linear"])
    calibration_examples: int = 16
    rank_multiple: int = 1

    @property
    def enabled(self) -> bool:
        return any(v is not None for v in (self.ratio, self.energy, self.rank))


@dataclass
class DistillSection:
    """Knowledge distillation (see `lorakit.distill`): the student (whatever run.method trains: lora, factors
    with a compress section, full, head-only) learns from a teacher with alpha x the task loss + (1 - alpha) x T² x
    KL(teacher_T || student_T); off unless teacher is set. For classification and for causal LMs (data.task
    instruction or translation, on the response tokens only). The teacher must use the student's tokenizer and, for
    classification, have its label set in the same order.

    teacher: the teacher: a model directory (fully fine-tuned or merged, with its task.json), an adapter directory
        (on the base it records), a bundled name or a hub id; empty: no distillation.
    teacher_adapter: an adapter directory applied on teacher (then a base model); null: none.
    alpha: the weight of the task loss, in [0, 1]; the teacher's soft targets get 1 - alpha (1: no teacher).
    temperature: T, softening both distributions; the soft term is scaled by T² (Hinton et al. 2015, section 2).
    cache: compute the teacher's logits over the training data once and read them from a file (for several epochs
        or runs; refused when the data or the teacher changed); false: run the teacher at every step.
    cache_path: the cache file; null: teacher-logits.safetensors in run.out_dir.
    cache_max_gb: refuse to build a cache larger than this (a causal LM stores one row of vocabulary-sized float32
        logits per response token).
    chunk_size: rows of vocabulary-sized logits computed at once for a causal LM (memory against speed).
    """

    teacher: str = ""
    teacher_adapter: str | None = None
    alpha: float = 0.5
    temperature: float = 2.0
    cache: bool = False
    cache_path: str | None = None
    cache_max_gb: float = 2.0
    chunk_size: int = 512

    @property
    def enabled(self) -> bool:
        return bool(self.teacher)


@dataclass
class TrainConfig:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    lora: LoraConfig = field(default_factory=LoraConfig)
    optim: OptimSection = field(default_factory=OptimSection)
    run: RunSection = field(default_factory=RunSection)
    compress: CompressSection = field(default_factory=CompressSection)
    distill: DistillSection = field(default_factory=DistillSection)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


SECTION_TYPES: dict[str, type] = {"model": ModelSection, "data": DataSection, "lora": LoraConfig,
                                   "optim": OptimSection, "run": RunSection, "compress": CompressSection,
                                   "distill": DistillSection}
CHOICES: dict[str, tuple[str, ...]] = {
    "model.dtype": ("float32", "bfloat16", "float16"),
    "model.quantize": ("nf4", "int8"),
    "model.quantize_init": ("qlora", "qpissa", "loftq"),
    "data.task": ("classification", "instruction", "ner", "qa", "translation", "image-classification",
                  "transcription"),
    "data.format": tuple(FORMATS),
    "lora.init": INIT_METHODS,
    "lora.bias": BIAS_MODES,
    "optim.schedule": ("cosine", "linear", "constant"),
    "run.mixed_precision": ("no", "bf16", "fp16"),
    "run.device": ("auto", "cpu", "cuda"),
    "run.method": ("lora", "head-only", "full", "factors"),
    "run.parallel": ("ddp", "fsdp"),
    "run.allocator": ALLOCATORS,
    "run.cpu_matmul": CPU_MATMULS,
    "compress.method": ("svd", "activation"),
}
_SEEDS = 2**63  # torch.manual_seed takes at most a 64-bit int


def _at_least(low: float) -> tuple[str, Callable[[Any], bool]]:
    return f">= {low:g}", lambda v: v >= low


def _above(low: float) -> tuple[str, Callable[[Any], bool]]:
    return f"> {low:g}", lambda v: v > low


# What each number (and the encoding) may be, beyond its type: a description for messages and --help-config, and
# the test. A null passes where the type allows it. Every float key is also checked to be finite.
BOUNDS: dict[str, tuple[str, Callable[[Any], bool]]] = {
    "data.encoding": ("an encoding Python knows (e.g. utf-8, latin-1, utf-16)", lambda v: check_encoding(v) is None),
    "data.max_length": _at_least(8),
    "data.train_limit": _at_least(1),
    "data.image_size": _at_least(8),
    "data.eval_limit": _at_least(1),
    "data.eval_fraction": ("in [0, 1)", lambda v: 0 <= v < 1),
    "lora.rank": ("a positive int", lambda v: v >= 1),
    "lora.alpha": _above(0),
    "lora.dropout": ("in [0, 1)", lambda v: 0 <= v < 1),
    "lora.svd_iters": _at_least(0),
    "model.quantize_svd_iters": _at_least(0),
    "lora.seed": ("in [0, 2**63)", lambda v: 0 <= v < _SEEDS),
    "optim.lr": _above(0),
    "optim.lora_plus_ratio": _above(0),
    "optim.weight_decay": _at_least(0),
    "optim.warmup_steps": _at_least(0),
    "optim.epochs": _above(0),
    "optim.max_steps": _at_least(1),
    "optim.batch_size": _at_least(1),
    "optim.grad_accum": _at_least(1),
    "optim.clip_norm": _above(0),
    "run.seed": ("in [0, 2**63)", lambda v: 0 <= v < _SEEDS),
    "run.eval_every": _at_least(0),
    "run.save_every": _at_least(0),
    "run.keep_last": _at_least(1),
    "run.early_stopping": _at_least(1),
    "run.log_every": _at_least(1),
    "run.eval_batch_size": _at_least(1),
    "compress.ratio": ("in (0, 1]", lambda v: 0 < v <= 1),
    "compress.energy": ("in (0, 1]", lambda v: 0 < v <= 1),
    "compress.rank": ("a positive int", lambda v: v >= 1),
    "compress.calibration_examples": _at_least(1),
    "compress.rank_multiple": _at_least(1),
    "distill.alpha": ("in [0, 1]", lambda v: 0 <= v <= 1),
    "distill.temperature": _above(0),
    "distill.cache_max_gb": _above(0),
    "distill.chunk_size": _at_least(1),
}



# ---------------------------------------------------------------- loading
