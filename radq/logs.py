"""Log configuration for every radq process: plain text or one JSON object per line.

``RADQ_LOG_FORMAT=json`` makes each line a JSON object with ``time``, ``level``,
``logger`` and ``message``, plus ``job_id``, ``instance_id`` and ``worker`` where they
are known. The ids live in context variables that the code processing a chunk or an
instance sets (:func:`log_context`); threads do not inherit context variables, so the
engine's stages set them again from the ids their items carry. The worker's Celery
hostname is one per process (:func:`set_worker_name`).
"""

from __future__ import annotations

import io
import json
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import UTC, datetime

LOG_FORMATS = ("text", "json")
"""Values of ``RADQ_LOG_FORMAT``."""
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"
"""The line format of ``RADQ_LOG_FORMAT=text``."""

job_id_var: ContextVar[str | None] = ContextVar("radq_job_id", default=None)
instance_id_var: ContextVar[int | None] = ContextVar("radq_instance_id", default=None)
_worker_name: str | None = None


def set_worker_name(name: str | None) -> None:
    """Name every later log line of this process with the worker's Celery hostname."""
    global _worker_name
    _worker_name = name


@contextmanager
def log_context(*, job_id: str | None = None, instance_id: int | None = None) -> Iterator[None]:
    """Attach a job id and/or instance id to the log lines written inside the block."""
    job_token = job_id_var.set(job_id) if job_id is not None else None
    instance_token = instance_id_var.set(instance_id) if instance_id is not None else None
    try:
        yield
    finally:
        if instance_token is not None:
            instance_id_var.reset(instance_token)
        if job_token is not None:
            job_id_var.reset(job_token)


class ContextFilter(logging.Filter):
    """Copies the context's ids and the worker name onto each record (never drops one)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "job_id", None) is None:
            record.job_id = job_id_var.get()
        if getattr(record, "instance_id", None) is None:
            record.instance_id = instance_id_var.get()
        if getattr(record, "worker", None) is None:
            record.worker = _worker_name
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per record; a traceback goes into ``exception``, never onto new lines."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key in ("job_id", "instance_id", "worker"):
            value = getattr(record, key, None)
            if value is not None:
                line[key] = value
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            line["exception"] = record.exc_text
        if record.stack_info:
            line["stack"] = self.formatStack(record.stack_info)
        return json.dumps(line, ensure_ascii=False, default=str)


class LogStream(io.TextIOBase):
    """A text stream whose lines become log records: what libraries print joins the JSON log."""

    def __init__(self, logger: str) -> None:
        super().__init__()
        self._log = logging.getLogger(logger)
        self._pending = ""

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        lines = (self._pending + text).split("\n")
        self._pending = lines.pop()
        for line in lines:
            if line.strip():
                self._log.info("%s", line.rstrip())
        return len(text)

    def flush(self) -> None:
        if self._pending.strip():
            self._log.info("%s", self._pending.rstrip())
        self._pending = ""


def configure_logging(level: str, log_format: str = "text") -> None:
    """Send every logger's records to stderr in ``log_format``, replacing earlier handlers.

    Args:
        level: a logging level name (``info``, ``DEBUG``…).
        log_format: ``text`` or ``json``.

    Raises:
        ValueError: for another format.
    """
    if log_format not in LOG_FORMATS:
        raise ValueError(f"log format must be one of {', '.join(LOG_FORMATS)}, not {log_format!r}")
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(ContextFilter())  # on the handler, so records propagated from any logger pass it
    handler.setFormatter(JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    # Library warnings (warnings.warn) become records too, so JSON stays one object a line.
    logging.captureWarnings(log_format == "json")
    if log_format == "json":
        # Celery prints its shutdown notices to sys.__stdout__, others print to sys.stdout:
        # both become records. Records go to stderr, through the stream the handler holds.
        stream = LogStream("stdout")
        sys.stdout = stream
        setattr(sys, "__stdout__", stream)  # noqa: B010 (typeshed marks it final; Celery writes to it)


def current_level() -> str:
    """The root logger's level name, to give processes this one starts."""
    return logging.getLevelName(logging.getLogger().getEffectiveLevel())


def configure_child_logging(level: str, log_format: str, worker: str | None) -> None:
    """Log like the parent: what a worker's decode processes run first (they start bare)."""
    configure_logging(level, log_format)
    set_worker_name(worker)


def worker_name() -> str | None:
    """The Celery hostname set by :func:`set_worker_name`, if any."""
    return _worker_name
