"""SageMaker entry point: our `train` on the `training` channel (DATA_DIR layout from `prepare --upload`).

Staged beside the package as the training job's entry script (sagemaker_jobs.stage_source); run there as a file."""
from __future__ import annotations

import os
import sys


def our_arguments(argv: list[str]) -> list[str]:
    """Hyperparameters arrive as `--name value`; SageMaker's own (`--sagemaker_*`) are not ours."""
    pairs = zip(argv[0::2], argv[1::2])
    return [item for name, value in pairs if not name.startswith("--sagemaker_") for item in (name, value)]


def train_arguments(argv: list[str], environ: dict[str, str]) -> list[str]:
    data = environ.get("SM_CHANNEL_TRAINING", "/opt/ml/input/data/training")
    args = ["train", "--data", data, "--cache-dir", "/tmp/feature-cache", *our_arguments(argv)]
    # synced with S3 by SageMaker (CheckpointConfig.local_path): a reclaimed spot job restarts and resumes from here
    checkpoints = environ.get("BIN_COUNTER_CHECKPOINTS", "/opt/ml/checkpoints")
    if os.path.isdir(checkpoints):
        args += ["--checkpoint-dir", checkpoints]
        if any(name.endswith(".pt") for name in os.listdir(checkpoints)):
            args.append("--resume")
    return args


if __name__ == "__main__":
    from bin_counter.cli import main

    main(train_arguments(sys.argv[1:], dict(os.environ)))
