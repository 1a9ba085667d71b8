"""A persistent helper process that runs importable functions under a hard wall-time limit.

``signal.alarm`` timeouts work only in the main thread and cannot interrupt a long C call (a
huge sympy integer, a regex blow-up). A call made here runs in a separate interpreter; past its
limit the process is killed (and started again on the next call), so the caller always gets an
answer in bounded time. Requests and results travel as JSON lines over pipes, so functions are
named by import path and their arguments and results must be JSON values. The helper does not
import the caller's ``__main__`` (unlike ``multiprocessing``'s spawn/forkserver).
"""

from __future__ import annotations

import atexit
import json
import os
import select
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Sequence

_WORKER = r"""
import importlib, json, os, sys
out = os.fdopen(os.dup(1), "w")
os.dup2(2, 1)                 # prints of the called code go to stderr, not into the protocol
sys.stdout = sys.stderr
for line in sys.stdin:
    req = json.loads(line)
    try:
        mod, _, name = req["fn"].rpartition(".")
        res = {"ok": True, "result": getattr(importlib.import_module(mod), name)(*req["args"])}
    except Exception as e:
        res = {"ok": False, "error": f"{type(e).__name__}: {e}"}
    out.write(json.dumps(res) + "\n")
    out.flush()
"""


class HelperProcess:
    """One helper interpreter; calls are serialized (one at a time)."""

    def __init__(self):
        self._proc: subprocess.Popen | None = None
        self._buf = b""
        self._lock = threading.Lock()

    def _start(self) -> subprocess.Popen:
        root = str(Path(__file__).resolve().parents[2])  # the directory holding megarlhf/
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([root] + [p for p in [env.get("PYTHONPATH")] if p])
        self._buf = b""
        return subprocess.Popen([sys.executable, "-c", _WORKER], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env)

    def _kill(self) -> None:
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait()
            for f in (self._proc.stdin, self._proc.stdout):
                f.close()
            self._proc = None

    def call(self, fn: str, args: Sequence[Any], timeout_s: float) -> Any:
        """``fn(*args)`` in the helper, ``fn`` an import path like ``"pkg.module.function"``.

        Raises:
            TimeoutError: no answer within ``timeout_s`` (the helper was killed).
            RuntimeError: the function raised (the message names the exception).
        """
        with self._lock:
            if self._proc is None or self._proc.poll() is not None:
                self._kill()
                self._proc = self._start()
            proc = self._proc
            try:
                proc.stdin.write((json.dumps({"fn": fn, "args": list(args)}) + "\n").encode())
                proc.stdin.flush()
            except BrokenPipeError:
                self._kill()
                raise RuntimeError(f"helper process died before running {fn}") from None
            deadline = time.monotonic() + timeout_s
            fd = proc.stdout.fileno()
            while b"\n" not in self._buf:
                left = deadline - time.monotonic()
                if left <= 0 or not select.select([fd], [], [], left)[0]:
                    self._kill()
                    raise TimeoutError(f"{fn} did not finish within {timeout_s} s; "
                                       f"the helper process was killed")
                chunk = os.read(fd, 65536)
                if not chunk:
                    self._kill()
                    raise RuntimeError(f"helper process died while running {fn}")
                self._buf += chunk
            line, self._buf = self._buf.split(b"\n", 1)
        reply = json.loads(line)
        if not reply["ok"]:
            raise RuntimeError(f"{fn} failed in the helper process: {reply['error']}")
        return reply["result"]

    def close(self) -> None:
        with self._lock:
            self._kill()


_HELPER = HelperProcess()
atexit.register(_HELPER.close)


def run_in_helper(fn: str, args: Sequence[Any], timeout_s: float) -> Any:
    """Run the importable function ``fn`` (dotted path) on JSON ``args`` in the shared helper
    process, with a hard wall-time limit (see :class:`HelperProcess.call`)."""
    return _HELPER.call(fn, args, timeout_s)
