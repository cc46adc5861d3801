"""pn2v-live: live Probabilistic Noise2Void denoising beside the microscope."""

__version__ = "0.1.0"
