"""The model card: what a model directory declares about itself.

A model directory holds ``model.json`` (or ``model.yaml``) and a weights file whose
sha256 the card records. The API reads cards to validate job requests; workers read
them to load and feed the model.
"""

from __future__ import annotations

import json
import os
import stat
import threading
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, Field, ValidationError, model_validator

from radq.errors import ModelError

CARD_NAMES = ("model.json", "model.yaml", "model.yml")

AUTO = "auto"
"""The job model name that means: every model whose card matches the instance."""


class Window(BaseModel):
    """A VOI window in modality units (e.g. Hounsfield units for CT)."""

    center: float
    width: float = Field(gt=0)


class InputSpec(BaseModel):
    """Shape of one model input: ``channels x height x width`` float32."""

    height: int = Field(gt=0, le=4096)
    width: int = Field(gt=0, le=4096)
    channels: Literal[1, 3] = 1


ModelDevice = Literal["any", "gpu"]
"""Where a model may run: ``any`` (CPU or GPU workers) or ``gpu`` (GPU workers only; jobs
that need it are routed away from CPU workers, see :mod:`radq.routing`)."""

FramePolicy = Literal["middle", "first", "max", "all"]
"""How a multi-frame object becomes model input: one frame (``middle``, ``first``),
the maximum over frames (``max``, a maximum-intensity projection of the stored values),
or every frame inferred separately (``all``; the instance's output per label is the
maximum over its frames)."""


class Preprocessing(BaseModel):
    """How pixels become a model input.

    ``windows`` maps a Modality (``CT``) to the window applied to it, overriding the
    file's own VOI; other modalities use the file's VOI LUT or window, then min-max.
    ``channel_windows`` instead gives one window per input channel (the classic head-CT
    input: brain, subdural, bone), applied to modality values. The windowed image is
    scaled to [0, 1], then normalised with ``mean``/``std`` per channel.
    """

    windows: dict[str, Window] = Field(default_factory=dict)
    channel_windows: list[Window] = Field(default_factory=list)
    mean: list[float] = Field(default_factory=lambda: [0.5])
    std: list[float] = Field(default_factory=lambda: [0.25])
    frame: FramePolicy = "middle"

    @model_validator(mode="after")
    def _consistent(self) -> Preprocessing:
        if any(s <= 0 for s in self.std):
            raise ValueError("preprocessing.std values must be > 0")
        return self


class AppliesTo(BaseModel):
    """Which instances a model applies to; each empty list means any value.

    Values compare case-insensitively with the instance's Modality, BodyPartExamined,
    SOP Class UID and Photometric Interpretation.
    """

    modalities: list[str] = Field(default_factory=list)
    body_parts: list[str] = Field(default_factory=list)
    sop_classes: list[str] = Field(default_factory=list)
    photometric: list[str] = Field(default_factory=list)

    def matches(
        self,
        *,
        modality: str | None,
        body_part: str | None,
        sop_class: str | None,
        photometric: str | None,
    ) -> bool:
        def ok(allowed: list[str], value: str | None) -> bool:
            return not allowed or (value or "").upper() in {a.upper() for a in allowed}

        return (
            ok(self.modalities, modality)
            and ok(self.body_parts, body_part)
            and ok(self.sop_classes, sop_class)
            and ok(self.photometric, photometric)
        )


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
    mixed_precision: bool = Field(
        True, description="Whether the model may run under fp16/bf16 autocast (RADQ_PRECISION)."
    )
    device: ModelDevice = Field(
        "any", description="any: runs on CPU or GPU workers; gpu: only GPU workers take its jobs."
    )
    study_summary: Literal["max", "mean"] = "max"
    applies_to: AppliesTo = Field(default_factory=AppliesTo)
    auto_route: bool = Field(True, description="Whether jobs asking for 'auto' run this model.")
    gradcam_layer: str | None = Field(
        None, description="Module path Grad-CAM weighs (default: the architecture's last conv stage)."
    )
    weights: str
    weights_format: Literal["state_dict", "torchscript"] = Field(
        "state_dict",
        description="state_dict: .safetensors, or .pt/.pth read with weights_only=True; "
        "torchscript: a torch.jit.save archive (architecture is then informational)",
    )
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    intended_use: str
    limitations: str
    training_data: str
    license: str

    @model_validator(mode="after")
    def _channels_fit(self) -> ModelCard:
        pre, channels = self.preprocessing, self.input.channels
        for name, values in (("mean", pre.mean), ("std", pre.std)):
            if len(values) not in (1, channels):
                raise ValueError(f"preprocessing.{name} has {len(values)} values for {channels} channel(s)")
        if pre.channel_windows and len(pre.channel_windows) != channels:
            raise ValueError(
                f"preprocessing.channel_windows has {len(pre.channel_windows)} windows "
                f"for {channels} channel(s)"
            )
        return self

    @property
    def preprocessing_recipe(self) -> str:
        """A compact, stable description of the preprocessing, stored with each result."""
        return self.preprocessing.model_dump_json() + "|" + self.input.model_dump_json()


def find_card(model_dir: Path) -> Path:
    return _card_file(model_dir)[0]


def _card_file(model_dir: Path) -> tuple[Path, os.stat_result]:
    """The card's path and its ``stat``, one call per name tried."""
    for name in CARD_NAMES:
        path = model_dir / name
        try:
            info = path.stat()
        except OSError:
            continue
        if stat.S_ISREG(info.st_mode):
            return path, info
    raise ModelError(f"{model_dir}: no model card (expected one of {', '.join(CARD_NAMES)})")


def read_card(model_dir: Path) -> ModelCard:
    """Parse and validate the card in ``model_dir``.

    A card file read before and unchanged since (same inode, size and modification time) is
    not parsed again: workers and the API look cards up for every message and every
    submission (0.4 ms for four models, parsed; a few stats, cached). The card returned is
    shared: never modify it.

    Raises:
        ModelError: the card is missing, unparsable, or fails validation.
    """
    path, info = _card_file(model_dir)
    try:
        stamp = (info.st_ino, info.st_size, info.st_mtime_ns)
        cached = _parsed.get(path)
        if cached is not None and cached[0] == stamp:
            return cached[1]
        text = path.read_text(encoding="utf-8")
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
        card = ModelCard.model_validate(data)
    except (OSError, ValueError, yaml.YAMLError) as exc:
        detail = exc.errors()[0] if isinstance(exc, ValidationError) else exc
        raise ModelError(f"{path}: invalid model card: {detail}") from None
    with _parsing:
        _parsed[path] = (stamp, card)
    return card


_parsed: dict[Path, tuple[tuple[int, int, int], ModelCard]] = {}
"""Cards parsed so far, by card file, with the file's (inode, size, mtime) when read."""
_parsing = threading.Lock()


def discover_cards(root: Path) -> dict[str, tuple[Path, ModelCard]]:
    """Map model name to (directory, card) for every model directory directly under ``root``.

    Invalid directories are skipped here; ``radq models validate`` reports them.
    """
    found: dict[str, tuple[Path, ModelCard]] = {}
    try:
        with os.scandir(root) as entries:
            children = sorted(Path(entry.path) for entry in entries if entry.is_dir())
    except OSError:  # missing or not a folder
        return found
    for child in children:
        try:
            card = read_card(child)
        except ModelError:
            continue
        found[card.name] = (child, card)
    return found


def cards_in(root: Path) -> dict[str, ModelCard]:
    """Map model name to card for every valid model directory directly under ``root``."""
    return {name: card for name, (_, card) in discover_cards(root).items()}
