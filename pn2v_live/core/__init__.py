"""Algorithm core: pure torch/numpy, no I/O, no threads."""
