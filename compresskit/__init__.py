"""compresskit: distill, prune, quantize and export vision models to fast INT8 ONNX.

This package's top level imports no torch, so the torch-free modules (bench, report,
budget, config, artifacts, onnxutil, quantize.ptq/calibrate/search/qdq) work with only
numpy + onnx + onnxruntime.
"""

__version__ = "0.1.0"
