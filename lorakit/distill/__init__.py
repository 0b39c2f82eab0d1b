"""Knowledge distillation: a LoRA, factorised or fully fine-tuned student learns from a teacher's logits.

    teacher = load_teacher("runs/sst2-full/model")
    check_teacher(teacher, model, tokenizer, kind="classification", labels=task.labels)
    task = DistillTask(task, teacher, kind="classification", alpha=0.5, temperature=2.0)

`loss` holds the KD loss (whole logits, and chunked over a causal LM's response rows), `teacher` loading and
checking the teacher, `cache` the teacher logits kept on disk, `task` the training task that mixes them in. The
`distill` section of a training config drives all of it (`lorakit.train.run`).
"""

from lorakit.distill.cache import CACHE_NAME, LogitCache, data_fingerprint, read_cache, write_cache
from lorakit.distill.loss import check_kd_settings, head_kd_sum, kd_loss, linear_kd_sum
from lorakit.distill.task import DistillTask
from lorakit.distill.teacher import Teacher, check_teacher, check_teacher_source, load_teacher

__all__ = ["CACHE_NAME", "DistillTask", "LogitCache", "Teacher", "check_kd_settings", "check_teacher",
           "check_teacher_source", "data_fingerprint", "head_kd_sum", "kd_loss", "linear_kd_sum", "load_teacher",
           "read_cache", "write_cache"]
