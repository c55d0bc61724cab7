"""Loading a model directory (card + weights) onto a device, with its checksum verified."""

from __future__ import annotations

import contextlib
import logging
import pickle
import re
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from radq.blobs import sha256_of
from radq.errors import ModelError
from radq.model_card import ModelCard, discover_cards, read_card
from workers.models.arch import ARCHITECTURES

log = logging.getLogger(__name__)


PRECISION_NAMES: dict[torch.dtype | None, str] = {
    None: "fp32",
    torch.bfloat16: "bf16",
    torch.float16: "fp16",
}


@dataclass
class LoadedModel:
    card: ModelCard
    module: nn.Module
    device: torch.device
    channels_last: bool = False
    """Inputs go in channels-last memory format (the module was converted)."""
    autocast: torch.dtype | None = None
    """Mixed-precision dtype of the forward pass; None runs float32."""
    runner: nn.Module | None = None
    """What batched inference calls when it is not ``module`` itself: a traced and frozen graph
    (one C++ call per batch, no Python per layer) or a ``torch.compile`` module. Grad-CAM
    keeps using ``module``, whose layers it hooks."""

    @property
    def forward(self) -> nn.Module:
        return self.runner if self.runner is not None else self.module

    @property
    def precision(self) -> str:
        """What the forward pass computes in, as results record it: fp32, bf16 or fp16."""
        return PRECISION_NAMES[self.autocast]

    @property
    def key(self) -> str:
        return f"{self.card.name}@{self.card.version}"


def _weights_only_reason(exc: Exception) -> str:
    """The actionable part of torch's long weights_only error (which global or opcode)."""
    text = str(exc)
    found = re.search(r"[Uu]nsupported (?:global: )?GLOBAL [\w.]+|Unsupported operand \d+", text)
    if found:
        return found.group(0)
    if "TorchScript archive" in text:
        return "it is a TorchScript archive (a card loads it with weights_format: torchscript)"
    return text.strip().splitlines()[0] if text.strip() else type(exc).__name__


def read_checkpoint(path: Path) -> dict[str, Any]:
    """Read a weights file without ever unpickling code.

    ``.safetensors`` is read as is; ``.pt``, ``.pth`` and ``.pth.tar`` go through
    ``torch.load(weights_only=True)``, which only rebuilds tensors and plain containers.
    The result may still be a training checkpoint (nested dicts, epoch counters);
    :func:`workers.models.convert.normalize_state_dict` flattens those.

    Args:
        path: The weights file.

    Returns:
        The top-level dict of the file, on the CPU.

    Raises:
        ModelError: unsupported suffix, unreadable file, a pickle holding anything but
            tensors and plain containers, or a top level that is not a dict.
    """
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return dict(load_file(str(path), device="cpu"))
        except (SafetensorError, OSError) as exc:
            raise ModelError(f"{path}: cannot read safetensors file: {exc}") from None
    if path.suffix not in (".pt", ".pth") and not path.name.endswith(".pth.tar"):
        raise ModelError(f"{path}: unsupported weights format (use .safetensors, .pt or .pth)")
    try:
        with warnings.catch_warnings():
            # torch warns about pickle protocols and TorchScript zips before failing; the error says it.
            warnings.simplefilter("ignore", UserWarning)
            state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError) as exc:
        raise ModelError(
            f"refusing to unpickle {path}: not a plain state dict "
            f"(weights_only load failed: {_weights_only_reason(exc)})"
        ) from None
    except (OSError, EOFError) as exc:
        raise ModelError(f"{path}: cannot read weights: {str(exc) or type(exc).__name__}") from None
    if not isinstance(state, dict):
        raise ModelError(f"{path}: expected a state dict, found {type(state).__name__}")
    return state


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    state = read_checkpoint(path)
    odd = [k for k, v in state.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if odd:
        raise ModelError(
            f"{path}: not a flat state dict of tensors (e.g. entry {odd[0]!r}); "
            "convert it with `radq models import`"
        )
    return state


def load_model(model_dir: Path, device: torch.device) -> LoadedModel:
    """Load a model directory's verified weights onto ``device``, in eval mode.

    A ``state_dict`` card builds its architecture and loads the weights strictly; a
    ``torchscript`` card loads the archive with ``torch.jit.load`` (its architecture
    is then informational). The sha256 is checked before anything is deserialised.

    Raises:
        ModelError: unknown architecture, missing weights, checksum mismatch, a weights
            file refused as unsafe, or weights that do not fit the architecture.
    """
    card = read_card(model_dir)
    factory = ARCHITECTURES.get(card.architecture)
    if factory is None and card.weights_format == "state_dict":
        known = ", ".join(sorted(ARCHITECTURES))
        raise ModelError(f"{card.name}: unknown architecture {card.architecture!r} (known: {known})")
    weights = model_dir / card.weights
    if not weights.is_file():
        raise ModelError(f"{card.name}: weights file {weights} is missing")
    actual = sha256_of(weights)
    if actual != card.sha256:
        raise ModelError(
            f"{card.name}: weights {weights.name} have sha256 {actual}, the card says {card.sha256}"
        )
    module: nn.Module
    if card.weights_format == "torchscript":
        try:
            module = torch.jit.load(str(weights), map_location=device)
        except (RuntimeError, ValueError) as exc:
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ModelError(
                f"{card.name}: {weights.name} is not a loadable TorchScript archive: {reason}"
            ) from None
    else:
        assert factory is not None
        module = factory(
            in_channels=card.input.channels, num_classes=len(card.labels), **card.architecture_params
        )
        try:
            module.load_state_dict(_read_state_dict(weights), strict=True)
        except RuntimeError as exc:
            raise ModelError(f"{card.name}: weights do not fit {card.architecture}: {exc}") from None
    module.eval().to(device)
    return LoadedModel(card=card, module=module, device=device)


def cpu_computes_bf16() -> bool:
    """Whether this CPU has bf16 arithmetic in hardware (AVX512-BF16 or AMX tiles), as torch sees it.

    torch exposes the probes privately only; a torch without them counts as no.
    """
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in probes)


@dataclass(frozen=True)
class Runtime:
    """How a worker runs its models: settings that apply to every model it loads."""

    device: torch.device
    precision: str = "auto"
    channels_last: bool = True
    compile: str = "auto"

    def autocast_for(self, card: ModelCard) -> torch.dtype | None:
        """The autocast dtype of ``card``'s forward passes; None runs float32.

        ``auto``: fp16 on CUDA; bf16 on a CPU that computes it natively (AVX512-BF16 or AMX),
        where oneDNN's bf16 kernels ran DenseNet-121 1.8-2.0x and ResNet-18 1.75x faster than
        float32 (2-core EPYC; probabilities within 0.002); float32 on other CPUs.
        """
        if not card.mixed_precision or self.precision == "fp32":
            return None
        if self.precision == "auto":
            if self.device.type == "cuda":
                return torch.float16
            return torch.bfloat16 if self.device.type == "cpu" and cpu_computes_bf16() else None
        return torch.float16 if self.precision == "fp16" else torch.bfloat16

    def compilation_for(self, card: ModelCard) -> str:
        """``trace``, ``inductor`` or ``off`` for this model on this device."""
        if self.compile != "auto":
            return self.compile
        # Traced + frozen DenseNet-121 ran 24.9 img/s on the 2-core CPU against 20.1 eager
        # (oneDNN fusions, no Python per layer); traced under bf16 autocast, 45.7 img/s per
        # thread against 39.4 eager (Xeon with AMX). On CUDA autocast runs the eager module.
        traceable = card.weights_format == "state_dict" and self.device.type == "cpu"
        return "trace" if traceable else "off"


TRACE_TOLERANCE: dict[torch.dtype | None, tuple[float, float]] = {
    None: (1e-4, 1e-3),
    torch.bfloat16: (5e-2, 5e-2),
    torch.float16: (5e-2, 5e-2),
}
"""(atol, rtol) within which a traced graph must reproduce its eager module, per autocast
dtype, or it is refused: float32 graphs differ by rounding; under bf16 the frozen graph
folds batch norm into bf16 weights (logits moved by up to 0.004 for the bundled models);
a graph that traced wrong differs by far more."""


def _traced(
    model: LoadedModel, module: nn.Module, channels_last: bool, autocast: torch.dtype | None
) -> nn.Module | None:
    """``module`` traced and frozen, if the graph gives the eager outputs; else None (logged).

    Traced under ``autocast``, the graph holds its casts (and weights frozen in the
    lower precision): it runs mixed precision whether or not it is called under autocast.
    """
    spec = model.card.input
    example = torch.randn(2, spec.channels, spec.height, spec.width, device=model.device)
    if channels_last:
        example = example.contiguous(memory_format=torch.channels_last)
    precision: contextlib.AbstractContextManager[object] = contextlib.nullcontext()
    if autocast is not None:
        precision = torch.autocast(model.device.type, dtype=autocast)
    atol, rtol = TRACE_TOLERANCE[autocast]
    try:
        with torch.inference_mode(), precision:
            graph = torch.jit.freeze(torch.jit.trace(module, example, check_trace=False))
            odd = torch.cat([example, example[:1]])  # another batch size than the trace's
            traced, eager = graph(odd).float(), module(odd).float()
            if not torch.allclose(traced, eager, atol=atol, rtol=rtol):
                worst = (traced - eager).abs().max().item()
                raise ValueError(f"traced outputs differ from the eager module's by up to {worst:.3g}")
    except Exception as exc:  # a model that does not trace still runs, eagerly
        log.warning("%s: running eagerly, tracing failed: %s", model.key, exc)
        return None
    return cast(nn.Module, graph)


def prepare_for_runtime(model: LoadedModel, runtime: Runtime) -> LoadedModel:
    """Apply the runtime's memory format, precision and compilation to a loaded model."""
    module = model.module
    channels_last = runtime.channels_last and model.card.weights_format == "state_dict"
    if channels_last:
        module = module.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    runner: nn.Module | None = None
    autocast = runtime.autocast_for(model.card)
    compilation = runtime.compilation_for(model.card)
    if compilation == "trace":
        runner = _traced(model, module, channels_last, autocast)
    elif compilation == "inductor":
        runner = cast(nn.Module, torch.compile(module))
    return LoadedModel(model.card, module, model.device, channels_last, autocast, runner)


class ModelRegistry:
    """Models of one worker process, each loaded once on first use (from any thread)."""

    def __init__(self, root: Path, runtime: Runtime) -> None:
        self.root = root
        self.runtime = runtime
        self.device = runtime.device
        self._loaded: dict[str, LoadedModel] = {}
        self._lock = threading.Lock()

    def auto_names(self) -> list[str]:
        """The models a job asking for ``auto`` runs (cards with ``auto_route``)."""
        return [name for name, (_, card) in discover_cards(self.root).items() if card.auto_route]

    def loaded(self, name: str) -> LoadedModel | None:
        """The model if it is loaded already, else None; never waits (a load holds the lock)."""
        return self._loaded.get(name)

    def get(self, name: str) -> LoadedModel:
        with self._lock:
            if name not in self._loaded:
                cards = discover_cards(self.root)
                if name not in cards:
                    raise ModelError(f"model {name!r} not found in {self.root}")
                loaded = load_model(cards[name][0], self.device)
                self._loaded[name] = prepare_for_runtime(loaded, self.runtime)
            return self._loaded[name]
