"""The decode process pool with real processes: crashes, hangs, large results, shutdown."""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import time
import types
from collections.abc import Iterator
from concurrent.futures import CancelledError, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from radq.errors import DecoderCrashed, DecoderTimeout, NotDicom, RadqError
from tests.workers import procpool_tasks as tasks
from workers.procpool import ProcessPool

REPO = Path(__file__).resolve().parents[2]
PRELOAD = ["numpy", "tests.workers.procpool_tasks"]


@pytest.fixture
def pool() -> Iterator[ProcessPool]:
    with ProcessPool(2, task_timeout=1.0, preload=PRELOAD) as pool:
        yield pool


def gone(pid: int, within: float = 5.0) -> bool:
    """Whether ``pid`` has exited (a zombie left to a non-reaping init counts) within the time."""
    end = time.monotonic() + within
    while True:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError):
            return True
        if state in ("Z", "X"):
            return True
        if time.monotonic() > end:
            return False
        time.sleep(0.05)


def test_results_come_back_in_order_from_parallel_processes(pool: ProcessPool) -> None:
    futures = [pool.submit(tasks.echo, i) for i in range(20)]
    assert [f.result(timeout=5) for f in futures] == list(range(20))
    sleepers = [pool.submit(tasks.pid_after, 0.4) for _ in range(4)]
    assert len({f.result(timeout=5) for f in sleepers}) == 2
    assert pool.processes == 2


def test_submit_from_several_threads(pool: ProcessPool) -> None:
    def submit_many(start: int) -> list[object]:
        futures = [pool.submit(tasks.echo, start + i) for i in range(25)]
        return [f.result(timeout=5) for f in futures]

    with ThreadPoolExecutor(8) as threads:
        results = list(threads.map(submit_many, range(0, 200, 25)))
    assert [x for chunk in results for x in chunk] == list(range(200))


def test_segfault_fails_only_that_task(pool: ProcessPool) -> None:
    before = pool.submit(tasks.echo, "before")
    crash = pool.submit(tasks.segfault)
    after = [pool.submit(tasks.echo, i) for i in range(6)]
    with pytest.raises(DecoderCrashed) as caught:
        crash.result(timeout=5)
    assert caught.value.reason == (
        "the decoder process died with signal 11 (SIGSEGV) while reading this file"
    )
    assert caught.value.status == "failed"
    assert before.result(timeout=5) == "before"
    assert [f.result(timeout=5) for f in after] == list(range(6))


def test_hang_is_stopped_after_the_timeout_and_the_pool_goes_on(pool: ProcessPool) -> None:
    started = time.monotonic()
    hung = pool.submit(tasks.hang)
    others = [pool.submit(tasks.echo, i) for i in range(4)]
    with pytest.raises(DecoderTimeout) as caught:
        hung.result(timeout=5)
    assert 0.9 < time.monotonic() - started < 3.0
    assert caught.value.reason == (
        "decoding took longer than 1 s (RADQ_DECODE_TIMEOUT); the reading process was stopped"
    )
    assert [f.result(timeout=5) for f in others] == list(range(4))
    parallel = [pool.submit(tasks.pid_after, 0.3) for _ in range(2)]
    assert len({f.result(timeout=5) for f in parallel}) == 2  # the killed child was replaced


def test_exceptions_reach_the_caller_with_their_type(pool: ProcessPool) -> None:
    with pytest.raises(ValueError, match="no pixels here") as caught:
        pool.submit(tasks.raise_value_error, "no pixels here").result(timeout=5)
    assert "raise_value_error" in str(caught.value.__cause__)  # the child's traceback
    with pytest.raises(NotDicom) as not_dicom:
        pool.submit(tasks.raise_not_dicom, "no DICM prefix").result(timeout=5)
    assert not_dicom.value.reason == "no DICM prefix"
    with pytest.raises(RadqError, match="^TwoArgError: left and right$"):
        pool.submit(tasks.raise_unrebuildable).result(timeout=5)


def test_unpicklable_arguments_fail_in_submit(pool: ProcessPool) -> None:
    with pytest.raises(Exception, match="pickle"):
        pool.submit(tasks.echo, lambda: None)


def test_a_large_array_round_trips_intact_and_writable(pool: ProcessPool) -> None:
    result = pool.submit(tasks.image, 7).result(timeout=10)
    expected = tasks.image(7)
    assert result.dtype == np.uint16 and result.shape == tasks.IMAGE_SHAPE
    assert np.array_equal(result, expected)
    assert result.flags.writeable
    echoed = np.asarray(pool.submit(tasks.echo, expected[::2, ::3]).result(timeout=10))  # not contiguous
    assert np.array_equal(echoed, expected[::2, ::3])


def test_children_start_clean(monkeypatch: pytest.MonkeyPatch) -> None:
    """Children come from the fork server, never from the parent (which runs torch, maybe CUDA):
    nothing the parent loaded reaches them. (The fork server may preload torch itself, before
    any thread or device exists: a CPU worker's decode processes preprocess with it.)"""
    monkeypatch.setitem(sys.modules, tasks.PARENT_MARKER, types.ModuleType(tasks.PARENT_MARKER))
    with ProcessPool(2, task_timeout=1.0, preload=PRELOAD) as pool:
        state = pool.submit(tasks.child_state).result(timeout=5)
    assert state["pid"] != os.getpid()
    assert state["parent_marker"] is False
    assert state["sigint_ignored"] is True


def test_shutdown_lets_running_tasks_finish_cancels_queued_and_stops_children() -> None:
    pool = ProcessPool(1, task_timeout=5.0, preload=PRELOAD, name="radq-test-shutdown")
    running = pool.submit(tasks.pid_after, 0.5)
    queued = [pool.submit(tasks.echo, i) for i in range(3)]
    while not running.running():
        time.sleep(0.01)
    pool.shutdown(wait=True)
    pid = running.result(timeout=0)
    for future in queued:
        with pytest.raises(CancelledError):
            future.result(timeout=0)
    assert gone(pid, within=0)
    # Only this pool's children: other tests leave worker engines (and their pools) alive.
    assert not [p for p in multiprocessing.active_children() if p.name.startswith("radq-test-shutdown")]
    with pytest.raises(RuntimeError, match="shut down"):
        pool.submit(tasks.echo, 1)
    pool.shutdown()  # a second call is harmless


def test_shutdown_stops_idle_children() -> None:
    with ProcessPool(3, task_timeout=5.0, preload=PRELOAD, name="radq-test-idle") as pool:
        busy = pool.submit(tasks.pid_after, 0.3).result(timeout=5)
        pids = {p.pid for p in multiprocessing.active_children() if p.name.startswith("radq-test-idle")}
    assert busy in pids and len(pids) == 3
    assert all(pid is not None and gone(pid, within=0) for pid in pids)


PARENT_DIES = """
import multiprocessing, os, signal, time
from multiprocessing import forkserver
from tests.workers import procpool_tasks as tasks
from workers.procpool import ProcessPool

pool = ProcessPool(2, task_timeout=60, preload=["tests.workers.procpool_tasks"])
hung = pool.submit(tasks.hang)
while not hung.running():
    time.sleep(0.01)
pids = [p.pid for p in multiprocessing.active_children() if p.name.startswith("radq-decode")]
print(*pids, forkserver._forkserver._forkserver_pid, flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_children_exit_when_the_parent_dies_even_mid_task() -> None:
    done = subprocess.run(
        [sys.executable, "-c", PARENT_DIES], cwd=REPO, capture_output=True, text=True, timeout=30
    )
    assert done.returncode == -signal.SIGKILL, done.stderr
    pids = [int(pid) for pid in done.stdout.split()]
    assert len(pids) == 3  # one hung child, one idle child, the fork server
    assert all(gone(pid) for pid in pids), pids
