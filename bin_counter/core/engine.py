"""The PyTorch side of inference: eager forward passes (CUDA + AMP where a GPU is), the ONNX export of the
counting model, int8 quantisation, and the choice between them and ONNX Runtime (`core.inference`).

On CPU the model is the whole cost of checking a bin, and ONNX Runtime runs these convnets several times faster
than eager PyTorch (experiments/benchmarks/bench_inference.py). So the logged model carries an ONNX graph of the
whole counting model, test-time views included (the four flips/transposes are one batched forward inside the
graph), exported once when the model is logged; loading it needs neither a compiler nor PyTorch's exporter.
ONNX Runtime missing, or a model logged before the graph existed, falls back to PyTorch with a warning.
"""
from __future__ import annotations

import copy
import io
import logging
import tempfile
import threading
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import torch
from torch import nn

from bin_counter import one_line
from bin_counter.core.data import dihedral_views
from bin_counter.core.inference import INPUT, OUTPUT, OnnxSession, onnx_runtime_missing, requested_engine

log = logging.getLogger(__name__)

OPSET = 17


def mean_over_views(net: nn.Module, views: torch.Tensor) -> torch.Tensor:
    """(B, V, ...) views of each sample (images, or their cached features) -> (B, K) class probabilities averaged
    over the views, every view of every sample in one batched forward. The one test-time-augmentation average."""
    batch, count = views.shape[:2]
    return torch.softmax(net(views.flatten(0, 1)).float(), dim=1).view(batch, count, -1).mean(1)


class ViewAveraged(nn.Module):
    """Class probabilities of each image, averaged over its test-time views, all views in one batched forward
    (one large batch keeps the CPU's cores busier than four small ones)."""

    def __init__(self, model: nn.Module, tta: bool):
        super().__init__()
        self.model, self.tta = model, tta

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        views = torch.stack(dihedral_views(images), dim=1) if self.tta else images[:, None]
        return mean_over_views(self.model, views)


class FeaturesOnly(nn.Module):
    """The counting model without its head: the pooled features of the frozen backbone, what the feature cache
    stores."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.features(images)


_EXPORTING = threading.Lock()  # the TorchScript exporter keeps global state: one export at a time per process


def export_onnx(module: nn.Module, image_size: int) -> bytes:
    """`module` (square images of `image_size` -> one output) as an ONNX graph with a free batch size."""
    module = copy.deepcopy(module).eval().cpu()  # the caller's model stays where it is, in the mode it is in
    example = torch.zeros(2, 3, image_size, image_size)
    graph = io.BytesIO()
    # the TorchScript exporter: seconds on CPU and no onnxscript; its deprecation warning is not the user's business
    # (tune's parallel trials are threads: without the lock, two exports fail "in_onnx_export must be False")
    with _EXPORTING, warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (example,), graph, input_names=[INPUT], output_names=[OUTPUT],
                          dynamic_axes={INPUT: {0: "batch"}, OUTPUT: {0: "batch"}}, opset_version=OPSET,
                          dynamo=False)
    return graph.getvalue()


class Engine(Protocol):
    name: str

    def __call__(self, images: torch.Tensor) -> torch.Tensor: ...


class TorchEngine:
    """Eager PyTorch: CUDA with autocast where a GPU is, channels_last on CPU (CountingModel.features)."""
    name = "torch"

    def __init__(self, module: nn.Module, device: torch.device):
        self.module, self.device = module.eval().to(device), device

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        images = images.to(self.device, non_blocking=True)
        with torch.autocast(self.device.type, enabled=self.device.type == "cuda"):
            return self.module(images).float().cpu()


class OnnxEngine(OnnxSession):
    """ONNX Runtime for callers holding torch tensors (training's feature pass, the profiler)."""

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.run(images.detach().cpu().numpy()))


def use_onnx(device: torch.device, graph: Path | None = None, graph_needed: bool = True) -> bool:
    """Whether to run ONNX Runtime; says (once, as a warning) why not when it was asked for or expected."""
    wanted = requested_engine()
    if wanted == "torch" or (wanted is None and device.type == "cuda"):
        return False
    reason = onnx_runtime_missing()
    if reason is None and graph_needed and (graph is None or not Path(graph).is_file()):
        reason = "the model has no ONNX graph (logged by an older version)"
    if reason:
        log.warning("running eager PyTorch: %s", reason)
        return False
    return True


def probability_engine(model: nn.Module | Callable[[], nn.Module], tta: bool, device: torch.device,
                       graph: str | Path | None, int8: bool = False) -> Engine:
    """The engine of a logged model: its ONNX graph, or its weights in eager PyTorch. `model` may be a function
    that builds it, so that a process that runs the graph never loads the weights."""
    if use_onnx(device, Path(graph) if graph else None):
        try:
            return OnnxEngine(graph)
        except Exception as exc:  # a corrupt or unsupported graph: the weights still count
            log.warning("running eager PyTorch: ONNX Runtime cannot load %s (%s)", graph, one_line(exc))
    if int8:  # the int8 graph is what was asked for; these are the fp32 weights it was made from
        log.warning("running the fp32 weights in eager PyTorch, not the model's int8 graph: counts can differ "
                    "from the int8 model's")
    module = model if isinstance(model, nn.Module) else model()
    return TorchEngine(ViewAveraged(module, tta), device)


def feature_engine(model: nn.Module, image_size: int, device: torch.device,
                   profile_prefix: Path | None = None) -> Engine:
    """The frozen backbone for feature extraction; on CPU exported to ONNX first (seconds, paid once per
    extraction, against minutes of extraction). `profile_prefix` turns on ONNX Runtime's profiler."""
    if not use_onnx(device, graph_needed=False):
        return TorchEngine(FeaturesOnly(model), device)
    return OnnxEngine(export_onnx(FeaturesOnly(model), image_size), profile_prefix)


def quantize_int8(graph: bytes, calibration: list[torch.Tensor]) -> bytes:
    """`graph` with int8 weights and activations (static, QDQ, per channel), activation ranges calibrated on
    `calibration`, batches of real training images. VNNI/AVX-512 CPUs run it 2-2.5x faster than fp32."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Batches(CalibrationDataReader):
        def __init__(self):
            self.batches = iter(calibration)

        def get_next(self):
            batch = next(self.batches, None)
            return None if batch is None else {INPUT: batch.numpy()}

    with tempfile.TemporaryDirectory() as tmp:  # the quantiser reads and writes files only
        fp32, prepared, int8 = (Path(tmp) / name for name in ("fp32.onnx", "prepared.onnx", "int8.onnx"))
        fp32.write_bytes(graph)
        quant_pre_process(str(fp32), str(prepared))
        quantize_static(str(prepared), str(int8), Batches(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
        return int8.read_bytes()
