"""Export: build the pi0-style policy in PyTorch and write checked ONNX and TorchScript artifacts.

``python -m export --help`` is the command line; :mod:`vlaserve.model.policy` is the model,
:mod:`vlaserve.model.presets` the model sizes.
"""
