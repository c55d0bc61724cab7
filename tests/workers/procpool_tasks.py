"""Functions the process pool tests run in child processes.

They live in their own module because forkserver and spawn children import a task's
function by module name (``tests.workers.procpool_tasks``), not from the test module.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import time

import numpy as np

from radq.errors import NotDicom

IMAGE_SHAPE = (2500, 2048)


def echo(value: object) -> object:
    return value


def pid_after(seconds: float) -> int:
    time.sleep(seconds)
    return os.getpid()


def segfault() -> None:
    ctypes.string_at(0)  # reads address 0: a real SIGSEGV, as a broken codec would


def hang() -> None:
    time.sleep(3600)


def raise_value_error(message: str) -> None:
    raise ValueError(message)


def raise_not_dicom(reason: str) -> None:
    raise NotDicom(reason)


class TwoArgError(Exception):
    """Pickles, but cannot be rebuilt: ``__init__`` wants two arguments, ``args`` has one."""

    def __init__(self, a: str, b: str) -> None:
        super().__init__(f"{a} and {b}")


def raise_unrebuildable() -> None:
    raise TwoArgError("left", "right")


def image(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 4096, IMAGE_SHAPE, dtype=np.uint16)


PARENT_MARKER = "radq_test_parent_only"
"""A module only the test's own process holds: a child that has it was forked from that process."""


def child_state() -> dict[str, object]:
    return {
        "pid": os.getpid(),
        "parent_marker": PARENT_MARKER in sys.modules,
        "sigint_ignored": signal.getsignal(signal.SIGINT) is signal.SIG_IGN,
    }
