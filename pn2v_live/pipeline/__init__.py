"""Pipeline stages: ingest, calibration, trainer, inference scheduler, publisher."""
