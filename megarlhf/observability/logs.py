"""Logging: one rank-aware format for megarlhf's own messages; everything else in the run's
log files, not on the console.

* :func:`get_logger` is ``logging.getLogger`` under the ``megarlhf`` tree; records carry the
  process's role and rank (:func:`set_context`), printed as ``megarlhf [actor r3]: ...``.
* :func:`setup_driver_logging` (the driver of a run, once its output directory is claimed):
  megarlhf's warnings and errors go to the console; every record (megarlhf's at INFO, other
  libraries' warnings, Python ``warnings``) to ``<output_dir>/logs/driver.log``.
* :func:`setup_worker_logging` (each Ray worker of the run: a role's rank, a rollout replica):
  the process's stdout and stderr (file descriptors 1 and 2, so vLLM's engine core and worker
  processes, which inherit them, and C++ code too) go to ``<output_dir>/logs/<role>-<rank>.log``
  instead of reaching the driver's console through Ray. A worker's failure still reaches the
  driver as the exception of its call, naming role, rank and method.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys

_CONTEXT = {"role": "driver", "rank": ""}
LOG_DIR_ENV = "MEGARLHF_LOG_DIR"


class _ContextFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.where = _CONTEXT["role"] + (f" r{_CONTEXT['rank']}" if _CONTEXT["rank"] != ""
                                           else "")
        return True


FORMAT = "%(asctime)s %(levelname)s %(name)s [%(where)s]: %(message)s"
CONSOLE_FORMAT = "megarlhf [%(where)s]: %(message)s"


def get_logger(name: str) -> logging.Logger:
    """The logger of a megarlhf module (``name`` is its ``__name__``)."""
    return logging.getLogger(name)


def set_context(role: str, rank: int | str = "") -> None:
    """What this process is, for every megarlhf record it logs."""
    _CONTEXT["role"], _CONTEXT["rank"] = role, str(rank)


def _file_handler(path: str) -> logging.Handler:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    h = logging.FileHandler(path, encoding="utf-8")
    h.setFormatter(logging.Formatter(FORMAT))
    h.addFilter(_ContextFilter())
    h.setLevel(logging.INFO)
    return h


def setup_driver_logging(output_dir: str) -> str:
    """The driver's handlers (see the module docstring); returns the log file's path.
    Idempotent per output directory."""
    path = os.path.join(output_dir, "logs", "driver.log")
    root = logging.getLogger()
    if any(getattr(h, "_megarlhf", None) == path for h in root.handlers):
        return path
    for h in list(root.handlers):  # an earlier run's handlers in this process
        if getattr(h, "_megarlhf", None):
            root.removeHandler(h)
            h.close()
    fh = _file_handler(path)
    fh._megarlhf = path
    root.addHandler(fh)
    root.setLevel(logging.INFO)
    logging.captureWarnings(True)  # Python warnings: py.warnings -> root -> the file only
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(logging.Formatter(CONSOLE_FORMAT))
    console.addFilter(_ContextFilter())
    console.setLevel(logging.WARNING)
    console._megarlhf = path
    mine = logging.getLogger("megarlhf")
    for h in list(mine.handlers):
        if getattr(h, "_megarlhf", None):
            mine.removeHandler(h)
    mine.addHandler(console)  # megarlhf's warnings on the console, and (propagating) the file
    mine.setLevel(logging.INFO)
    return path


def setup_worker_logging(role: str, rank: int) -> str | None:
    """In a Ray worker of a run whose driver set ``MEGARLHF_LOG_DIR``: stdout and stderr to
    ``<dir>/<role>-<rank>.log`` (see the module docstring). Returns the path, or None when the
    variable is unset (a worker started outside a run: tests, a library user)."""
    set_context(role, rank)
    log_dir = os.environ.get(LOG_DIR_ENV)
    if not log_dir:
        return None
    os.makedirs(log_dir, exist_ok=True)
    path = os.path.join(log_dir, f"{role}-{rank}.log")
    sys.stdout.flush()
    sys.stderr.flush()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    logging.captureWarnings(True)
    root = logging.getLogger()
    if not any(getattr(h, "_megarlhf_worker", False) for h in root.handlers):
        h = logging.StreamHandler(sys.stderr)  # fd 2: the file
        h.setFormatter(logging.Formatter(FORMAT))
        h.addFilter(_ContextFilter())
        h._megarlhf_worker = True
        root.addHandler(h)
        root.setLevel(logging.INFO)
    return path


@contextlib.contextmanager
def native_stderr_to(path: str):
    """File descriptor 2 goes to ``path`` (appended) while the block runs: what native code
    writes to stderr (Ray's core prints its token-authentication notice when ``ray.init``
    starts a local cluster) lands in the run's log instead of the console."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    sys.stderr.flush()
    saved = os.dup(2)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.dup2(fd, 2)
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        os.close(fd)
