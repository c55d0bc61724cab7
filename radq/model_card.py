"""The model card: what a model directory declares about itself.

A model directory holds ``model.json`` (or ``model.yaml``) and a weights file whose
sha256 the card records. The API reads cards to validate job requests; workers read
them to load and feed the model.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, Field, ValidationError

from radq.errors import ModelError

CARD_NAMES = ("model.json", "model.yaml", "model.yml")


class Window(BaseModel):
    """A VOI window in modality units (e.g. Hounsfield units for CT)."""

    center: float
    width: float = Field(gt=0)


class InputSpec(BaseModel):
    """Shape of one model input: ``channels x height x width`` float32."""

    height: int = Field(gt=0, le=4096)
    width: int = Field(gt=0, le=4096)
    channels: Literal[1, 3] = 1


class Preprocessing(BaseModel):
    """How pixels become a model input.

    ``windows`` maps a Modality (``CT``) to the window applied to it, overriding the
    file's own VOI; other modalities use the file's VOI LUT or window, then min-max.
    The windowed image is scaled to [0, 1], then normalised with ``mean``/``std``.
    """

    windows: dict[str, Window] = Field(default_factory=dict)
    mean: list[float] = Field(default_factory=lambda: [0.5])
    std: list[float] = Field(default_factory=lambda: [0.25])
    frame: Literal["middle", "first"] = "middle"


class AppliesTo(BaseModel):
    """Which instances a model applies to; an empty list means any."""

    modalities: list[str] = Field(default_factory=list)


class ModelCard(BaseModel):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    version: str
    task: str
    architecture: str
    architecture_params: dict[str, Any] = Field(default_factory=dict)
    labels: list[str] = Field(min_length=1)
    input: InputSpec
    preprocessing: Preprocessing = Field(default_factory=Preprocessing)
    output_activation: Literal["sigmoid", "softmax"] = "sigmoid"
    study_summary: Literal["max", "mean"] = "max"
    applies_to: AppliesTo = Field(default_factory=AppliesTo)
    weights: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    intended_use: str
    limitations: str
    training_data: str
    license: str

    @property
    def preprocessing_recipe(self) -> str:
        """A compact, stable description of the preprocessing, stored with each result."""
        return self.preprocessing.model_dump_json() + "|" + self.input.model_dump_json()


def find_card(model_dir: Path) -> Path:
    for name in CARD_NAMES:
        if (model_dir / name).is_file():
            return model_dir / name
    raise ModelError(f"{model_dir}: no model card (expected one of {', '.join(CARD_NAMES)})")


def read_card(model_dir: Path) -> ModelCard:
    """Parse and validate the card in ``model_dir``.

    Raises:
        ModelError: the card is missing, unparsable, or fails validation.
    """
    path = find_card(model_dir)
    try:
        text = path.read_text(encoding="utf-8")
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
        return ModelCard.model_validate(data)
    except (OSError, ValueError, yaml.YAMLError) as exc:
        detail = exc.errors()[0] if isinstance(exc, ValidationError) else exc
        raise ModelError(f"{path}: invalid model card: {detail}") from None


def discover_cards(root: Path) -> dict[str, tuple[Path, ModelCard]]:
    """Map model name to (directory, card) for every model directory directly under ``root``.

    Invalid directories are skipped here; ``radq models validate`` reports them.
    """
    found: dict[str, tuple[Path, ModelCard]] = {}
    if not root.is_dir():
        return found
    for child in sorted(root.iterdir()):
        if child.is_dir():
            try:
                card = read_card(child)
            except ModelError:
                continue
            found[card.name] = (child, card)
    return found
