"""Run untrusted Python code against test cases in a limited subprocess; reward = pass fraction.

Each test case runs in its own fresh interpreter:

* a wall-time limit (the process group is killed) and a CPU-time limit (``RLIMIT_CPU``);
* a memory limit (``RLIMIT_AS``, address space) and a file-size limit (``RLIMIT_FSIZE``) that
  also caps stdout/stderr, which go to files: an output flood stops at ``max_output_bytes``;
* no network: the process runs in a new, empty network namespace (``unshare -rn``) where the
  kernel allows it, and in any case an audit hook (``sys.addaudithook``) refuses every
  ``socket.*`` event and process creation (``subprocess``, ``os.system``, ``fork``, ``exec``);
* a temporary working directory, removed afterwards, and a minimal environment.

Test cases come in two forms (the ``test_cases`` field of a prompt row):

* a string: Python code run after the solution in the same namespace, e.g.
  ``"assert add(2, 3) == 5"``; it passes if it finishes without an exception. Exiting early
  (``sys.exit``, ``os._exit``) does not pass: the harness reports success through a pipe, with a
  token the code does not see, only after the test code has finished.
* ``{"input": str, "output": str}``: the solution runs as a program with that stdin and passes
  if it exits normally and its stdout equals ``output`` (trailing whitespace ignored per line
  and at the end).

Threat model: this stops mistakes and the common reward hacks of RL-trained policies (early
exit, printing "passed", infinite loops, memory or output floods, network use). The audit hook
is not a security boundary against deliberately hostile code (``ctypes`` can get around it; the
filesystem is readable): run untrusted code from the internet inside a container as well.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Mapping, Sequence

from megarlhf.rewards.base import check_batch

TestCase = str | Mapping[str, str]

# The harness: set limits, read the token, install the audit hook, run solution (+ test), and
# write the token to the result pipe only if all of it finished. argv: limits.json.
_HARNESS = r'''
import sys


def _run():
    import json, os, resource
    with open(sys.argv[1]) as f:
        cfg = json.load(f)
    for kind, value in ((resource.RLIMIT_AS, cfg["memory_bytes"]),
                        (resource.RLIMIT_CPU, cfg["cpu_seconds"]),
                        (resource.RLIMIT_FSIZE, cfg["file_bytes"]),
                        (resource.RLIMIT_CORE, 0)):
        try:
            resource.setrlimit(kind, (value, value))
        except (ValueError, OSError):
            pass
    token = os.read(cfg["nonce_fd"], 256)
    os.close(cfg["nonce_fd"])
    result_fd = cfg["result_fd"]
    with open(cfg["solution"]) as f:
        solution = f.read()
    test = None
    if cfg["test"]:
        with open(cfg["test"]) as f:
            test = f.read()
    block_net, block_proc = cfg["block_network"], cfg["block_processes"]
    proc_events = ("subprocess.Popen", "os.system", "os.exec", "os.posix_spawn", "os.spawn",
                   "os.fork", "os.forkpty", "pty.spawn")

    def hook(event, args):
        if block_net and event.startswith("socket."):
            raise PermissionError("network access is disabled in the sandbox")
        if block_proc and event.startswith(proc_events):
            raise PermissionError("starting processes is disabled in the sandbox")

    sys.addaudithook(hook)
    g = {"__name__": "__main__", "__builtins__": __builtins__}
    ok = False
    try:
        exec(compile(solution, "solution.py", "exec"), g)
        if test is not None:
            exec(compile(test, "test.py", "exec"), g)
        ok = True
    except SystemExit as e:
        ok = test is None and e.code in (None, 0)
        if not ok:
            raise
    finally:
        try:
            sys.stdout.flush()
        except Exception:
            ok = False
    if ok:
        os.write(result_fd, token)


_run()
'''


@dataclass(frozen=True)
class SandboxLimits:
    """Resource limits of one test-case run.

    Attributes:
        timeout_s: wall-clock seconds before the process group is killed.
        memory_mb: address-space limit (RLIMIT_AS) in MiB; the interpreter itself needs ~50.
        max_output_bytes: stdout and stderr are each cut at this size (and writing more fails).
        network_namespace: run in a new network namespace with ``unshare -rn``: None = when
            available, True = required, False = never (the audit hook blocks sockets anyway).
        block_processes: refuse subprocess/fork/exec in the code.
    """

    timeout_s: float = 5.0
    memory_mb: int = 512
    max_output_bytes: int = 64 * 1024
    network_namespace: bool | None = None
    block_processes: bool = True

    def __post_init__(self):
        if not self.timeout_s > 0:
            raise ValueError(f"sandbox timeout_s must be > 0, got {self.timeout_s}")
        if self.memory_mb < 64:
            raise ValueError(f"sandbox memory_mb must be >= 64 (the interpreter needs it), "
                             f"got {self.memory_mb}")
        if self.max_output_bytes < 1:
            raise ValueError(f"sandbox max_output_bytes must be >= 1, got {self.max_output_bytes}")


@dataclass
class CaseResult:
    """The outcome of one test case.

    ``status``: "pass", "fail" (wrong output or assertion), "error" (an exception),
    "timeout", "memory" (MemoryError or killed near the memory limit), "output_limit".
    """

    status: str
    stdout: str = ""
    stderr: str = ""
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        return self.status == "pass"


@dataclass
class SandboxResult:
    cases: list[CaseResult] = field(default_factory=list)

    @property
    def passed(self) -> int:
        return sum(c.passed for c in self.cases)

    @property
    def total(self) -> int:
        return len(self.cases)

    @property
    def pass_fraction(self) -> float:
        return self.passed / self.total if self.cases else 0.0


@lru_cache(maxsize=1)
def network_namespace_available() -> bool:
    """Whether ``unshare -rn`` works here (user namespaces allowed, util-linux installed)."""
    exe = shutil.which("unshare")
    if exe is None:
        return False
    try:
        r = subprocess.run([exe, "-rn", sys.executable, "-c", "pass"], capture_output=True,
                           timeout=10)
        return r.returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def _read_head(path: Path, n: int) -> tuple[str, bool]:
    with open(path, "rb") as f:
        data = f.read(n + 1)
    return data[:n].decode("utf-8", errors="replace"), len(data) > n


def _normalize_output(s: str) -> str:
    return "\n".join(line.rstrip() for line in s.rstrip().splitlines())


def run_case(code: str, case: TestCase, limits: SandboxLimits | None = None) -> CaseResult:
    """Run ``code`` against one test case (see the module docstring)."""
    limits = limits or SandboxLimits()
    if isinstance(case, str):
        test, stdin_text, expected = case, "", None
    elif isinstance(case, Mapping) and "input" in case and "output" in case:
        test, stdin_text, expected = None, str(case["input"]), str(case["output"])
    else:
        raise ValueError(f"test case must be an assert string or {{'input', 'output'}}, "
                         f"got {case!r}")
    use_ns = limits.network_namespace
    if use_ns is None:
        use_ns = network_namespace_available()
    elif use_ns and not network_namespace_available():
        raise RuntimeError("sandbox network_namespace=True but 'unshare -rn' does not work "
                           "here (needs util-linux and unprivileged user namespaces)")

    with tempfile.TemporaryDirectory(prefix="megarlhf-sandbox-") as tmp:
        d = Path(tmp)
        (d / "solution.py").write_text(code)
        if test is not None:
            (d / "test.py").write_text(test)
        (d / "stdin.txt").write_text(stdin_text)
        (d / "harness.py").write_text(_HARNESS)
        nonce_r, nonce_w = os.pipe()
        result_r, result_w = os.pipe()
        token = secrets.token_hex(16).encode()
        cfg = {
            "memory_bytes": int(limits.memory_mb) * 2**20,
            "cpu_seconds": int(limits.timeout_s) + 1,
            "file_bytes": int(limits.max_output_bytes) + 1,
            "nonce_fd": nonce_r, "result_fd": result_w,
            "solution": str(d / "solution.py"),
            "test": str(d / "test.py") if test is not None else None,
            "block_network": True, "block_processes": limits.block_processes,
        }
        (d / "limits.json").write_text(json.dumps(cfg))
        work = d / "work"
        work.mkdir()
        cmd = [sys.executable, "-I", "-B", str(d / "harness.py"), str(d / "limits.json")]
        if use_ns:
            cmd = [shutil.which("unshare"), "-rn"] + cmd
        env = {"PATH": "/usr/bin:/bin", "HOME": str(work), "TMPDIR": str(work),
               "LANG": "C.UTF-8", "PYTHONHASHSEED": "0", "PYTHONIOENCODING": "utf-8",
               # Thread pools (OpenBLAS, OpenMP) reserve memory per thread: keep one.
               "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        t0 = time.monotonic()
        timed_out = False
        with open(d / "stdin.txt", "rb") as fin, open(d / "stdout", "wb") as fout, \
                open(d / "stderr", "wb") as ferr:
            try:
                proc = subprocess.Popen(cmd, stdin=fin, stdout=fout, stderr=ferr, cwd=work,
                                        env=env, pass_fds=(nonce_r, result_w),
                                        start_new_session=True)
            finally:
                os.close(nonce_r)
                os.close(result_w)
            try:
                os.write(nonce_w, token)
            except OSError:
                pass
            os.close(nonce_w)
            try:
                proc.wait(timeout=limits.timeout_s)
            except subprocess.TimeoutExpired:
                timed_out = True
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # the whole group, whatever it started
            except (ProcessLookupError, PermissionError):
                pass
            proc.wait()
        seconds = time.monotonic() - t0
        # Non-blocking: a descendant that escaped the process group must not hang us here.
        os.set_blocking(result_r, False)
        try:
            reported = os.read(result_r, 1024)
        except BlockingIOError:
            reported = b""
        os.close(result_r)
        stdout, out_over = _read_head(d / "stdout", limits.max_output_bytes)
        stderr, err_over = _read_head(d / "stderr", limits.max_output_bytes)

    def result(status: str) -> CaseResult:
        return CaseResult(status, stdout, stderr, seconds)

    if timed_out:
        return result("timeout")
    if out_over or err_over or "File too large" in stderr:
        return result("output_limit")
    if reported == token and proc.returncode == 0:
        if expected is None or _normalize_output(stdout) == _normalize_output(expected):
            return result("pass")
        return result("fail")
    if "MemoryError" in stderr or proc.returncode in (-signal.SIGSEGV, -signal.SIGKILL):
        return result("memory")
    if proc.returncode in (-signal.SIGXCPU,):
        return result("timeout")
    if re.search(r"^AssertionError", stderr, re.M) or expected is not None:
        return result("fail")
    return result("error")


def run_tests(code: str, test_cases: Sequence[TestCase], limits: SandboxLimits | None = None,
              max_workers: int = 1) -> SandboxResult:
    """Run ``code`` against every test case, ``max_workers`` processes at a time."""
    limits = limits or SandboxLimits()
    if max_workers <= 1 or len(test_cases) <= 1:
        return SandboxResult([run_case(code, c, limits) for c in test_cases])
    with ThreadPoolExecutor(max_workers) as ex:
        return SandboxResult(list(ex.map(lambda c: run_case(code, c, limits), test_cases)))


_FENCE_RE = re.compile(r"```(?:python|py|python3)?[ \t]*\n(.*?)```", re.S)


def extract_code(response: str) -> str:
    """The code in a response: the last fenced block (```python ... ```), else the whole text."""
    blocks = _FENCE_RE.findall(response)
    return blocks[-1] if blocks else response


class CodeSandboxReward:
    """Reward = fraction of ``metadata["test_cases"]`` the response's code passes
    (a :class:`~megarlhf.rewards.base.RewardFn`).

    Args:
        limits: per-test-case limits.
        max_workers: test cases run in parallel (processes).
        test_cases_key: the metadata key holding the test cases.
    """

    def __init__(self, limits: SandboxLimits | None = None, max_workers: int = 2,
                 test_cases_key: str = "test_cases"):
        self.limits = limits or SandboxLimits()
        self.max_workers = max_workers
        self.test_cases_key = test_cases_key

    def __call__(self, prompts: Sequence[Any], responses: Sequence[str],
                 metadata: Sequence[Mapping[str, Any]] | None = None) -> list[float]:
        metadata = check_batch(prompts, responses, metadata)
        jobs = []  # (sample, case)
        for i, m in enumerate(metadata):
            cases = m.get(self.test_cases_key)
            if not cases:
                raise ValueError(f"code sandbox: sample {i} has no '{self.test_cases_key}' in "
                                 f"its metadata; the prompt rows need test cases")
            jobs += [(i, c) for c in cases]
        codes = [extract_code(r) for r in responses]

        def run(job):
            i, c = job
            return i, run_case(codes[i], c, self.limits).passed

        passed = [0] * len(responses)
        total = [0] * len(responses)
        with ThreadPoolExecutor(max(1, self.max_workers)) as ex:
            for i, ok in ex.map(run, jobs):
                passed[i] += ok
                total[i] += 1
        return [p / t for p, t in zip(passed, total)]
