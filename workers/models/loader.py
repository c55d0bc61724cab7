"""Loading a model directory (card + weights) onto a device, with its checksum verified."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from radq.errors import ModelError
from radq.model_card import ModelCard, discover_cards, read_card
from workers.models.arch import ARCHITECTURES


@dataclass
class LoadedModel:
    card: ModelCard
    module: nn.Module
    device: torch.device

    @property
    def key(self) -> str:
        return f"{self.card.name}@{self.card.version}"


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1024 * 1024):
            digest.update(chunk)
    return digest.hexdigest()


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    if path.suffix in (".pt", ".pth"):
        # weights_only: never unpickle arbitrary objects from a model file.
        state = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(state, dict):
            raise ModelError(f"{path}: expected a state dict, found {type(state).__name__}")
        return state
    raise ModelError(f"{path}: unsupported weights format (use .safetensors, .pt or .pth)")


def load_model(model_dir: Path, device: torch.device) -> LoadedModel:
    """Build the card's architecture, load verified weights, and move it to ``device``.

    Raises:
        ModelError: unknown architecture, missing weights, checksum mismatch, or
            weights that do not fit the architecture.
    """
    card = read_card(model_dir)
    factory = ARCHITECTURES.get(card.architecture)
    if factory is None:
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
    module = factory(
        in_channels=card.input.channels, num_classes=len(card.labels), **card.architecture_params
    )
    try:
        module.load_state_dict(_read_state_dict(weights), strict=True)
    except RuntimeError as exc:
        raise ModelError(f"{card.name}: weights do not fit {card.architecture}: {exc}") from None
    module.eval().to(device)
    return LoadedModel(card=card, module=module, device=device)


class ModelRegistry:
    """Models of one worker process, each loaded once on first use."""

    def __init__(self, root: Path, device: torch.device) -> None:
        self.root = root
        self.device = device
        self._loaded: dict[str, LoadedModel] = {}

    def get(self, name: str) -> LoadedModel:
        if name not in self._loaded:
            cards = discover_cards(self.root)
            if name not in cards:
                raise ModelError(f"model {name!r} not found in {self.root}")
            self._loaded[name] = load_model(cards[name][0], self.device)
        return self._loaded[name]
