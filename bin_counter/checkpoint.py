"""Checkpoints at every epoch end, and SIGTERM/Ctrl-C handling, so an interrupted training (a spot instance
reclaimed, a user's Ctrl-C) resumes from its last finished epoch and reaches the result an uninterrupted run would:
the weights, optimiser, scheduler, best-epoch bookkeeping and every random generator are saved together.
"""
from __future__ import annotations

import random
import signal
import threading
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from bin_counter import BinCounterError
from bin_counter.files import atomic_path


class TrainingInterrupted(Exception):
    """SIGTERM or SIGINT arrived during training."""


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


def save(path: Path, epoch: int, net, optimizer, scheduler, scaler, progress: dict, loaders, run_id: str,
         config: dict) -> None:
    state = {
        "epoch": epoch, "run_id": run_id, "config": config, "progress": progress,
        "net": net.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(),
        "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
        "loaders": [loader.generator.get_state() if loader.generator is not None else None for loader in loaders],
    }
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=False)  # our own file: optimiser state, RNG tuples
    except FileNotFoundError:
        raise BinCounterError(f"--resume: no checkpoint at {path}") from None


def restore(state: dict, net, optimizer, scheduler, scaler, loaders) -> dict:
    net.load_state_dict(state["net"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    scaler.load_state_dict(state["scaler"])
    torch.set_rng_state(state["rng"]["torch"])
    np.random.set_state(state["rng"]["numpy"])
    random.setstate(state["rng"]["python"])
    if state["rng"]["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    for loader, generator_state in zip(loaders, state["loaders"]):
        if generator_state is not None:
            loader.generator.set_state(generator_state)
    return state["progress"]
