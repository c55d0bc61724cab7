"""Queue routing: which Celery queue a job's messages go to, and which queues a worker takes.

Queues (each name after ``RADQ_QUEUE_PREFIX``, empty by default):

- ``RADQ_QUEUE`` (``radq``): the general queue; every worker takes it by default;
- ``gpu`` and ``cpu``: the device classes; a worker takes its own;
- ``model.<name>``: one model's queue; a worker takes it for every model in its model
  directory it can run on its device.

A job's queue is chosen once, at submission, from its models' cards (:func:`job_queue`),
and stored in ``Job.queue`` so retries and recovery publish to the same place. A card's
``device: gpu`` keeps its model off CPU workers: they never subscribe to ``gpu`` or to
that model's queue (:func:`check_worker_queues`), and hand back a chunk that reaches them
anyway.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Literal

from radq.errors import ConfigurationError
from radq.model_card import AUTO, ModelCard
from radq.settings import Settings

DeviceClass = Literal["cpu", "gpu"]
"""What a worker runs models on: ``gpu`` for any CUDA device, else ``cpu``."""

MODEL_QUEUE = "model."
"""A model's queue is this, then the model's name (after ``RADQ_QUEUE_PREFIX``)."""


def device_queue(settings: Settings, device_class: DeviceClass) -> str:
    """The queue of one device class: ``gpu`` or ``cpu``."""
    return f"{settings.queue_prefix}{device_class}"


def model_queue(settings: Settings, name: str) -> str:
    """The queue of one model: ``model.<name>``."""
    return f"{settings.queue_prefix}{MODEL_QUEUE}{name}"


def runs_on(card: ModelCard, device_class: DeviceClass) -> bool:
    """Whether a worker of ``device_class`` may run the model (``device: any`` runs anywhere)."""
    return card.device == "any" or device_class == "gpu"


def gpu_only_models(models: Iterable[str], cards: Mapping[str, ModelCard]) -> list[str]:
    """The GPU-only models a job over ``models`` may run; ``auto`` stands for every
    card that ``auto`` may pick (``auto_route``). Names without a card are ignored."""
    names = set(models)
    if AUTO in names:
        names |= {name for name, card in cards.items() if card.auto_route}
    return sorted(n for n in names if n in cards and cards[n].device == "gpu")


def job_queue(settings: Settings, models: Sequence[str], cards: Mapping[str, ModelCard]) -> str:
    """The queue a job's messages go to, from its model names (``auto`` included).

    One named model: that model's queue. Otherwise ``gpu`` if any model the job may run
    needs a GPU, else the general queue.
    """
    distinct = list(dict.fromkeys(models))
    if len(distinct) == 1 and distinct[0] != AUTO:
        return model_queue(settings, distinct[0])
    if gpu_only_models(distinct, cards):
        return device_queue(settings, "gpu")
    return settings.queue


def all_queues(settings: Settings, cards: Mapping[str, ModelCard]) -> list[str]:
    """Every queue a job over these cards may be routed to (to inspect or empty them)."""
    models = [model_queue(settings, name) for name in sorted(cards)]
    return [settings.queue, device_queue(settings, "cpu"), device_queue(settings, "gpu"), *models]


def worker_queues(settings: Settings, device_class: DeviceClass, cards: Mapping[str, ModelCard]) -> list[str]:
    """A worker's default queues: the general queue, its device class, and the queue of
    every model in its model directory it can run on that device."""
    models = [model_queue(settings, n) for n, card in sorted(cards.items()) if runs_on(card, device_class)]
    return [settings.queue, device_queue(settings, device_class), *models]


def gpu_queues(settings: Settings, queues: Iterable[str], cards: Mapping[str, ModelCard]) -> list[str]:
    """Those of ``queues`` that carry GPU-only work: ``gpu`` and GPU-only models' queues."""
    gpu_only = {model_queue(settings, n) for n, card in cards.items() if card.device == "gpu"}
    gpu_only.add(device_queue(settings, "gpu"))
    return [q for q in queues if q in gpu_only]


def gpu_queue_for(settings: Settings, queue: str, cards: Mapping[str, ModelCard]) -> str:
    """Where a CPU worker hands back a chunk that needs a GPU: the job's own ``queue`` when
    only GPU workers take it, else ``gpu`` (the job was routed before a card said
    ``device: gpu``, or by an API with another model directory)."""
    return queue if gpu_queues(settings, [queue], cards) else device_queue(settings, "gpu")


def check_worker_queues(
    settings: Settings, device_class: DeviceClass, queues: Sequence[str], cards: Mapping[str, ModelCard]
) -> None:
    """Refuse a CPU worker's subscription to queues that carry GPU-only work.

    Raises:
        ConfigurationError: no queue at all, or a CPU worker asked for a GPU-only queue.
    """
    if not queues:
        raise ConfigurationError("--queues names no queue")
    if device_class == "gpu":
        return
    refused = gpu_queues(settings, queues, cards)
    if refused:
        raise ConfigurationError(
            f"this worker runs on the CPU but was told to take {', '.join(refused)}, which carry work "
            "for models whose card says device: gpu; run it with --device cuda on a GPU host, or "
            "leave these queues out of --queues"
        )
