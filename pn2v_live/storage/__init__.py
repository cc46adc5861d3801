"""Storage: acquisition store (OME-Zarr + ledger), model registry, image, checkpoint and
noise-model files."""
