"""Quantization: `calibrate`, `ptq` and `search` (onnxruntime, torch-free), `qat` (torch), and the
pipeline stage in `stage` (torch imported only when it runs). Import submodules directly."""
