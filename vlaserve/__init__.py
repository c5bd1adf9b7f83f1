"""vlaserve: serve a pi0-style vision-language-action policy on NVIDIA Triton Inference Server.

The pipeline runs one way: ``export`` writes artifacts and configs into ``model_repository/``,
the server (:mod:`vlaserve.server`) reads that repository, and clients (:mod:`vlaserve.client`,
``loadtest/``) talk to the server. :mod:`vlaserve.interface` is the one source of truth for tensor
names, shapes and ports.
"""

__version__ = "0.1.0"
