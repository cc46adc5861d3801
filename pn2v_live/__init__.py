"""pn2v-live: live Probabilistic Noise2Void denoising beside the microscope."""

import os

# PyTorch's CPU threads (OpenMP) spin at every barrier by default. When the daemon's trainer
# and inference run at once, or other programs share the cores, the spinning threads keep the
# working ones off the CPU and every step becomes several times slower; waiting passively costs
# little when they run alone (docs/benchmarks.md). Set before torch loads; a user's value stays.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.3.0"
