"""The models the benchmark runs: their folder, the inputs each card accepts, loading one as a worker does.

A job names its model, but the worker still applies the card's ``applies_to``: an
instance the card does not match ends ``skipped``. ``chexnet-densenet121`` applies to
chest CR/DX and ``headct-resnet18`` to head CT, so the matrix pairs each model with the
inputs its card accepts. Issue 7's CPU target is DenseNet-121 on 512x512 CT, which no
bundled card routes; the bench therefore adds ``densenet121-ct``: chexnet's card, network
and weights (the weights file is linked, not copied) with ``applies_to`` set to CT. It
lives in a model folder of the run's own, beside links to every model of
``RADQ_MODEL_DIR``, which the API and worker of the bench's stack use too.

The folder also holds ``overhead-probe``: radq-smoke's network one channel wide (about
0.5 ms of CPU per image), so that its pipeline row measures what the worker process
costs per image besides the model (``worker ms/img``): the figure that bounds a GPU
worker, measurable on any CPU.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from bench.inputs import InputKind
from radq.model_card import ModelCard, discover_cards, find_card
from radq.settings import Settings
from workers.inference import precision_context
from workers.models.arch import ARCHITECTURES
from workers.models.loader import LoadedModel, Runtime, load_model, prepare_for_runtime

DENSENET_CT = "densenet121-ct"
"""The bench's own card: chexnet-densenet121's network and weights, applied to CT."""
DENSENET_SOURCE = "chexnet-densenet121"
OVERHEAD_PROBE = "overhead-probe"
"""The bench's own near-free model: the worker's per-image cost with the model taken out."""
PROBE_SOURCE = "radq-smoke"
PROBE_WIDTHS = [1, 1, 1, 1]
DEFAULT_MODELS = ("headct-resnet18", DENSENET_CT, DENSENET_SOURCE, "us-abdomen-smallcnn")
"""Models of the default run: a ResNet-style network and DenseNet-121 on CT, DenseNet-121 on CR,
and the ultrasound model on a real JPEG cine (decode-bound: its network is small)."""


def _derive_densenet_ct(source: Path, target: Path) -> None:
    card = json.loads(find_card(source).read_text(encoding="utf-8"))
    card.update(
        name=DENSENET_CT,
        task=f"throughput benchmark only: {DENSENET_SOURCE}'s network and weights, routed to CT",
        applies_to={"modalities": ["CT"]},
        auto_route=False,
        intended_use="Benchmarking DenseNet-121 on CT slices (issue 7). NOT A DIAGNOSTIC DEVICE; "
        "untrained weights, outputs without meaning.",
    )
    target.mkdir()
    (target / "model.json").write_text(json.dumps(card, indent=2) + "\n", encoding="utf-8")
    (target / card["weights"]).symlink_to(source / card["weights"])


def _make_overhead_probe(source: Path, target: Path) -> None:
    card = json.loads(find_card(source).read_text(encoding="utf-8"))
    card.update(
        name=OVERHEAD_PROBE,
        version="1.0.0-bench",
        task="throughput benchmark only: a network that costs almost nothing, so the "
        "pipeline measures everything else",
        architecture_params={"widths": PROBE_WIDTHS},
        intended_use="Measuring radq's own per-image cost (issue 7). NOT A DIAGNOSTIC DEVICE.",
    )
    torch.manual_seed(0)
    network = ARCHITECTURES[card["architecture"]](
        in_channels=card["input"]["channels"], num_classes=len(card["labels"]), widths=PROBE_WIDTHS
    )
    target.mkdir()
    weights = target / card["weights"]
    save_file({k: v.contiguous() for k, v in network.state_dict().items()}, str(weights))
    card["sha256"] = hashlib.sha256(weights.read_bytes()).hexdigest()
    (target / "model.json").write_text(json.dumps(card, indent=2) + "\n", encoding="utf-8")


def model_dir(source: Path, target: Path) -> Path:
    """Fill ``target`` (absent or empty) with links to ``source``'s models, plus
    :data:`DENSENET_CT` and :data:`OVERHEAD_PROBE`.

    Returns:
        ``target``, to use as ``RADQ_MODEL_DIR``.
    """
    target.mkdir(parents=True, exist_ok=True)
    for child in sorted(source.iterdir()):
        if child.is_dir():
            (target / child.name).symlink_to(child.resolve())
    found = discover_cards(source)
    chexnet = found.get(DENSENET_SOURCE)
    if chexnet is not None and not (target / DENSENET_CT).exists():
        _derive_densenet_ct(chexnet[0].resolve(), target / DENSENET_CT)
    smoke = found.get(PROBE_SOURCE)
    if smoke is not None and not (target / OVERHEAD_PROBE).exists():
        _make_overhead_probe(smoke[0].resolve(), target / OVERHEAD_PROBE)
    return target


def accepts(card: ModelCard, kind: InputKind) -> bool:
    """Whether the worker runs ``card``'s model on files of ``kind`` (its ``applies_to`` matches)."""
    return card.applies_to.matches(
        modality=kind.modality,
        body_part=kind.body_part,
        sop_class=kind.sop_class,
        photometric=kind.photometric,
    )


def applies_to_text(card: ModelCard) -> str:
    """The card's ``applies_to`` in a few words, for the note on pairs it skips."""
    rules = card.applies_to
    parts = ["/".join(values) for values in (rules.modalities, rules.body_parts) if values]
    return " ".join(parts) or "anything"


@dataclass(frozen=True)
class Pair:
    """One row of the matrix: a model and an input its card accepts."""

    model: str
    input: str


def matrix(
    cards: dict[str, ModelCard], models: list[str], inputs: dict[str, InputKind]
) -> tuple[list[Pair], list[str]]:
    """The (model, input) rows to measure, and a note for each model's skipped inputs."""
    rows: list[Pair] = []
    notes: list[str] = []
    for name in models:
        card = cards[name]
        skipped = [kind.name for kind in inputs.values() if not accepts(card, kind)]
        rows.extend(Pair(name, kind.name) for kind in inputs.values() if accepts(card, kind))
        if skipped:
            notes.append(
                f"{name} not run on {', '.join(skipped)}: its card applies to {applies_to_text(card)}"
            )
    return rows, notes


def load_as_worker(model_dir: Path, settings: Settings, device: torch.device) -> LoadedModel:
    """Load a model as the worker's registry does: memory format, precision and compilation
    from ``settings`` (``RADQ_CHANNELS_LAST``, ``RADQ_PRECISION``, ``RADQ_COMPILE``)."""
    model = load_model(model_dir, device)
    runtime = Runtime(device, settings.precision, settings.channels_last, settings.compile)
    return prepare_for_runtime(model, runtime)


def forward_context(model: LoadedModel) -> contextlib.AbstractContextManager[object]:
    """Inference mode, under autocast where the loaded model runs mixed precision."""
    stack = contextlib.ExitStack()
    stack.enter_context(torch.inference_mode())
    stack.enter_context(precision_context(model))
    return stack


def as_model_input(model: LoadedModel, batch: torch.Tensor) -> torch.Tensor:
    """The batch in the memory format the loaded model expects."""
    if model.channels_last:
        return batch.contiguous(memory_format=torch.channels_last)
    return batch
