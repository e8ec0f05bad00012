"""Quantization: ptq (onnxruntime, torch-free) and qat (torch). Import submodules directly."""
