"""A persistent pool of decode processes that survives decoders that crash or hang.

``concurrent.futures.ProcessPoolExecutor`` breaks as a whole when one child dies, cannot
say which task killed it, and cannot stop one task that hangs. Here each child runs one
task at a time, fed over its own pipe, so the parent always knows which file a child was
reading: a segfault or OOM kill fails that file with ``DecoderCrashed``, a reader that
never returns (a FIFO named ``x.dcm``) is killed and fails with ``DecoderTimeout``, and a
fresh child takes the next task.

Children start from ``forkserver`` (or ``spawn``), never by forking the parent, because
the parent runs torch: CUDA, OpenMP and thread pools do not survive a fork.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import math
import multiprocessing
import multiprocessing.forkserver
import os
import pickle
import selectors
import signal
import socket
import sys
import threading
import time
import traceback
from array import array
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from types import TracebackType
from typing import Any, TypeVar

import numpy as np

from radq.errors import ConfigurationError, DecoderCrashed, DecoderTimeout, RadqError

T = TypeVar("T")
log = logging.getLogger(__name__)

STOP_GRACE_S = 5.0
"""Seconds an idle child may take to exit after its pipe closes before it is killed."""

MAX_HANDOVERS = 3
"""Children that die before a task reaches them; past this the task fails, not loops."""

# --- Messages -------------------------------------------------------------------------
# Results are decoded images, e.g. 2500x2048 uint16 = 10 MB. Measured here (parent
# receiving from a forkserver child, median of 40): Connection.send/recv 16 ms; pickle
# protocol 5 with out-of-band buffers sent by send_bytes and read by recv_bytes 3.6 ms,
# but the array is then read-only; the same buffers read with os.readv straight into a
# buffer 2.6 ms and writable (one kernel copy, none in Python). So a message is its
# sizes (one send_bytes frame), then the pickle head and its buffers raw on the socket.

_Message = tuple[bytes, list[memoryview]]


def _encode(obj: object) -> _Message:
    buffers: list[pickle.PickleBuffer] = []
    head = pickle.dumps(obj, protocol=5, buffer_callback=buffers.append)
    return head, [buffer.raw() for buffer in buffers]


def _write(conn: Connection, message: _Message) -> None:
    head, raws = message
    conn.send_bytes(array("Q", [len(head), *(raw.nbytes for raw in raws)]))
    fd = conn.fileno()
    for part in (memoryview(head), *raws):
        while part:
            part = part[os.write(fd, part) :]


def _receive(conn: Connection) -> list[memoryview]:
    sizes = array("Q", conn.recv_bytes())
    fd = conn.fileno()
    parts: list[memoryview] = []
    for size in sizes:
        # Uninitialised: a bytearray is zeroed first, under the GIL, a decoded frame
        # (up to 10 MB) at a time; readv below runs without it.
        data = np.empty(size, np.uint8).data  # a writable memoryview of the array
        view = data
        while view:
            count = os.readv(fd, [view])
            if count == 0:
                raise EOFError("the other end closed the pipe mid-message")
            view = view[count:]
        parts.append(data)
    return parts


def _decode(parts: list[memoryview]) -> Any:
    return pickle.loads(parts[0], buffers=parts[1:])


# --- Child side -----------------------------------------------------------------------


def _child_main(
    conn: Connection, initializer: Callable[..., object] | None = None, initargs: tuple[Any, ...] = ()
) -> None:
    """Run tasks read from ``conn`` one at a time until the parent closes it or dies."""
    # Ctrl-C reaches the whole process group; the parent decides how its children stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _die_with_parent()
    if initializer is not None:
        initializer(*initargs)
    while True:
        try:
            parts = _receive(conn)
        except (EOFError, OSError):
            return  # the parent shut us down or died
        try:
            fn, args = _decode(parts)
            reply = _encode((True, fn(*args)))
        except Exception as exc:
            reply = _encode((False, _portable(exc), traceback.format_exc()))
        try:
            _write(conn, reply)
        except OSError:
            return


def _die_with_parent() -> None:
    """Make a child die with the process that owns the pool, even in the middle of a hang.

    An idle child sees EOF on its pipe; a hung one needs the kernel: PR_SET_PDEATHSIG
    fires when the child's parent dies. Under forkserver that parent is the fork server,
    which exits once every holder of its "alive" pipe is gone, and each child inherits
    one end of that pipe, so the child drops its copy to let the server follow the pool's
    process out.
    """
    if not sys.platform.startswith("linux"):
        return
    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
    server = multiprocessing.forkserver._forkserver
    alive_fd = getattr(server, "_forkserver_alive_fd", None)
    if isinstance(alive_fd, int):
        with contextlib.suppress(OSError):
            os.close(alive_fd)
        server._forkserver_alive_fd = None  # type: ignore[attr-defined]


def _portable(exc: BaseException) -> BaseException:
    """``exc`` if it survives a pickle round trip, else a RadqError with its type and text."""
    try:
        pickle.loads(pickle.dumps(exc, protocol=5))
    except Exception:
        return RadqError(f"{type(exc).__name__}: {exc}")
    return exc


class _RemoteTraceback(Exception):
    """The child's traceback, attached as ``__cause__`` so logs show where it failed."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text

    def __str__(self) -> str:
        return f'\n"""\n{self.text}"""'


def _death_reason(exitcode: int | None) -> str:
    """The words a person reads when a child died with ``exitcode`` while on a file."""
    if exitcode is not None and exitcode < 0:
        number = -exitcode
        try:
            name = signal.Signals(number).name
        except ValueError:
            name = "unknown signal"
        if number == signal.SIGKILL:
            name += ", perhaps from the out-of-memory killer"
        return f"the decoder process died with signal {number} ({name}) while reading this file"
    return f"the decoder process exited with code {exitcode} while reading this file"


# --- Parent side ----------------------------------------------------------------------


@dataclass(eq=False)
class _Task:
    future: Future[Any]
    message: _Message
    handovers: int = 0


@dataclass(eq=False)
class _Child:
    process: BaseProcess
    conn: Connection
    task: _Task | None = None
    deadline: float = math.inf


class ProcessPool:
    """Processes that run module-level functions one task each, surviving crashes and hangs.

    Tasks wait in an unbounded FIFO; callers bound how many they keep in flight. Future
    callbacks run on the pool's dispatcher thread, so they should be quick.

    Args:
        processes: how many children run tasks at once.
        task_timeout: seconds a task may run before its child is killed.
        name: prefix of the children's and the dispatcher thread's names.
        preload: modules the fork server imports once, so each child starts with them
            (forkserver only). There is one fork server per process: only the list given
            before it first starts counts.
        context: a ``multiprocessing`` start method; "forkserver" or "spawn" keep torch's
            threads and CUDA state out of the children.
        initializer: a module-level function each child calls with ``initargs`` before
            its first task (e.g. to configure logging, which a fresh child lacks).

    Raises:
        ValueError: for a count or timeout that is not positive, or an unknown context.
        ConfigurationError: inside a daemonic process (a Celery prefork child), which
            ``multiprocessing`` forbids to have children.
    """

    def __init__(
        self,
        processes: int,
        *,
        task_timeout: float,
        name: str = "radq-decode",
        preload: Sequence[str] = (),
        context: str = "forkserver",
        initializer: Callable[..., object] | None = None,
        initargs: tuple[Any, ...] = (),
    ) -> None:
        if processes < 1:
            raise ValueError(f"processes must be at least 1, got {processes}")
        if not task_timeout > 0:
            raise ValueError(f"task_timeout must be a positive number of seconds, got {task_timeout}")
        if multiprocessing.current_process().daemon:
            raise ConfigurationError(
                "the decode pool cannot start processes inside a daemonic process such as a "
                "Celery prefork child; run the worker with --pool=solo or --pool=threads"
            )
        self._ctx = multiprocessing.get_context(context)
        if context == "forkserver":
            # This module too, so children do not import it (and radq.errors) each time.
            self._ctx.set_forkserver_preload([*preload, __name__])
        self._processes = processes
        self._timeout = task_timeout
        self._name = name
        self._initializer, self._initargs = initializer, initargs
        self._started = 0
        self._children: list[_Child] = []  # the dispatcher thread's alone
        # What the dispatcher waits on: the wake-up socket, each child's pipe and exit
        # sentinel; kept across waits, not built anew for each result.
        self._selector = selectors.DefaultSelector()
        self._lock = threading.Lock()
        self._queue: deque[_Task] = deque()
        self._shutdown = False
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._selector.register(self._wake_r, selectors.EVENT_READ)
        # Children are started by this thread: under spawn, PR_SET_PDEATHSIG follows the
        # thread that forked, and this one outlives every child.
        self._thread = threading.Thread(target=self._run, name=f"{name}-dispatcher", daemon=True)
        self._thread.start()

    @property
    def processes(self) -> int:
        """How many children run tasks at once."""
        return self._processes

    def submit(self, fn: Callable[..., T], /, *args: Any) -> Future[T]:
        """Queue ``fn(*args)`` for a child; arguments are pickled here, in the caller.

        Returns:
            A Future with fn's result or exception, or ``DecoderCrashed`` /
            ``DecoderTimeout`` when the child died or ran past ``task_timeout``.

        Raises:
            RuntimeError: after ``shutdown``.
            pickle.PicklingError, TypeError, AttributeError: for a function or arguments
                that cannot be pickled (fn must be a module-level function).
        """
        message = _encode((fn, args))
        future: Future[T] = Future()
        with self._lock:
            if self._shutdown:
                raise RuntimeError(f"the process pool {self._name!r} is shut down")
            self._queue.append(_Task(future, message))
            self._wake()
        return future

    def shutdown(self, wait: bool = True) -> None:
        """Cancel queued tasks, let running ones finish, then stop the children.

        Args:
            wait: block until the children are stopped and the dispatcher has ended.
        """
        with self._lock:
            self._shutdown = True
            queued = list(self._queue)
            self._queue.clear()
            self._wake()
        for task in queued:
            _fail(task, RadqError(f"the process pool {self._name!r} was shut down"))
        if wait and threading.current_thread() is not self._thread:
            self._thread.join()

    def __enter__(self) -> ProcessPool:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.shutdown(wait=True)

    def _wake(self) -> None:
        """Interrupt the dispatcher's wait; called with the lock held."""
        with contextlib.suppress(OSError):  # full (a wake-up is pending anyway) or closed
            self._wake_w.send(b"\0")

    # The dispatcher thread --------------------------------------------------------

    def _run(self) -> None:
        try:
            for _ in range(self._processes):
                self._children.append(self._start())
            self._loop()
        except BaseException:
            log.exception("process pool %r stopped after an internal error", self._name)
            with self._lock:
                self._shutdown = True
                stranded = [*self._queue, *(c.task for c in self._children if c.task)]
                self._queue.clear()
            for task in stranded:
                _fail(task, RadqError(f"the process pool {self._name!r} failed; see the log"))
            for child in self._children:
                child.task = None
        finally:
            for child in list(self._children):
                self._retire(child)
            with self._lock:
                self._selector.close()
                self._wake_r.close()
                self._wake_w.close()

    def _loop(self) -> None:
        while True:
            with self._lock:
                stopping = self._shutdown
            if stopping:
                self._stop_idle()
                if not self._children:
                    return
            else:
                self._hand_out()
            deadline = min((child.deadline for child in self._children), default=math.inf)
            timeout = None if deadline == math.inf else max(0.0, deadline - time.monotonic())
            ready = {key.fileobj for key, _ in self._selector.select(timeout)}
            if self._wake_r in ready:
                with contextlib.suppress(BlockingIOError):
                    while self._wake_r.recv(4096):
                        pass
            for child in list(self._children):
                # A result sent just before the child died is still taken.
                if child.conn in ready:
                    self._collect(child)
                elif child.process.sentinel in ready:
                    self._retire(child)
                elif child.deadline <= time.monotonic():
                    self._retire(child, timed_out=True)

    def _start(self) -> _Child:
        parent_end, child_end = self._ctx.Pipe()
        self._started += 1
        process = self._ctx.Process(  # type: ignore[attr-defined]
            target=_child_main,
            args=(child_end, self._initializer, self._initargs),
            name=f"{self._name}-{self._started}",
            daemon=True,
        )
        process.start()
        child_end.close()  # so the child's death reads as EOF here
        self._selector.register(parent_end, selectors.EVENT_READ)
        self._selector.register(process.sentinel, selectors.EVENT_READ)
        return _Child(process, parent_end)

    def _forget(self, child: _Child) -> None:
        """Stop waiting on a child's pipe and sentinel (before either is closed)."""
        for source in (child.conn, child.process.sentinel):
            with contextlib.suppress(KeyError, ValueError, OSError):  # forgotten, or closed
                self._selector.unregister(source)

    def _hand_out(self) -> None:
        """Give queued tasks to idle children, starting children up to ``processes``."""
        while True:
            with self._lock:
                idle = next((child for child in self._children if child.task is None), None)
                if not self._queue or (idle is None and len(self._children) >= self._processes):
                    return
                task = self._queue.popleft()
            if not (task.future.running() or task.future.set_running_or_notify_cancel()):
                continue  # cancelled while queued
            if idle is None:
                try:
                    idle = self._start()
                except BaseException:
                    self._requeue(task)
                    raise
                self._children.append(idle)
            try:
                _write(idle.conn, task.message)
            except OSError:
                # The child died before the task reached it: not the file's fault.
                self._retire(idle)
                task.handovers += 1
                if task.handovers < MAX_HANDOVERS:
                    self._requeue(task)
                else:
                    _fail(task, RadqError(f"{MAX_HANDOVERS} decoder processes died before taking a task"))
                continue
            idle.task, idle.deadline = task, time.monotonic() + self._timeout

    def _requeue(self, task: _Task) -> None:
        with self._lock:
            if not self._shutdown:
                self._queue.appendleft(task)
                return
        _fail(task, RadqError(f"the process pool {self._name!r} was shut down"))

    def _collect(self, child: _Child) -> None:
        """Read a child's reply and settle its task's Future."""
        try:
            parts = _receive(child.conn)
        except (EOFError, OSError):
            self._retire(child)  # it died; its exit status says how
            return
        task, child.task, child.deadline = child.task, None, math.inf
        if task is None:
            return
        try:
            ok, value, *remote_tb = _decode(parts)
        except Exception as exc:
            error = RadqError(f"a result could not be read back: {type(exc).__name__}: {exc}")
            task.future.set_exception(error)
            return
        if ok:
            task.future.set_result(value)
        else:
            value.__cause__ = _RemoteTraceback(remote_tb[0])
            task.future.set_exception(value)

    def _retire(self, child: _Child, *, timed_out: bool = False) -> None:
        """Kill (if needed) and reap a child; fail the task it was running, if any."""
        self._forget(child)
        if child.process.is_alive():
            child.process.kill()
        child.process.join()
        child.conn.close()
        self._children.remove(child)
        task, child.task = child.task, None
        if task is None:
            return
        error: RadqError
        if timed_out:
            error = DecoderTimeout(
                f"decoding took longer than {self._timeout:g} s (RADQ_DECODE_TIMEOUT); "
                "the reading process was stopped"
            )
        else:
            error = DecoderCrashed(_death_reason(child.process.exitcode))
        log.warning("%s (pid %s): %s", child.process.name, child.process.pid, error)
        task.future.set_exception(error)

    def _stop_idle(self) -> None:
        """Close idle children's pipes so they exit, then reap them."""
        idle = [child for child in self._children if child.task is None]
        for child in idle:
            self._forget(child)
            child.conn.close()
        for child in idle:
            child.process.join(STOP_GRACE_S)
            self._retire(child)


def _fail(task: _Task, error: RadqError) -> None:
    """Cancel a task that has not started, else give it ``error``."""
    if not task.future.cancel():
        with contextlib.suppress(InvalidStateError):
            task.future.set_exception(error)
