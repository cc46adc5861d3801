"""Calibrating a camera, run by `pn2v-live calibrate`: the noise-model workflow (`workflow`),
the sCMOS camera maps from dark and flat series (`camera_maps`) and their report figures
(`report`). The mathematics they use is `core.calibration`, beside the noise models."""
