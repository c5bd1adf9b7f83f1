"""``make demo`` (``python -m demo``): the main job end to end, export to a results table. It stands above
everything it runs: export, the server, the client and the load test."""
