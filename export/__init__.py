"""Export: build the pi0-style policy in PyTorch and write checked ONNX and TorchScript artifacts.

``python -m export --help`` is the command line; :mod:`export.policy` is the model,
:mod:`export.presets` the model sizes.
"""
