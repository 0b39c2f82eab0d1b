"""Resident memory of a process once `load_model("smollm2", quantize=...)` has returned and the model has run
one forward pass, dense, NF4 and int8.

    .venv/bin/python benchmarks/quant_resident.py

Each load runs in a fresh process: the resident set (anonymous and file-backed pages, /proc/self/status) after
`import lorakit` and after the load and a forward pass over 8 tokens (which reads every weight), with unreachable
objects collected and glibc's free heap handed back (`malloc_trim(0)`), so the difference is what the loaded model
holds. `nf4, file kept mapped` is the NF4 load with `quant.own_dense_tensors` switched off: the dense embeddings
and norms then stay views of the memory-mapped checkpoint, and the fp32 pages that quantizing read stay resident
with it. The model's stored bytes (`quant.base_bytes`) are printed beside. Prints one line per load and one JSON line.
"""

from __future__ import annotations

import json
import subprocess
import sys

from common import machine

LOADS = {"dense": (None, True), "nf4": ("nf4", True), "nf4, file kept mapped": ("nf4", False), "int8": ("int8", True)}

_CHILD = """
import ctypes, gc, json, sys
import torch
from lorakit import load_model, quant

def resident():
    fields = {}
    for line in open("/proc/self/status"):
        if line.startswith(("RssAnon:", "RssFile:")):
            fields[line.split(":")[0]] = int(line.split()[1]) * 1024
    return fields

def settle():
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)

kind, own = json.loads(sys.argv[1])
if not own:
    quant.own_dense_tensors = lambda model: None
settle()
before = resident()
model, _ = load_model("smollm2", quantize=kind)
with torch.no_grad():
    model(torch.arange(8)[None])  # every weight read once, as any use of the model does
settle()
after = resident()
print(json.dumps({"anon": after["RssAnon"] - before["RssAnon"], "file": after["RssFile"] - before["RssFile"],
                  "stored": quant.base_bytes(model)["total"]}))
"""


def measure(kind: str | None, own: bool) -> dict[str, int]:
    out = subprocess.run([sys.executable, "-c", _CHILD, json.dumps([kind, own])], capture_output=True, text=True,
                         check=True)
    result: dict[str, int] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def main() -> None:
    mib = 2**20
    rows = {}
    for name, (kind, own) in LOADS.items():
        rows[name] = measure(kind, own)
        r = rows[name]
        print(f"{name:22s} resident +{(r['anon'] + r['file']) / mib:6.0f} MiB (anonymous {r['anon'] / mib:5.0f}, "
              f"file-backed {r['file'] / mib:5.0f}); stored weights {r['stored'] / mib:6.1f} MiB")
    print(json.dumps({"benchmark": "quant_resident", "model": "smollm2", "loads": rows, "machine": machine()}))


if __name__ == "__main__":
    main()
