"""Load tests: a Locust user over tritonclient, a sweep runner with Triton's server-side metrics, and a
comparison of model-repository variants. ``python -m loadtest.sweep --help`` is the command line."""

# The Locust entry name suffix of failed requests: the sweep reads answers and failures apart.
FAILED_SUFFIX = " [failed]"
