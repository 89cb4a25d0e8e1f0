"""SageMaker entry point: our `train` on the `training` channel (DATA_DIR layout from `prepare --upload`).

Staged beside the package as the training job's entry script (sagemaker_jobs.stage_source); run there as a file."""
from __future__ import annotations

import os
import sys


def our_arguments(argv: list[str]) -> list[str]:
    """Hyperparameters arrive as `--name value`; SageMaker's own (`--sagemaker_*`) are not ours."""
    pairs = zip(argv[0::2], argv[1::2])
    return [item for name, value in pairs if not name.startswith("--sagemaker_") for item in (name, value)]


def tracking_credentials(environ: dict[str, str]) -> dict[str, str]:
    """MLFLOW_TRACKING_USERNAME/PASSWORD or _TOKEN from the Secrets Manager secret the launch named, read with the
    job's role: the secret itself never appears in the job's description."""
    secret_id = environ.get("BIN_COUNTER_TRACKING_SECRET")
    if not secret_id:
        return {}
    import json

    import boto3

    from bin_counter import BinCounterError, one_line

    try:
        value = json.loads(boto3.client("secretsmanager").get_secret_value(SecretId=secret_id)["SecretString"])
    except Exception as exc:  # denied, missing, not JSON: the job must stop before training unlogged
        raise BinCounterError(f"tracking secret {secret_id}: {one_line(exc)}") from None
    names = {"username": "MLFLOW_TRACKING_USERNAME", "password": "MLFLOW_TRACKING_PASSWORD",
             "token": "MLFLOW_TRACKING_TOKEN"}
    found = {names[k]: str(v) for k, v in value.items() if k in names} if isinstance(value, dict) else {}
    if not found:
        raise BinCounterError(f"tracking secret {secret_id} holds none of username/password/token")
    return found


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
    from bin_counter import BinCounterError
    from bin_counter.cli import main

    try:
        os.environ.update(tracking_credentials(dict(os.environ)))
    except BinCounterError as exc:
        sys.exit(f"error: {exc}")
    main(train_arguments(sys.argv[1:], dict(os.environ)))
