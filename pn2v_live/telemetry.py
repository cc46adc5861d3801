"""Prometheus metrics of the daemon (prefix `pn2v_live_`); every layer but the core may update them.

Labels stay low-cardinality: `source` is "folder" or "zmq", `reason` a short fixed word.
"""

from prometheus_client import Counter, Enum, Gauge, Histogram, Info

FRAMES_INGESTED = Counter("pn2v_live_frames_ingested_total", "Raw frames stored", ["source"])
FRAMES_REJECTED = Counter(
    "pn2v_live_frames_rejected_total", "Source items or messages rejected", ["source", "reason"]
)
FRAMES_DENOISED = Counter(
    "pn2v_live_frames_denoised_total",
    "Denoised frames written; kind is new (first twin), refined (re-denoised with the later "
    "frames of its window) or backfill (re-denoised by a newer model)",
    ["kind"],
)
FRAMES_UNREADABLE = Counter(
    "pn2v_live_frames_unreadable_total",
    "Stored raw frames that could not be read back (damaged chunk); skipped, tried again later",
    ["stage"],
)
BACKLOG = Gauge("pn2v_live_backlog_frames", "Stored raw frames still waiting for a denoised twin")
INGEST_QUEUE = Gauge("pn2v_live_ingest_queue_frames", "Frames received but not yet stored")
RECEIVE_QUEUE_BYTES = Gauge(
    "pn2v_live_receive_queue_bytes",
    "Bytes of ZeroMQ messages received but not yet stored (queued or being written)",
)
RECEIVE_QUEUE_LIMIT_BYTES = Gauge(
    "pn2v_live_receive_queue_limit_bytes",
    "ingest.zmq.queue_mib in bytes: at this fill the receiver stops reading (backpressure)",
)
INFERENCE_SECONDS = Histogram(
    "pn2v_live_inference_seconds",
    "Time to denoise one frame (read, MMSE, write)",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
MODEL_VERSION = Gauge("pn2v_live_model_version", "Version number of the model used for inference")
MODEL_ESTIMATED_GAIN = Gauge(
    "pn2v_live_model_estimated_gain_db",
    "Ground-truth-free estimate of the PSNR gain over raw of the model used for inference (dB, "
    "measured on held-back frames when it was promoted; NaN when not measured)",
)
MODEL_ESTIMATED_GAIN_UNCERTAINTY = Gauge(
    "pn2v_live_model_estimated_gain_uncertainty_db",
    "Standard error of pn2v_live_model_estimated_gain_db (dB)",
)
TRAINING_LOSS = Gauge("pn2v_live_training_loss", "Mean training loss of the last round")
VALIDATION_LOSS = Gauge("pn2v_live_validation_loss", "Validation loss of the last round")
TRAINING_ROUNDS = Counter("pn2v_live_training_rounds_total", "Training rounds", ["outcome"])
TRAINER_STATE = Enum(
    "pn2v_live_trainer_state",
    "What the trainer is doing: idle (too few new frames for a round), training, or waiting "
    "(a round paused while new frames wait for inference, which has priority)",
    states=["idle", "training", "waiting"],
)
LAST_FRAME_TIMESTAMP = Gauge(
    "pn2v_live_last_frame_timestamp_seconds", "Unix time of the newest stored raw frame"
)
SIGNAL_OUT_OF_CALIBRATION = Gauge(
    "pn2v_live_signal_out_of_calibration_ratio",
    "Fraction of pixels of the newest frame whose estimated signal lies above the noise model's "
    "calibrated range",
)
NOISE_MODEL_REFINEMENTS = Counter(
    "pn2v_live_noise_model_refinements_total",
    "Attempts to refine the noise model from the stream's (signal estimate, raw) pairs above "
    "its range; outcome is refined (a new noise-model version is in use) or refused (reason "
    "logged)",
    ["outcome"],
)
for _outcome in ("refined", "refused"):
    NOISE_MODEL_REFINEMENTS.labels(_outcome)
NOISE_MODEL_SIGNAL_MAX = Gauge(
    "pn2v_live_noise_model_signal_max",
    "Top of the signal range (ADU) the noise model in use covers: the calibration's, raised by "
    "each refinement",
)
STAGE_FAILURES = Counter(
    "pn2v_live_stage_failures_total",
    "Failed units of work of a long-running stage or thread (a pass, a round, a frame write), "
    "by a short reason: disk_full, permission, io, memory, diverged or error",
    ["stage", "reason"],
)
STAGE_HEALTHY = Gauge(
    "pn2v_live_stage_healthy",
    "1 while a long-running stage or thread makes progress (or waits out a full disk), 0 when "
    "it is stuck, keeps failing past its timeout or has ended; the daemon pings systemd's "
    "watchdog only while every one is 1",
    ["stage"],
)
DISK_FULL = Gauge(
    "pn2v_live_disk_full",
    "1 while the store's file system is full (ENOSPC, EDQUOT): ingest refuses new frames (senders "
    "keep and resend them), training and denoising pause; back to 0 once space returns",
)
BUILD_INFO = Info(
    "pn2v_live_build",
    "pn2v-live version, torch version and build (CUDA version or CPU-only), the inference device "
    '("cuda:0 (NVIDIA H200)", "CPU, 2 threads") and the U-Net body precision: '
    "pn2v_live_build_info{version,torch,device,precision} = 1",
)
