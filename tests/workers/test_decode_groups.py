"""A message's instances go to the decode processes several per task, and every process gets some.

Each decode task costs the worker process's one GIL a pickle, pipe writes, a wake-up and a
hand-off; groups of up to GROUP_MAX instances divide that cost (a file that crashes or hangs
its group is retried alone: tests/integration/test_faults.py).
"""

from __future__ import annotations

import pytest

from workers.engine import GROUP_MAX, group_size


@pytest.mark.parametrize(
    ("instances", "processes", "want"),
    [
        (64, 2, GROUP_MAX),  # a CPU host's chunk: full groups
        (64, 16, 4),  # a GPU host's 16 decode processes each get a group of the chunk
        (3, 16, 1),  # fewer instances than processes: one per task, all in parallel
        (1, 1, 1),
        (5, 1, 5),
        (4096, 1, GROUP_MAX),
    ],
)
def test_group_size_fills_every_decode_process_and_stays_bounded(
    instances: int, processes: int, want: int
) -> None:
    assert group_size(instances, processes) == want
