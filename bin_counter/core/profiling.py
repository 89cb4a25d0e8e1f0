"""Profiler report: where training time goes, from any machine, into the MLflow run.

`train --profile` times every step's phases (data loading, forward, backward, optimiser), samples CPU/GPU
utilisation and memory in a background thread, runs torch.profiler over a wait/warmup/active schedule, and writes
one self-contained HTML report (plots embedded) plus a markdown summary, the Chrome trace and the top-operators
table. With a frozen backbone and the solved head, a step is one batch of the feature pass (the wait for decoded,
resized images, then the model), the operators are ONNX Runtime's own (its profiler) when it runs the backbone,
and the solve's time is reported beside it. Without --profile, training uses `NO_PROFILE`, whose hooks do nothing.
"""
from __future__ import annotations

import base64
import html
import io
import json
import threading
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

PHASES = ("data", "forward", "backward", "optimizer")
# a feature pass has no backward or optimiser: its data phase is decoding and resizing, its forward the backbone
FEATURE_PASS_PHASES = {"data": "data (decode + resize, waiting for the loader)", "forward": "forward (backbone)"}


class NoProfile:
    """The hooks the training loop calls; all no-ops, so an unprofiled run pays nothing."""

    engine_profile_prefix = None  # where an ONNX Runtime session writes its profile (None: no profiling)

    def phase(self, name: str):
        return nullcontext()

    def engine_done(self, engine) -> None:
        pass

    def data_wait(self, seconds: float) -> None:
        pass

    def step(self, batch_size: int) -> None:
        pass


NO_PROFILE = NoProfile()


class UtilisationSampler(threading.Thread):
    """CPU %, process memory and (through nvidia-ml-py, when present) GPU % and memory, every `interval` s."""

    def __init__(self, interval: float = 0.5):
        super().__init__(daemon=True)
        import psutil

        self.interval, self.samples, self._halt = interval, [], threading.Event()
        self.process = psutil.Process()
        self.psutil = psutil
        self.gpu = None
        if torch.cuda.is_available():
            try:
                import pynvml

                pynvml.nvmlInit()
                self.gpu = (pynvml, pynvml.nvmlDeviceGetHandleByIndex(torch.cuda.current_device()))
            except Exception:  # no NVML: GPU figures come from torch's allocator only
                self.gpu = None
        self.psutil.cpu_percent(None)
        self.start_time = time.perf_counter()

    def run(self) -> None:
        while not self._halt.wait(self.interval):
            sample = {"t": time.perf_counter() - self.start_time, "cpu_percent": self.psutil.cpu_percent(None),
                      "rss_mb": self.process.memory_info().rss / 2**20}
            if self.gpu:
                nvml, handle = self.gpu
                sample["gpu_percent"] = nvml.nvmlDeviceGetUtilizationRates(handle).gpu
                sample["gpu_mem_mb"] = nvml.nvmlDeviceGetMemoryInfo(handle).used / 2**20
            elif torch.cuda.is_available():
                sample["gpu_mem_mb"] = torch.cuda.memory_allocated() / 2**20
            self.samples.append(sample)

    def stop(self) -> pd.DataFrame:
        self._halt.set()
        self.join(timeout=5)
        return pd.DataFrame(self.samples)


@dataclass
class Profile:
    """Collects step timings and drives torch.profiler; `write_report()` turns them into files."""

    device: torch.device
    batch_size: int
    out: Path  # where the trace goes: the caller's folder, which it removes (a temporary one would be left behind)
    wait: int = 1
    warmup: int = 1
    active: int = 3
    steps: list[dict] = field(default_factory=list)
    stage: str = "training epoch"  # or "feature pass": what one step is
    solve_seconds: float | None = None  # the solved head's fit, after the feature pass

    def __post_init__(self):
        self._current: dict = {}
        self.engine_profiles: list[Path] = []
        self.engine = "torch"
        activities = [torch.profiler.ProfilerActivity.CPU]
        if self.device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        # an epoch repeats one step, so a few steps tell; a feature pass is bounded and may be a handful of batches
        schedule = None if self.stage == "feature pass" else torch.profiler.schedule(
            wait=self.wait, warmup=self.warmup, active=self.active, repeat=1)
        self.torch_profiler = torch.profiler.profile(
            activities=activities, schedule=schedule,
            record_shapes=True, profile_memory=True,
            on_trace_ready=lambda prof: prof.export_chrome_trace(str(self.out / "trace.json")))
        self.sampler = UtilisationSampler()

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        self.sampler.start()
        self.torch_profiler.__enter__()
        return self

    def __exit__(self, *exc):
        self.torch_profiler.__exit__(*exc)
        self.utilisation = self.sampler.stop()
        return False

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()  # GPU work is asynchronous: without this, time lands in the wrong phase

    @contextmanager
    def phase(self, name: str):
        self._sync()
        start = time.perf_counter()
        with torch.profiler.record_function(name):
            yield
        self._sync()
        self._current[name] = time.perf_counter() - start

    def data_wait(self, seconds: float) -> None:
        self._current["data"] = seconds

    @property
    def engine_profile_prefix(self) -> Path:
        return self.out / "onnxruntime"

    def engine_done(self, engine) -> None:
        """An inference engine finished its batches: keep ONNX Runtime's profile of them."""
        self.engine = engine.name
        session = getattr(engine, "session", None)
        if session is not None:
            self.engine_profiles.append(Path(session.end_profiling()))

    def step(self, batch_size: int) -> None:
        self.steps.append({**{p: self._current.get(p, 0.0) for p in PHASES}, "images": batch_size})
        self._current = {}
        self.torch_profiler.step()

    # ---- the report ------------------------------------------------------------------------------------

    def step_table(self) -> pd.DataFrame:
        frame = pd.DataFrame(self.steps)
        frame["total"] = frame[list(PHASES)].sum(axis=1)
        return frame

    def top_operators(self, rows: int = 15) -> str:
        if self.engine_profiles:
            return onnx_operator_table(self.engine_profiles, rows)
        try:
            key = "self_cuda_time_total" if self.device.type == "cuda" else "self_cpu_time_total"
            return self.torch_profiler.key_averages().table(sort_by=key, row_limit=rows)
        except (AssertionError, RuntimeError):  # fewer steps than the schedule needs: nothing was recorded
            return "(no profiled steps: the run had fewer steps than wait + warmup + active)"

    def summary(self) -> dict:
        steps = self.step_table()
        total = steps["total"].sum()
        util = self.utilisation
        out = {
            "steps": len(steps), "step_ms_median": float(steps["total"].median() * 1000) if len(steps) else 0.0,
            "images_per_s": float(steps["images"].sum() / total) if total else 0.0,
            **{f"{p}_share": float(steps[p].sum() / total) if total else 0.0 for p in PHASES},
            "cpu_percent_mean": float(util["cpu_percent"].mean()) if "cpu_percent" in util else float("nan"),
            "peak_rss_mb": float(util["rss_mb"].max()) if "rss_mb" in util else float("nan"),
            "batch_size": self.batch_size, "device": self.device.type, "stage": self.stage, "engine": self.engine,
        }
        if self.solve_seconds is not None:
            out["solve_seconds"] = float(self.solve_seconds)
        if "gpu_percent" in util:
            out["gpu_percent_mean"] = float(util["gpu_percent"].mean())
        if self.device.type == "cuda":
            out["peak_gpu_mem_mb"] = torch.cuda.max_memory_allocated() / 2**20
        return out


def onnx_events(paths: list[Path]) -> list[dict]:
    return [event for path in paths for event in json.loads(Path(path).read_text())]


def onnx_operator_table(paths: list[Path], rows: int = 15) -> str:
    """ONNX Runtime's per-operator time, summed over every node run its profiler recorded."""
    kernels = [e for e in onnx_events(paths) if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time")]
    if not kernels:
        return "(ONNX Runtime recorded no operator runs)"
    frame = pd.DataFrame({"operator": [e.get("args", {}).get("op_name", "?") for e in kernels],
                          "us": [float(e.get("dur", 0)) for e in kernels]})
    table = frame.groupby("operator")["us"].agg(calls="count", total_ms="sum").sort_values("total_ms", ascending=False)
    table["share"] = (table["total_ms"] / table["total_ms"].sum()).map("{:.1%}".format)
    table["total_ms"] = (table["total_ms"] / 1000).round(1)
    table["ms_per_call"] = (table["total_ms"] / table["calls"]).round(3)
    return ("ONNX Runtime per-operator time (its profiler, every batch of the feature pass)\n"
            + table.head(rows).to_string())


def profiler_findings(summary: dict) -> list[tuple[str, str]]:
    """SageMaker-profiler-style rules: (rule, what triggered it and what to change)."""
    found = []
    if summary["data_share"] > 0.5:
        found.append(("data_loader_bound", f"data loading takes {summary['data_share']:.0%} of step time; raise "
                      "--num-workers, keep the feature cache on, or store images resized"))
    gpu = summary.get("gpu_percent_mean")
    if gpu is not None and gpu < 50:
        found.append(("low_gpu_utilisation", f"GPU busy {gpu:.0f}% on average; raise the batch size or feed data "
                      "faster (more workers, pinned memory)"))
    cpu = summary["cpu_percent_mean"]
    if summary["device"] == "cpu" and cpu < 50:
        found.append(("low_cpu_utilisation", f"CPU busy {cpu:.0f}% on average (all cores); raise --num-workers "
                      "or the batch size, or the machine is shared"))
    if summary["cpu_percent_mean"] > 90 and (gpu is None or gpu < 50) and summary["device"] == "cuda":
        found.append(("cpu_bottleneck", f"CPU at {summary['cpu_percent_mean']:.0f}% while the GPU waits; move "
                      "preprocessing off the critical path"))
    if summary["batch_size"] < 16:
        found.append(("batch_too_small", f"batch size {summary['batch_size']} < 16 leaves the hardware idle between "
                      "steps; raise --batch-size"))
    return found


def _png(figure) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    return base64.b64encode(buffer.getvalue()).decode()


def report_figures(profile: Profile) -> dict[str, str]:
    from matplotlib.figure import Figure  # outside pyplot: no backend, nothing global

    def subplots(*grid, figsize):
        figure = Figure(figsize=figsize)
        return figure, figure.subplots(*grid)

    steps = profile.step_table()
    figures = {}
    fig, ax = subplots(figsize=(8, 3.2))
    bottom = np.zeros(len(steps))
    for p in PHASES:
        ax.bar(range(len(steps)), steps[p] * 1000, bottom=bottom, label=p)
        bottom += steps[p].to_numpy() * 1000
    ax.set_xlabel("step")
    ax.set_ylabel("ms")
    ax.set_title("Step time by phase")
    ax.legend(ncols=4, fontsize=8)
    figures["steps"] = _png(fig)

    util = profile.utilisation
    fig, axes = subplots(1, 2, figsize=(10, 3.2))
    if len(util):
        axes[0].plot(util["t"], util["cpu_percent"], label="CPU %")
        if "gpu_percent" in util:
            axes[0].plot(util["t"], util["gpu_percent"], label="GPU %")
        axes[1].plot(util["t"], util["rss_mb"], label="process RSS (MB)")
        if "gpu_mem_mb" in util:
            axes[1].plot(util["t"], util["gpu_mem_mb"], label="GPU memory (MB)")
    axes[0].set_ylim(0, 105)
    axes[1].ticklabel_format(axis="y", useOffset=False, style="plain")
    for ax, title in zip(axes, ("Utilisation over time", "Memory over time")):
        ax.set_title(title)
        ax.set_xlabel("seconds")
        ax.legend(fontsize=8)
    figures["utilisation"] = _png(fig)
    return figures


def write_report(profile: Profile, debugger_findings: list, out: Path) -> dict[str, Path]:
    """profiler_report.html (self-contained), profiler_summary.md, top_operators.txt, trace.json."""
    summary = profile.summary()
    findings = profiler_findings(summary)
    figures = report_figures(profile)
    ops = profile.top_operators()
    labels = FEATURE_PASS_PHASES if profile.stage == "feature pass" else {}
    phases = "".join(f"<tr><td>{labels.get(p, p)}</td><td>{summary[p + '_share']:.1%}</td></tr>" for p in PHASES)
    rules = "".join(f"<li><b>{html.escape(r)}</b>: {html.escape(m)}</li>" for r, m in findings) or "<li>none</li>"
    debug = "".join(f"<li><b>{html.escape(f.rule)}</b> (epoch {f.epoch}): {html.escape(f.message)}</li>"
                    for f in debugger_findings) or "<li>none</li>"
    facts = "".join(f"<tr><td>{html.escape(k)}</td><td>{v:.4g}</td></tr>" if isinstance(v, float)
                    else f"<tr><td>{html.escape(k)}</td><td>{html.escape(str(v))}</td></tr>"
                    for k, v in summary.items())
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>bin_counter profiler report</title>
<style>body{{font-family:sans-serif;max-width:1000px;margin:2em auto;color:#222}} td{{padding:2px 10px}}
pre{{font-size:11px;overflow-x:auto;background:#f6f6f6;padding:8px}} h2{{border-bottom:1px solid #ccc}}</style>
</head><body><h1>Profiler report</h1>
<h2>Summary</h2><table>{facts}</table>
<h2>Step time breakdown</h2><table>{phases}</table><img src="data:image/png;base64,{figures['steps']}">
<h2>Utilisation and memory</h2><img src="data:image/png;base64,{figures['utilisation']}">
<h2>Profiler findings</h2><ul>{rules}</ul>
<h2>Debugger findings</h2><ul>{debug}</ul>
<h2>Top operators</h2><pre>{html.escape(ops)}</pre>
</body></html>"""
    out.mkdir(parents=True, exist_ok=True)
    paths = {"report": out / "profiler_report.html", "summary": out / "profiler_summary.md",
             "operators": out / "top_operators.txt"}
    paths["report"].write_text(page)
    paths["operators"].write_text(ops)
    lines = ["# Profiler summary", "", f"- images/s: {summary['images_per_s']:.1f}",
             f"- median step: {summary['step_ms_median']:.1f} ms",
             *[f"- {labels.get(p, p)}: {summary[p + '_share']:.1%} of step time" for p in PHASES],
             *([f"- solve (after the feature pass): {summary['solve_seconds']:.2f} s"] if "solve_seconds" in summary
               else []),
             f"- mean CPU utilisation: {summary['cpu_percent_mean']:.0f}%",
             f"- peak RSS: {summary['peak_rss_mb']:.0f} MB",
             "", "## Findings", *([f"- **{r}**: {m}" for r, m in findings] or ["- none"]),
             "", "## Debugger", *([f"- **{f.rule}** (epoch {f.epoch}): {f.message}" for f in debugger_findings]
                                   or ["- none"])]
    paths["summary"].write_text("\n".join(lines) + "\n")
    if (profile.out / "trace.json").exists():
        paths["trace"] = profile.out / "trace.json"
    if profile.engine_profiles:  # Chrome-trace events too: one file for every session of the pass
        paths["engine_trace"] = out / "onnxruntime_trace.json"
        paths["engine_trace"].write_text(json.dumps(onnx_events(profile.engine_profiles)))
    return paths
