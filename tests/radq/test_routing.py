"""Queue routing rules, card validation and the worker's refusal, as a user meets them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from radq.errors import ModelError
from radq.model_card import cards_in, read_card
from radq.routing import check_worker_queues, job_queue, worker_queues
from radq.services import free_port
from radq.settings import BUNDLED_MODEL_DIR, Settings
from tests.model_dirs import SMOKE, SMOKE_B, SMOKE_GPU, copy_model, routing_model_dir


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    return routing_model_dir(tmp_path / "models")


def test_a_job_goes_to_its_one_model_else_gpu_else_the_general_queue(model_dir: Path) -> None:
    settings = Settings(queue="radq", queue_prefix="")
    cards = cards_in(model_dir)
    assert job_queue(settings, [SMOKE], cards) == "model.radq-smoke"
    assert job_queue(settings, [SMOKE_GPU], cards) == "model.radq-smoke-gpu"
    assert job_queue(settings, [SMOKE, SMOKE, SMOKE], cards) == "model.radq-smoke"
    assert job_queue(settings, [SMOKE, SMOKE_B], cards) == "radq"
    assert job_queue(settings, [SMOKE, SMOKE_GPU], cards) == "gpu"
    # auto: the general queue unless a card auto may pick needs a GPU.
    assert job_queue(settings, ["auto"], cards_in(BUNDLED_MODEL_DIR)) == "radq"
    assert job_queue(settings, ["auto"], cards) == "radq"  # radq-smoke-gpu has auto_route: false
    copy_model(model_dir, "auto-gpu", device="gpu", auto_route=True)
    assert job_queue(settings, ["auto"], cards_in(model_dir)) == "gpu"
    assert job_queue(Settings(queue="q", queue_prefix="site1."), [SMOKE], cards) == "site1.model.radq-smoke"


def test_worker_default_queues_follow_its_device_and_its_models(model_dir: Path) -> None:
    settings = Settings(queue="radq", queue_prefix="")
    cards = cards_in(model_dir)
    cpu = worker_queues(settings, "cpu", cards)
    assert cpu == ["radq", "cpu", "model.radq-smoke", "model.radq-smoke-b"]
    assert worker_queues(settings, "gpu", cards) == [
        "radq", "gpu", "model.radq-smoke", "model.radq-smoke-b", "model.radq-smoke-gpu",
    ]  # fmt: skip
    check_worker_queues(settings, "cpu", cpu, cards)  # its own defaults pass


def test_card_device_is_validated(tmp_path: Path) -> None:
    assert read_card(BUNDLED_MODEL_DIR / SMOKE).device == "any"
    bad = copy_model(tmp_path, "bad", device="tpu")
    with pytest.raises(ModelError, match="device"):
        read_card(bad)


def _radq(*args: str, model_dir: Path) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "COLUMNS": "200",
        "RADQ_MODEL_DIR": str(model_dir),
        "RADQ_QUEUE_PREFIX": "",
        # Nothing listens here: a worker that refuses must do so before it connects.
        "RADQ_BROKER_URL": f"redis://127.0.0.1:{free_port()}/0",
    }
    return subprocess.run(
        [sys.executable, "-m", "radq.cli", *args], env=env, capture_output=True, text=True, timeout=120
    )


@pytest.mark.parametrize("queues", ["gpu", "radq,model.radq-smoke-gpu"])
def test_cpu_worker_refuses_gpu_only_queues(model_dir: Path, queues: str) -> None:
    done = _radq("worker", "--device", "cpu", "--queues", queues, model_dir=model_dir)
    assert done.returncode == 2, done.stdout + done.stderr
    message = " ".join(done.stderr.split())
    refused = queues.split(",")[-1]
    assert f"runs on the CPU but was told to take {refused}" in message
    assert "device: gpu" in message


def test_models_list_and_show_say_where_a_model_runs(model_dir: Path) -> None:
    listed = _radq("models", "list", model_dir=model_dir)
    assert listed.returncode == 0, listed.stderr
    rows = {line.split("│")[1].strip(): line for line in listed.stdout.splitlines() if "radq-smoke" in line}
    assert "│ gpu " in rows[SMOKE_GPU] and "│ any " in rows[SMOKE]
    shown = _radq("models", "show", SMOKE_GPU, model_dir=model_dir)
    assert shown.returncode == 0, shown.stderr
    cells = [row.split("│") for row in shown.stdout.splitlines()]
    fields = {c[1].strip(): c[2].strip() for c in cells if len(c) > 3}
    assert fields["device"] == "gpu"
