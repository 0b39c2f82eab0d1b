"""Export to GGUF for llama.cpp and Ollama: a merged model (`export_gguf`) or an adapter alone as a llama.cpp
LoRA file (`export_lora_gguf`). See docs/gguf.md.

    names      transformers LLaMA keys -> GGUF tensor names, q/k row order, the architecture check
    tokenizer  byte-level BPE tokenizer and chat template as `tokenizer.*` metadata
    merged     the merged model (f16 or q8_0)
    lora       the adapter alone (f32 factors, llama.cpp's `--lora` layout)
    output     the output file: refusals, written beside itself and renamed into place
"""

from lorakit.gguf.lora import LoraGgufExport, export_lora_gguf
from lorakit.gguf.merged import TYPES, GgufExport, export_gguf

__all__ = ["TYPES", "GgufExport", "LoraGgufExport", "export_gguf", "export_lora_gguf"]
