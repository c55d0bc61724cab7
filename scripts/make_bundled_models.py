"""Write radq's bundled model directories: random weights with honest cards.

No medical-imaging weights that ship inside a package (and may be redistributed) were
found for these architectures (see the README), so every bundled model has random,
untrained weights for pipeline testing only, and its card says so. Output is
deterministic (fixed seeds, pinned torch), so the committed sha256 values reproduce.

Run from the repository root: ``python scripts/make_bundled_models.py``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from workers.models.arch import ARCHITECTURES
from workers.models.loader import sha256_of

ROOT = Path(__file__).resolve().parent.parent / "workers" / "bundled_models"

NOT_DIAGNOSTIC = (
    "NOT A DIAGNOSTIC DEVICE. Random, untrained weights for pipeline testing only: the "
    "outputs carry no clinical meaning and must never be read as findings."
)
RANDOM_WEIGHTS = (
    "None: the weights were never trained (the architecture's standard initialisation, "
    "torchvision's for DenseNet and ResNet, with a fixed seed)."
)
IMAGENET = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}

CHEXNET_LABELS = [
    "Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia",
    "Pneumothorax", "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening", "Hernia",
]
ICH_LABELS = ["any", "epidural", "intraparenchymal", "intraventricular", "subarachnoid", "subdural"]
US_LABELS = ["liver", "kidney", "gallbladder", "spleen", "pancreas", "bladder", "other"]

MODELS: list[dict[str, Any]] = [
    {
        "name": "radq-smoke",
        "version": "1.0.0",
        "seed": 0,
        "fp16": False,
        "task": "pipeline testing (multi-label, sigmoid)",
        "architecture": "radq-smallcnn",
        "architecture_params": {"widths": [16, 32, 64, 128]},
        "labels": [f"untrained_{i}" for i in range(4)],
        "input": {"height": 224, "width": 224, "channels": 1},
        "preprocessing": {"windows": {"CT": {"center": 40, "width": 80}}, "mean": [0.5], "std": [0.25]},
        "applies_to": {},
        "auto_route": False,  # applies to everything: runs only when a job names it
        "intended_use": "Exercising the radq pipeline end to end. " + NOT_DIAGNOSTIC,
        "limitations": "Outputs are near 0.5 and vary with the pixels only by chance.",
    },
    {
        "name": "chexnet-densenet121",
        "version": "0.1.0-random",
        "seed": 1,
        "fp16": True,
        "task": "chest X-ray findings, 14 labels of ChestX-ray14 (multi-label, sigmoid)",
        "architecture": "densenet121",
        "labels": CHEXNET_LABELS,
        "input": {"height": 224, "width": 224, "channels": 3},
        "preprocessing": IMAGENET,
        "applies_to": {"modalities": ["CR", "DX"], "body_parts": ["CHEST"]},
        "intended_use": (
            "The CheXNet design (Rajpurkar et al. 2017: DenseNet-121, 14 sigmoid outputs) wired "
            "through radq. Replace the weights with a trained torchvision-format checkpoint via "
            "`radq models import`. " + NOT_DIAGNOSTIC
        ),
        "limitations": "Frontal chest radiographs only; grayscale replicated to 3 channels.",
    },
    {
        "name": "headct-resnet18",
        "version": "0.1.0-random",
        "seed": 2,
        "fp16": True,
        "task": "intracranial haemorrhage on head CT slices, RSNA 2019 labels (multi-label, sigmoid)",
        "architecture": "resnet18",
        "labels": ICH_LABELS,
        "input": {"height": 224, "width": 224, "channels": 3},
        "preprocessing": {
            # The classic three-window input: brain, subdural, bone (Hounsfield units).
            "channel_windows": [
                {"center": 40, "width": 80},
                {"center": 80, "width": 200},
                {"center": 600, "width": 2800},
            ],
            **IMAGENET,
        },
        "applies_to": {"modalities": ["CT"], "body_parts": ["HEAD", "BRAIN"]},
        "intended_use": "Slice-level haemorrhage scoring, study summary = max over slices. " + NOT_DIAGNOSTIC,
        "limitations": "Axial non-contrast head CT slices; one slice at a time, no 3-D context.",
    },
    {
        "name": "us-abdomen-smallcnn",
        "version": "0.1.0-random",
        "seed": 3,
        "fp16": False,
        "task": "abdominal ultrasound organ/view classification (single label, softmax)",
        "architecture": "radq-smallcnn",
        "architecture_params": {"widths": [16, 32, 64, 128]},
        "labels": US_LABELS,
        "input": {"height": 224, "width": 224, "channels": 1},
        "preprocessing": {"mean": [0.5], "std": [0.25], "frame": "max"},
        "output_activation": "softmax",
        "applies_to": {"modalities": ["US"]},
        "intended_use": "Which organ an abdominal ultrasound image shows. " + NOT_DIAGNOSTIC,
        "limitations": "B-mode grey scale; colour Doppler overlays are reduced to luminance.",
    },
]


def write(spec: dict[str, Any]) -> str:
    spec = dict(spec)
    seed, fp16 = spec.pop("seed"), spec.pop("fp16")
    torch.manual_seed(seed)
    module = ARCHITECTURES[spec["architecture"]](
        in_channels=spec["input"]["channels"],
        num_classes=len(spec["labels"]),
        **spec.get("architecture_params", {}),
    )
    out = ROOT / spec["name"]
    out.mkdir(parents=True, exist_ok=True)
    weights = out / "model.safetensors"
    # Half precision halves the repository size; the loader copies into float32 parameters.
    state = {
        k: (v.half() if fp16 and v.is_floating_point() else v).contiguous()
        for k, v in module.state_dict().items()
    }
    save_file(state, str(weights))
    card = {
        **spec,
        "weights": weights.name,
        "sha256": sha256_of(weights),
        "training_data": RANDOM_WEIGHTS,
        "license": "Apache-2.0 (generated by scripts/make_bundled_models.py)",
    }
    (out / "model.json").write_text(json.dumps(card, indent=2) + "\n", encoding="utf-8")
    return f"{spec['name']}: {card['sha256']} ({weights.stat().st_size / 1e6:.1f} MB)"


if __name__ == "__main__":
    for model in MODELS:
        print(write(model))
