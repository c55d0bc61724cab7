"""Peak memory of a process and its descendants (Linux ``/proc``).

The worker is a process tree: ``radq worker`` (Celery's main process), its pool child,
and whatever that child starts to decode. Each process's ``VmHWM`` is its peak
resident set; writing ``5`` to ``/proc/<pid>/clear_refs`` resets it, so a figure can
report the peak of its own span. Descendants are found from every process's parent id
(``/proc/<pid>/stat``), since ``/proc/<pid>/task/*/children`` needs a kernel option
that not every kernel has. A sampler thread keeps the last peak seen of processes that
exit during the span, and the largest sum of current resident sets seen at once.
"""

from __future__ import annotations

import threading
from pathlib import Path
from types import TracebackType

PROC = Path("/proc")
SAMPLE_SECONDS = 0.25
"""How often the sampler reads the process tree."""


def _parent(pid: int) -> int | None:
    try:
        stat = (PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    # The command name (field 2) is in parentheses and may hold spaces or parentheses.
    return int(stat.rsplit(")", 1)[1].split()[1])


def descendants(pid: int) -> list[int]:
    """``pid`` and every process below it, parents first."""
    children: dict[int, list[int]] = {}
    for entry in PROC.iterdir():
        if entry.name.isdigit():
            parent = _parent(int(entry.name))
            if parent is not None:
                children.setdefault(parent, []).append(int(entry.name))
    found, queue = [], [pid]
    while queue:
        current = queue.pop(0)
        found.append(current)
        queue.extend(sorted(children.get(current, [])))
    return found


def _status_kib(pid: int, field: str) -> int | None:
    try:
        for line in (PROC / str(pid) / "status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def reset_peaks(pid: int) -> bool:
    """Reset ``VmHWM`` of ``pid`` and its descendants; False where the kernel refused."""
    ok = True
    for member in descendants(pid):
        try:
            (PROC / str(member) / "clear_refs").write_text("5")
        except OSError:
            ok = False
    return ok


class TreePeak:
    """Context manager: the worker tree's peak memory over the ``with`` block.

    Attributes after exit:
        hwm_mib: sum over the processes seen of each one's ``VmHWM`` (shared pages count
            once per process, so this is an upper bound of what the tree held at once).
        rss_mib: the largest sum of ``VmRSS`` over the tree seen at one sample.
        processes: how many processes were seen.
        reset: whether the peaks were reset at the start (else they span the process's life).
    """

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.hwm_mib = 0.0
        self.rss_mib = 0.0
        self.processes = 0
        self.reset = False
        self._hwm: dict[int, int] = {}
        self._rss_peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-memory", daemon=True)

    def _sample(self) -> None:
        rss = 0
        for member in descendants(self.pid):
            hwm = _status_kib(member, "VmHWM")
            if hwm is not None:
                self._hwm[member] = max(hwm, self._hwm.get(member, 0))
            rss += _status_kib(member, "VmRSS") or 0
        self._rss_peak = max(self._rss_peak, rss)

    def _run(self) -> None:
        while not self._stop.wait(SAMPLE_SECONDS):
            self._sample()

    def __enter__(self) -> TreePeak:
        self.reset = reset_peaks(self.pid)
        self._sample()
        self._thread.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()
        self.hwm_mib = round(sum(self._hwm.values()) / 1024, 1)
        self.rss_mib = round(self._rss_peak / 1024, 1)
        self.processes = len(self._hwm)
