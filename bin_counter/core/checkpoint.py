"""Checkpoints at every epoch end, and SIGTERM/Ctrl-C handling, so an interrupted training (a spot instance
reclaimed, a user's Ctrl-C) resumes from its last finished epoch and reaches the result an uninterrupted run would:
the weights, optimiser, scheduler, best-epoch bookkeeping and every random generator are saved together.

A checkpoint holds tensors and plain Python values only and is always loaded with weights_only=True: a file
restored from a shared folder or S3 prefix cannot run code, and it resumes only the run it is named for.
"""
from __future__ import annotations

import pickle
import random
import signal
import threading
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from bin_counter import BinCounterError, one_line
from bin_counter.core.files import atomic_path


class TrainingInterrupted(BaseException):
    """SIGTERM or SIGINT arrived during training. A BaseException, as KeyboardInterrupt is: the handler raises it
    wherever the main thread is, and code that turns a bad image's Exception into a skip must not swallow it."""


@contextmanager
def interruptible():
    """Turn SIGTERM (what SageMaker sends before reclaiming a spot instance) and SIGINT into TrainingInterrupted."""
    if threading.current_thread() is not threading.main_thread():  # signals only reach the main thread
        yield
        return

    def handler(signum, frame):
        raise TrainingInterrupted(signal.Signals(signum).name)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def path_for(directory: str | Path, run_id: str) -> Path:
    return Path(directory) / f"{run_id}.pt"


def latest(directory: str | Path) -> Path:
    found = sorted(Path(directory).glob("*.pt"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise BinCounterError(f"--resume: no checkpoint in {directory}")
    return found[-1]


def plain(value):
    """numpy scalars and arrays as Python numbers and tensors, so that the file loads with weights_only=True."""
    if isinstance(value, dict):
        return {key: plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(plain(item) for item in value)
    if isinstance(value, np.ndarray):
        return torch.from_numpy(value.copy())
    if isinstance(value, np.generic):
        return value.item()
    return value


def rng_states() -> dict:
    """Every random generator's state, as tensors and plain Python types."""
    _, keys, position, has_gauss, cached_gauss = np.random.get_state()
    version, internal, gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "position": int(position),
                  "has_gauss": int(has_gauss), "cached_gauss": float(cached_gauss)},
        "python": {"version": version, "internal": list(internal), "gauss": gauss},
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def set_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    numpy = states["numpy"]
    np.random.set_state(("MT19937", numpy["keys"].numpy().astype(np.uint32), numpy["position"], numpy["has_gauss"],
                         numpy["cached_gauss"]))
    python = states["python"]
    random.setstate((python["version"], tuple(python["internal"]), python["gauss"]))
    if states["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def save(path: Path, epoch: int, net, optimizer, scheduler, scaler, progress: dict, loaders, run_id: str,
         config: dict) -> None:
    state = {
        "epoch": epoch, "run_id": run_id, "config": plain(config), "progress": plain(progress),
        "net": net.state_dict(), "optimizer": plain(optimizer.state_dict()), "scheduler": plain(scheduler.state_dict()),
        "scaler": plain(scaler.state_dict()), "rng": rng_states(),
        "loaders": [loader.generator.get_state() if loader.generator is not None else None for loader in loaders],
    }
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load(path: Path) -> dict:
    """The checkpoint at `path`, loaded with weights_only=True: tensors and plain types only, so a file from
    elsewhere (a shared folder, a restored S3 prefix) can never run code here. It must be the checkpoint of the
    run it is named for."""
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise BinCounterError(f"--resume: no checkpoint at {path}") from None
    except pickle.UnpicklingError as exc:
        if "weights only load failed" in str(exc).lower():
            raise BinCounterError(f"--resume: {path} refused: it holds objects other than tensors and plain values, "
                                  "which could run code when loaded") from None
        raise BinCounterError(f"--resume: {path} is corrupt ({one_line(exc)}); delete it to start over") from None
    except Exception as exc:  # truncated zip, empty file, not a torch file at all
        raise BinCounterError(f"--resume: {path} is corrupt ({type(exc).__name__}: {one_line(exc)}); "
                              "delete it to start over") from None
    if not isinstance(state, dict) or not isinstance(state.get("config"), dict):
        raise BinCounterError(f"--resume: {path} is not a bin_counter checkpoint")
    if state.get("run_id") != path.stem:
        raise BinCounterError(f"--resume: {path} belongs to run {state.get('run_id')}, not {path.stem}; "
                              "a checkpoint only resumes the run it was written for")
    return state


REQUIRED = ("epoch", "net", "optimizer", "scheduler", "scaler", "rng", "loaders", "progress")


def restore(state: dict, net, optimizer, scheduler, scaler, loaders) -> dict:
    missing = [key for key in REQUIRED if key not in state]
    if missing:
        raise BinCounterError(f"--resume: the checkpoint of run {state.get('run_id')} lacks {', '.join(missing)}")
    net.load_state_dict(state["net"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    scaler.load_state_dict(state["scaler"])
    set_rng_states(state["rng"])
    for loader, generator_state in zip(loaders, state["loaders"]):
        if generator_state is not None:
            loader.generator.set_state(generator_state)
    return state["progress"]
