"""The policy itself, which both export and serving use: the PyTorch model (:mod:`vlaserve.model.policy`),
its sizes (:mod:`vlaserve.model.presets`) and the parity check between two runs of it
(:mod:`vlaserve.model.parity`). It imports nothing from ``export`` or the server."""
