"""The code sandbox (megarlhf/rewards/code_sandbox.py): pass/fail, time and memory limits,
no network, bounded output, and the reward-hacking guards (early exit, subprocesses)."""

import socket

import pytest

from megarlhf.rewards.code_sandbox import (
    CodeSandboxReward,
    SandboxLimits,
    extract_code,
    network_namespace_available,
    run_case,
    run_tests,
)

ADD = "def add(a, b):\n    return a + b\n"
FAST = SandboxLimits(timeout_s=1.5, memory_mb=256)


def test_passing_and_failing_code():
    """If this fails, correct code is scored as failing or wrong code as passing."""
    assert run_case(ADD, "assert add(2, 3) == 5", FAST).status == "pass"
    r = run_case(ADD, "assert add(2, 3) == 6", FAST)
    assert r.status == "fail" and "AssertionError" in r.stderr
    assert run_case("def add(a, b) return", "assert add(1, 1) == 2", FAST).status == "error"
    assert run_case("raise ValueError('x')", "pass", FAST).status == "error"
    io = {"input": "21\n", "output": "42\n"}
    assert run_case("print(int(input()) * 2)", io, FAST).status == "pass"
    assert run_case("print(int(input()) * 2)   \n", {"input": "1", "output": "2"}, FAST).passed
    assert run_case("print(int(input()) * 3)", io, FAST).status == "fail"
    cases = ["assert add(1, 1) == 2", "assert add(1, 2) == 3", "assert add(0, 0) == 1"]
    res = run_tests(ADD, cases, FAST, max_workers=2)
    assert (res.passed, res.total) == (2, 3) and res.pass_fraction == pytest.approx(2 / 3)


def test_early_exit_does_not_pass():
    """If this fails, a policy can collect full reward by exiting before the tests run."""
    for code in ("import sys\nsys.exit(0)", "import os\nos._exit(0)", "raise SystemExit"):
        assert run_case(ADD + code, "assert add(1, 1) == 3", FAST).status != "pass", code
    # A program that ends with sys.exit(0) is fine for input/output tests.
    assert run_case("import sys\nprint(1)\nsys.exit(0)", {"input": "", "output": "1"}, FAST).passed


def test_infinite_loop_is_killed():
    """If this fails, an infinite loop in generated code hangs reward computation."""
    r = run_case("while True:\n    pass", "pass", SandboxLimits(timeout_s=1.0))
    assert r.status == "timeout" and r.seconds < 5
    r = run_case("import time\ntime.sleep(60)", "pass", SandboxLimits(timeout_s=1.0))
    assert r.status == "timeout" and r.seconds < 5


def test_memory_bomb_is_stopped():
    """If this fails, generated code can exhaust the machine's memory."""
    r = run_case("x = bytearray(4 * 1024**3)", "pass", FAST)
    assert r.status == "memory"
    r = run_case("x = []\nwhile True:\n    x.append(' ' * 10**6)", "pass",
                 SandboxLimits(timeout_s=5.0, memory_mb=256))
    assert r.status == "memory" and r.seconds < 5


@pytest.mark.parametrize("namespace", [None, False], ids=["auto", "audit_hook_only"])
def test_network_is_blocked(namespace):
    """If this fails, generated code can open network connections (here: to a listening
    socket on this machine), with the network namespace or with the audit hook alone."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()
    port = srv.getsockname()[1]
    try:
        code = (f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=1)\n"
                "print('connected')")
        r = run_case(code, "pass", SandboxLimits(timeout_s=3, network_namespace=namespace))
        assert r.status == "error" and "connected" not in r.stdout
        r = run_case("import urllib.request\nurllib.request.urlopen('http://127.0.0.1:%d')" % port,
                     "pass", SandboxLimits(timeout_s=3, network_namespace=namespace))
        assert r.status == "error"
    finally:
        srv.close()


@pytest.mark.skipif(not network_namespace_available(), reason="unshare -rn is not available")
def test_network_namespace_has_only_loopback():
    """If this fails, the sandbox's network namespace is not applied (the code would see the
    host's network interfaces)."""
    r = run_case("print(open('/proc/net/dev').read())", "pass",
                 SandboxLimits(network_namespace=True))
    assert r.passed
    interfaces = [line.split(":")[0].strip() for line in r.stdout.splitlines()[2:] if ":" in line]
    assert interfaces == ["lo"]


def test_output_flood_is_truncated():
    """If this fails, generated code printing without end fills memory or disk."""
    limits = SandboxLimits(timeout_s=3, max_output_bytes=10_000)
    r = run_case("while True:\n    print('x' * 1000)", "pass", limits)
    assert r.status == "output_limit" and len(r.stdout) == 10_000 and r.seconds < 3
    r = run_case("import sys\nwhile True:\n    sys.stderr.write('e' * 1000)", "pass", limits)
    assert r.status == "output_limit" and len(r.stderr) <= 10_000


def test_processes_are_blocked_and_workdir_is_temporary():
    """If this fails, generated code can start processes (escaping the audit hook) or leaves
    files behind in the caller's directory."""
    r = run_case("import subprocess\nsubprocess.run(['true'])", "pass", FAST)
    assert r.status == "error" and "disabled" in r.stderr
    r = run_case("import os\nos.system('true')", "pass", FAST)
    assert r.status == "error"
    r = run_case("import os\nopen('f.txt', 'w').write('x')\nprint(os.getcwd())", "pass", FAST)
    assert r.passed and "megarlhf-sandbox-" in r.stdout


def test_reward_fn_and_code_extraction():
    """If this fails, the code reward is not the pass fraction of each response's own tests, or
    code inside a markdown fence is not found."""
    resp = ["Here:\n```python\n" + ADD + "```\nDone.", "def add(a, b):\n    return a - b\n"]
    meta = [{"test_cases": ["assert add(1, 2) == 3", "assert add(2, 2) == 4"]},
            {"test_cases": ["assert add(2, 0) == 2", "assert add(1, 1) == 2",
                            "assert add(0, 1) == 1"]}]
    assert extract_code(resp[0]) == ADD
    assert extract_code("no fence") == "no fence"
    reward = CodeSandboxReward(FAST, max_workers=2)
    assert reward([None, None], resp, meta) == pytest.approx([1.0, 1 / 3])
    with pytest.raises(ValueError, match="test_cases"):
        reward([None], ["x"], [{}])
