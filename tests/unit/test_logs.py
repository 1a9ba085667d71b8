"""megarlhf.observability.logs: library output to the run's log files, megarlhf's warnings to
the console. Each case runs in a fresh interpreter (it rewires file descriptors and logging)."""

import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.unit


def _run(code, env=None):
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=dict(os.environ, **(env or {})), timeout=60)


def test_worker_output_goes_to_its_log_file(tmp_path):
    """Broken: a worker's stdout/stderr (vLLM's and C++ code's included: file descriptors 1 and
    2) reaches the driver's console through Ray instead of <output_dir>/logs/<role>-<rank>.log."""
    code = (
        "import logging, os, warnings\n"
        "from megarlhf.observability.logs import setup_worker_logging\n"
        "path = setup_worker_logging('actor', 3)\n"
        "print('from python')\n"
        "os.write(2, b'from fd 2\\n')\n"
        "logging.getLogger('megarlhf.x').warning('mine')\n"
        "logging.getLogger('vllm.y').warning('theirs')\n"
        "warnings.warn('a library warning')\n"
    )
    r = _run(code, {"MEGARLHF_LOG_DIR": str(tmp_path)})
    assert r.returncode == 0, r.stderr
    assert r.stdout == "" and r.stderr == ""
    text = (tmp_path / "actor-3.log").read_text()
    for s in ("from python", "from fd 2", "[actor r3]: mine", "theirs", "a library warning"):
        assert s in text, (s, text)


def test_driver_console_holds_megarlhf_warnings_only(tmp_path):
    """Broken: other libraries' warnings (or Python warnings) print on the driver's console, or
    megarlhf's own warnings do not, or the run's driver.log misses either."""
    code = (
        "import logging, warnings\n"
        f"from megarlhf.observability.logs import setup_driver_logging\n"
        f"path = setup_driver_logging({str(tmp_path)!r})\n"
        "logging.getLogger('megarlhf.controller').warning('act on this')\n"
        "logging.getLogger('megarlhf.controller').info('detail')\n"
        "logging.getLogger('ray').warning('a ray banner')\n"
        "warnings.warn('deprecated thing')\n"
    )
    r = _run(code)
    assert r.returncode == 0, r.stderr
    assert "act on this" in r.stderr and "[driver]" in r.stderr
    for s in ("detail", "a ray banner", "deprecated thing"):
        assert s not in r.stderr and s not in r.stdout
    text = (tmp_path / "logs" / "driver.log").read_text()
    for s in ("act on this", "detail", "a ray banner", "deprecated thing"):
        assert s in text, (s, text)


def test_worker_without_a_run_keeps_its_output():
    """Broken: a worker started outside a run (a test, a library user) loses its output."""
    code = ("from megarlhf.observability.logs import setup_worker_logging\n"
            "assert setup_worker_logging('rollout', 0) is None\nprint('visible')\n")
    r = _run(code, {"MEGARLHF_LOG_DIR": ""})
    assert r.returncode == 0 and "visible" in r.stdout


def test_native_stderr_goes_to_the_log_while_ray_starts(tmp_path, capfd):
    """If this fails, what native code writes to file descriptor 2 while a local Ray cluster
    starts (Ray's core prints a token-authentication notice there) reaches the console instead
    of logs/driver.log, or stderr is not given back afterwards."""
    import os

    from megarlhf.observability.logs import native_stderr_to

    log = tmp_path / "logs" / "driver.log"
    with native_stderr_to(str(log)):
        os.write(2, b"native notice\n")
    os.write(2, b"after\n")
    err = capfd.readouterr().err
    assert "native notice" not in err and "after" in err
    assert log.read_text() == "native notice\n"
