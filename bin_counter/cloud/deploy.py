"""deploy: a logged/registered model to a SageMaker endpoint through MLflow's SageMaker deployment target.

This is exactly `mlflow deployments create -t sagemaker:/REGION ...`; the container image must be built by the
same MLflow version as the model (`mlflow sagemaker build-and-push-container`), which the model pins.
"""
from __future__ import annotations

import json
import logging

from bin_counter import BinCounterError, one_line
from bin_counter.config import DeployConfig
from bin_counter.core.uris import redact_uri

log = logging.getLogger(__name__)


def endpoint_environment(workers: int = 1, threads_per_worker: int = 0, engine: str = "onnx",
                         max_image_bytes: int | None = None, request_timeout: int = 60) -> dict[str, str]:
    """The endpoint container's environment. MLflow's container starts one scoring worker per vCPU by default
    (MLFLOW_MODELS_WORKERS), and each worker's ONNX Runtime takes every core: on a 2-vCPU instance that is 2 x 2
    threads fighting for 2 cores. Workers x threads should be the instance's vCPUs (docs/serving-and-deployment.md,
    "Sizing an endpoint")."""
    from bin_counter.core.inference import ENGINE_VARIABLE, ENGINES, THREADS_VARIABLE

    if engine not in ENGINES:
        raise BinCounterError(f"engine {engine!r}: choose one of {', '.join(ENGINES)}")
    if workers < 1 or threads_per_worker < 0:
        raise BinCounterError("workers must be >= 1 and threads per worker >= 0 (0: ONNX Runtime's default)")
    env = {"MLFLOW_MODELS_WORKERS": str(workers), THREADS_VARIABLE: str(threads_per_worker),
           ENGINE_VARIABLE: engine, "MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT": str(request_timeout)}
    if max_image_bytes:
        env["BIN_COUNTER_MAX_IMAGE_BYTES"] = str(max_image_bytes)
    return env


def deployment_config(execution_role_arn: str | None, image_url: str | None, region: str, instance_type: str,
                      instance_count: int, bucket: str | None, synchronous: bool = True,
                      timeout_seconds: int = 1200, env: dict[str, str] | None = None) -> dict:
    config = {"region_name": region, "instance_type": instance_type, "instance_count": instance_count,
              "synchronous": synchronous, "timeout_seconds": timeout_seconds, "env": env or endpoint_environment()}
    if execution_role_arn:
        config["execution_role_arn"] = execution_role_arn
    if image_url:
        config["image_url"] = image_url
    if bucket:
        config["bucket"] = bucket
    return config


def client_for(region: str):
    from mlflow.deployments import get_deploy_client

    return get_deploy_client(f"sagemaker:/{region}")


def deploy(config: DeployConfig) -> dict:
    """`bin-counter deploy`: create (or --update, or --delete) the endpoint; returns what MLflow reports."""
    endpoint, region, model_uri = config.endpoint, config.region, config.model_uri
    if config.delete:
        action = "delete"
    elif not model_uri:
        raise BinCounterError("--model-uri is required to create or update an endpoint")
    else:
        action = "update" if config.update else "create"
    environment = endpoint_environment(config.workers, config.threads_per_worker, config.engine,
                                       config.max_image_bytes)
    deployment = deployment_config(config.execution_role_arn, config.image_url, region, config.instance_type,
                                   config.instance_count, config.bucket, env=environment)
    if action != "delete" and not config.execution_role_arn:
        raise BinCounterError("--execution-role-arn is required: the role SageMaker runs the endpoint with")
    if config.dry_run:
        plan = {"action": action, "target": f"sagemaker:/{region}", "endpoint": endpoint, "model_uri": model_uri,
                "config": deployment}
        print(redact_uri(json.dumps(plan, indent=2)))
        return plan
    client = client_for(region)
    try:
        if action == "delete":
            client.delete_deployment(endpoint, config={"region_name": region, "synchronous": True})
            result = {"name": endpoint, "deleted": True}
        elif action == "update":
            result = client.update_deployment(endpoint, model_uri=model_uri, config=deployment)
        else:
            result = client.create_deployment(endpoint, model_uri=model_uri, config=deployment)
    except Exception as exc:  # MlflowException, botocore errors: one line for the user
        raise BinCounterError(redact_uri(f"{action} of endpoint {endpoint} failed: {one_line(exc)}")) from None
    print(f"{action}d endpoint {endpoint} in {region}")
    return result
