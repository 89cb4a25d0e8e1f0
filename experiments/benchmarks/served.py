"""A helper the serving benchmarks share: `mlflow models serve` of a model on a free loopback port."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import requests

from tools.team_server import free_port


@contextmanager
def served(model_uri: str, env_manager: str = "local", wait_s: float = 180, **environment: str):
    """The URL of the model served by one worker with `environment` added, once it answers /ping (an env manager
    other than local builds the model's environment first: give it `wait_s`); stopped on leaving."""
    port = free_port()
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, **environment, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    server = subprocess.Popen([str(bin_dir / "mlflow"), "models", "serve", "-m", model_uri, "--env-manager",
                               env_manager, "-h", "127.0.0.1", "-p", str(port), "-w", "1"], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline and server.poll() is None:
            try:
                if requests.get(url + "/ping", timeout=1).status_code == 200:
                    break
            except requests.ConnectionError:
                time.sleep(0.3)
        yield url
    finally:
        os.killpg(server.pid, 15)
        server.wait()
