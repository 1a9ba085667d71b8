"""examples/slurm/megarlhf.sbatch, run with a fake ``srun`` / ``scontrol`` (and fake ``megarlhf``
and wait step) on PATH: the Ray head on the first node, a worker on every other node pointed
at the head, a wait for every node, then ``megarlhf train`` with the allocation's address and
sizes; its exit code is the job's, and the Ray job steps are stopped when the script ends."""

import json
import os
import re
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.unit

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "examples", "slurm", "megarlhf.sbatch")
HOSTS = ["gpu01", "gpu02", "gpu03"]

# Each fake appends one JSON line per call to $FAKE_LOG: [name, argv...].
_LOG = ('import json, os, sys\n'
        'with open(os.environ["FAKE_LOG"], "a") as f:\n'
        '    f.write(json.dumps([os.path.basename(sys.argv[0])] + sys.argv[1:]) + "\\n")\n')
FAKES = {
    "scontrol": _LOG + 'print("\\n".join(os.environ["FAKE_HOSTS"].split(",")))\n',
    # srun: `hostname --ip-address` answers 10.0.0.<i> for host i; a --block step stays up
    # (a sleeping process, recorded in $FAKE_PIDS) until the script stops it.
    "srun": _LOG + (
        'args = sys.argv[1:]\n'
        'host = args[args.index("-w") + 1]\n'
        'cmd = args[args.index(host) + 1:]\n'
        'if cmd[:2] == ["hostname", "--ip-address"]:\n'
        '    hosts = os.environ["FAKE_HOSTS"].split(",")\n'
        '    print(f"10.0.0.{hosts.index(host) + 1} fe80::1")\n'
        'elif "--block" in cmd:\n'
        '    with open(os.environ["FAKE_PIDS"], "a") as f:\n'
        '        f.write(f"{os.getpid()}\\n")\n'
        '    os.execvp("sleep", ["sleep", "600"])\n'),
    # The node wait: like Ray's, it returns once every node's `ray start --block` step is up
    # (on a loaded box a background step's fake can take seconds to start).
    "fake-python": _LOG + (
        'import time\n'
        'sys.stdin.read()\n'
        'end = time.monotonic() + 60\n'
        'while time.monotonic() < end:\n'
        '    try:\n'
        '        n = len(open(os.environ["FAKE_PIDS"]).read().split())\n'
        '    except FileNotFoundError:\n'
        '        n = 0\n'
        '    if n >= int(os.environ["SLURM_JOB_NUM_NODES"]):\n'
        '        break\n'
        '    time.sleep(0.05)\n'),
    "fake-megarlhf": _LOG + 'sys.exit(int(os.environ.get("FAKE_EXIT", "0")))\n',
}


@pytest.fixture
def fakes(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in FAKES.items():
        p = bin_dir / name
        p.write_text(f"#!{sys.executable}\n{body}")
        p.chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}",
               FAKE_LOG=str(tmp_path / "calls.jsonl"), FAKE_PIDS=str(tmp_path / "pids"),
               FAKE_HOSTS=",".join(HOSTS), SLURM_JOB_NODELIST="gpu[01-03]",
               SLURM_JOB_NUM_NODES="3", SLURM_GPUS_ON_NODE="8", SLURM_CPUS_PER_TASK="16",
               PYTHON=str(bin_dir / "fake-python"), MEGARLHF=str(bin_dir / "fake-megarlhf"))
    env.pop("RAY_ADDRESS", None)
    return tmp_path, env


def _run(env, *args, timeout=60):
    return subprocess.run(["bash", SCRIPT, *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


def _calls(tmp_path):
    with open(tmp_path / "calls.jsonl") as f:
        return [json.loads(line) for line in f]


def _gone(pid: int, within: float = 10.0) -> bool:
    end = time.monotonic() + within
    while time.monotonic() < end:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False


def test_sbatch_starts_head_and_workers_then_runs_the_job(fakes):
    """If this fails, the SLURM example starts Ray on the wrong nodes or with the wrong address,
    runs the job before the nodes joined, or leaves its Ray steps running after the job."""
    tmp_path, env = fakes
    r = _run(env, "grpo", "job.yaml", "actor.optimizer.lr=1e-6", "--resume")
    assert r.returncode == 0, r.stdout + r.stderr
    calls = _calls(tmp_path)
    names = [c[0] for c in calls]
    assert calls[0] == ["scontrol", "show", "hostnames", "gpu[01-03]"]
    assert calls[1] == ["srun", "--nodes=1", "--ntasks=1", "-w", "gpu01", "hostname",
                        "--ip-address"]
    starts = [c for c in calls if c[0] == "srun" and "start" in c]  # in any order (background)
    [head] = [c for c in starts if "--head" in c]
    assert head[:5] == ["srun", "--nodes=1", "--ntasks=1", "-w", "gpu01"]
    assert head[5:] == ["ray", "start", "--head", "--node-ip-address=10.0.0.1", "--port=6379",
                        "--num-cpus=16", "--num-gpus=8", "--block"]
    workers = [c for c in starts if c is not head]
    assert sorted(w[4] for w in workers) == ["gpu02", "gpu03"]  # one worker per other node
    for w in workers:
        assert w[5:] == ["ray", "start", "--address=10.0.0.1:6379", "--num-cpus=16",
                         "--num-gpus=8", "--block"]
    # The wait for all 3 nodes comes before the job; the job gets the allocation's numbers.
    wait = names.index("fake-python")
    assert calls[wait][1:] == ["-", "10.0.0.1:6379", "3", "300"]
    job = names.index("fake-megarlhf")
    assert wait < job and names.count("fake-megarlhf") == 1
    assert calls[job][1:] == ["train", "grpo", "job.yaml", "actor.optimizer.lr=1e-6",
                              "--resume", "cluster.ray_address=10.0.0.1:6379",
                              "cluster.num_nodes=3", "cluster.gpus_per_node=8"]
    # The three `ray start --block` steps were stopped when the script ended.
    pids = [int(p) for p in (tmp_path / "pids").read_text().split()]
    assert len(pids) == 3 and all(_gone(p) for p in pids)


def test_sbatch_exit_code_is_the_jobs_and_usage_is_checked(fakes):
    """If this fails, a failed job (a lost node: exit 1) looks like a success to SLURM, or a
    missing argument starts Ray for nothing."""
    tmp_path, env = fakes
    r = _run(dict(env, FAKE_EXIT="1"), "ppo", "job.yaml")
    assert r.returncode == 1
    pids = [int(p) for p in (tmp_path / "pids").read_text().split()]
    assert all(_gone(p) for p in pids)

    r = _run(env, "grpo")
    assert r.returncode == 2 and "usage" in r.stderr
    r = _run(dict(env, SLURM_GPUS_ON_NODE="", SLURM_GPUS_PER_NODE="h100:4"), "sft", "j.yaml")
    assert r.returncode == 0
    job = [c for c in _calls(tmp_path) if c[0] == "fake-megarlhf"][-1]
    assert job[-1] == "cluster.gpus_per_node=4"  # the "type:count" form


def test_sbatch_stops_when_nodes_do_not_join(fakes):
    """If this fails, the job starts on a partial cluster (or waits forever) when a node's Ray
    worker never joins: the real wait step, against a head that is not there."""
    tmp_path, env = fakes
    env = dict(env, PYTHON=sys.executable, RAY_WAIT_S="0", RAY_PORT="1")
    r = _run(env, "grpo", "job.yaml", timeout=120)
    assert r.returncode != 0
    assert "only 0 of 3 Ray nodes joined 10.0.0.1:1 within 0 s" in r.stderr
    assert "fake-megarlhf" not in [c[0] for c in _calls(tmp_path)]


def test_sbatch_ray_start_flags_exist():
    """If this fails, the example passes `ray start` a flag the installed Ray does not have."""
    text = open(SCRIPT).read()
    used = {f for line in re.findall(r'"\$\{RAY_CMD\[@\]\}" start[^\n]*(?:\n\s+[^\n]*)*?--block',
                                     text) for f in re.findall(r"(--[a-z-]+)", line)}
    assert {"--head", "--port", "--address", "--num-gpus", "--block"} <= used
    out = subprocess.run([sys.executable, "-m", "ray.scripts.scripts", "start", "--help"],
                         capture_output=True, text=True, timeout=120).stdout
    missing = sorted(f for f in used if f not in out)
    assert not missing, missing
