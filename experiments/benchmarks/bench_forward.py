"""Forward throughput per backbone at batch 32: eager vs channels_last vs torch.compile, one run.

    python experiments/benchmarks/bench_forward.py [--backbones efficientnet-lite0,efficientnet-b0,resnet50]
Weights do not change speed, so the architectures are built without pretrained weights.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

from bin_counter.core.models import create_model  # noqa: E402


def images_per_second(model, batch: torch.Tensor, iterations: int) -> float:
    with torch.inference_mode():
        model(batch)  # warm-up (and compilation)
        model(batch)
        start = time.perf_counter()
        for _ in range(iterations):
            model(batch)
        return iterations * len(batch) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--backbones", default="efficientnet-lite0,efficientnet-b0,resnet50")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument("--no-compile", action="store_true")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(f"device {device}, torch {torch.__version__}, threads {torch.get_num_threads()}, batch {args.batch_size}")
    print("| backbone | eager img/s | channels_last img/s | compile img/s | channels_last/eager | compile/eager |")
    print("|---|---|---|---|---|---|")
    for name in args.backbones.split(","):
        model = create_model(name, 5, pretrained=False).eval().to(device)
        batch = torch.rand(args.batch_size, 3, 224, 224, device=device)
        eager = images_per_second(model, batch, args.iterations)
        cl_model = model.to(memory_format=torch.channels_last)
        channels_last = images_per_second(cl_model, batch.to(memory_format=torch.channels_last), args.iterations)
        model = model.to(memory_format=torch.contiguous_format)
        compiled = float("nan")
        if not args.no_compile:
            compiled = images_per_second(torch.compile(model), batch, args.iterations)
        print(f"| {name} | {eager:.1f} | {channels_last:.1f} | {compiled:.1f} | {channels_last / eager:.2f} | "
              f"{compiled / eager:.2f} |", flush=True)


if __name__ == "__main__":
    main()
