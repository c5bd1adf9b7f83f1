"""The scripts behind docs/BENCHMARKS.md. Each runs as a file (``python benchmarks/peers.py``) or a module
(``python -m benchmarks.peers``); the virtualenv puts the checkout on the path either way."""
