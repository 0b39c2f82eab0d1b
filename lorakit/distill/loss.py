"""The knowledge-distillation loss (Hinton et al., "Distilling the Knowledge in a Neural Network", 2015, section 2):

    loss = α · CE(student, labels) + (1 - α) · T² · KL(softmax(teacher / T) || softmax(student / T))

The T² keeps the soft term's gradient at the scale of the hard term's as T changes (the paper's section 2: the soft
gradients scale as 1/T²). `kd_loss` takes whole logits (classification: (B, C)); `linear_kd_sum` and
`head_kd_sum` take the student's final hidden rows of a causal LM and its output head and never hold more than
`chunk_size` rows of vocabulary-sized logits, as `lorakit.lm_loss` does for the plain cross-entropy: for a
linear head each chunk's gradient is computed in the forward pass, for any other head (a LoRA module on `lm_head`)
each chunk is recomputed in backward under activation checkpointing.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from lorakit.errors import LorakitError
from lorakit.lm_loss import chunked_linear_loss, linear_backward

# The teacher's logits for rows [start, stop) of a batch's supervised rows: (stop - start, V), without grad.
TeacherChunk = Callable[[int, int], Tensor]


def check_kd_settings(alpha: float, temperature: float) -> None:
    """Raise LorakitError unless alpha is in [0, 1] and temperature is a positive finite number."""
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= alpha <= 1.0:
        raise LorakitError(f"distillation alpha must be in [0, 1] (the weight of the task loss), got {alpha!r}")
    if (isinstance(temperature, bool) or not isinstance(temperature, (int, float))
            or not 0.0 < temperature < float("inf")):
        raise LorakitError(f"distillation temperature must be a positive number, got {temperature!r}")


def kd_loss(student: Tensor, teacher: Tensor, labels: Tensor, *, alpha: float, temperature: float) -> Tensor:
    """α · CE(student, labels) + (1 - α) · T² · KL(softmax(teacher/T) || softmax(student/T)), each the mean over
    the B examples; computed in float32.

    student, teacher: (B, C) logits; labels: (B,) class indices. Raises LorakitError for bad alpha/temperature
    or logits of different shapes (a teacher with another label set).
    """
    check_kd_settings(alpha, temperature)
    if student.shape != teacher.shape:
        raise LorakitError(f"the student gives logits of shape {tuple(student.shape)} and the teacher "
                           f"{tuple(teacher.shape)}; the teacher must have the student's label set")
    student, teacher = student.float(), teacher.float()
    hard = F.cross_entropy(student, labels)
    soft = F.kl_div(F.log_softmax(student / temperature, dim=-1), F.log_softmax(teacher / temperature, dim=-1),
                    reduction="batchmean", log_target=True)
    return alpha * hard + (1.0 - alpha) * temperature ** 2 * soft


def linear_kd_sum(rows: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, teacher: TeacherChunk, *,
                  alpha: float, temperature: float, chunk_size: int) -> Tensor:
    """The KD loss of `rows @ weight.T + bias` (N, V), summed over the N rows, in chunks of rows.

    rows: (N, H) student hidden states; weight: (V, H); bias: (V,) or None; targets: (N,) token ids;
    teacher(start, stop): the teacher's logits (n, V) for rows [start, stop). A float32 scalar with gradients for
    whichever of rows, weight and bias require them.
    """
    check_kd_settings(alpha, temperature)
    _check_chunk_size(chunk_size)

    def chunk(start: int, stop: int, grad_rows: Tensor | None, grad_weight: Tensor | None,
              grad_bias: Tensor | None) -> Tensor:
        with torch.no_grad():
            soft = teacher(start, stop)
        return _chunk_kd(rows[start:stop], weight, bias, targets[start:stop], soft, (alpha, temperature), grad_rows,
                         grad_weight, grad_bias)

    return chunked_linear_loss(rows, weight, bias, chunk, chunk_size)


def head_kd_sum(rows: Tensor, head: nn.Module, targets: Tensor, teacher: TeacherChunk, *, alpha: float,
                temperature: float, chunk_size: int) -> Tensor:
    """As `linear_kd_sum` for any head module: each chunk runs under non-reentrant activation checkpointing, so its
    logits (the student's and the teacher's) are recomputed in backward instead of kept."""
    check_kd_settings(alpha, temperature)
    _check_chunk_size(chunk_size)
    total = rows.new_zeros((), dtype=torch.float32)
    for start in range(0, rows.shape[0], chunk_size):
        stop = min(start + chunk_size, rows.shape[0])
        part, part_targets = rows[start:stop], targets[start:stop]

        def chunk(part: Tensor, part_targets: Tensor, start: int = start, stop: int = stop) -> Tensor:
            with torch.no_grad():
                soft = teacher(start, stop)
            return rows_kd(head(part).float(), soft.float(), part_targets, alpha, temperature).sum()

        if torch.is_grad_enabled():
            total = total + checkpoint(chunk, part, part_targets, use_reentrant=False)
        else:
            total = total + chunk(part, part_targets)
    return total


def rows_kd(student: Tensor, teacher: Tensor, targets: Tensor, alpha: float, temperature: float) -> Tensor:
    """Per-row KD loss (n,) of float32 logits (n, V) by autograd: the reference the fused chunks follow."""
    hard = F.cross_entropy(student, targets, reduction="none")
    log_p_student = F.log_softmax(student / temperature, dim=-1)
    log_p_teacher = F.log_softmax(teacher / temperature, dim=-1)
    soft = (log_p_teacher.exp() * (log_p_teacher - log_p_student)).sum(-1)
    return alpha * hard + (1.0 - alpha) * temperature ** 2 * soft


def _chunk_kd(rows: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, teacher: Tensor,
              settings: tuple[float, float], grad_rows: Tensor | None, grad_weight: Tensor | None,
              grad_bias: Tensor | None) -> Tensor:
    """Summed KD loss of one chunk of n rows; writes d/d rows into `grad_rows` (n, H) and adds d/d weight and
    d/d bias into the accumulators given. Its own function so the chunk's (n, V) tensors are freed before the
    next chunk's are allocated."""
    alpha, temperature = settings
    logits = F.linear(rows, weight, bias).float()  # (n, V)
    if teacher.shape != logits.shape:
        raise LorakitError(f"the teacher gives {teacher.shape[-1]} logits per token and the student "
                           f"{logits.shape[-1]}; the teacher must have the student's vocabulary")
    log_p = F.log_softmax(logits, dim=-1)  # (n, V)
    hard = -log_p.gather(1, targets[:, None]).squeeze(1)  # (n,)
    log_q_student = F.log_softmax(logits.div_(temperature), dim=-1)  # (n, V); logits not needed again
    log_q_teacher = F.log_softmax(teacher.float() / temperature, dim=-1)  # (n, V)
    q_teacher = log_q_teacher.exp()
    soft = (q_teacher * (log_q_teacher - log_q_student)).sum(-1)  # (n,)
    total = (alpha * hard + (1.0 - alpha) * temperature ** 2 * soft).sum()
    if grad_rows is None and grad_weight is None and grad_bias is None:
        return total
    grad_logits = log_p.exp_().mul_(alpha)  # α·softmax(s)
    grad_logits[torch.arange(len(targets), device=rows.device), targets] -= alpha  # - α·one_hot
    grad_logits += log_q_student.exp_().sub_(q_teacher).mul_((1.0 - alpha) * temperature)
    linear_backward(grad_logits, rows, weight, grad_rows, grad_weight, grad_bias)
    return total


def _check_chunk_size(chunk_size: int) -> None:
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise LorakitError(f"chunk_size must be a positive int, got {chunk_size!r}")
