"""``ray job submit`` for real: a two-node Ray cluster on this machine with token authentication,
the tiny pipeline submitted as a job, its image actors pinned to the second node by a custom
resource standing in for a GPU node type. Only the processes this test started are stopped."""

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from selma.core.rundir import RunDir

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
RAY = str(Path(sys.executable).parent / "ray")
NODE_RESOURCE = "selma_gpu_node"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _cmdline(pid: int) -> str:
    return (Path("/proc") / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")


def _parent(pid: int) -> int:
    return int((Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[1])


def cluster_processes(markers: list[str]) -> set[int]:
    """Processes whose command line names this cluster (its temp dir or ports), and their descendants."""
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                parents[int(entry.name)] = (_parent(int(entry.name)), _cmdline(int(entry.name)))
            except (OSError, IndexError, ValueError):
                continue
    found = {pid for pid, (_, line) in parents.items() if any(m in line for m in markers)}
    while True:
        children = {pid for pid, (parent, _) in parents.items() if parent in found} - found
        if not children:
            return found
        found |= children


def stop(pids: set[int]) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        time.sleep(2)


@pytest.fixture
def cluster():
    """A head (2 CPUs) and a second node (2 CPUs and the custom resource), token auth on."""
    temp_dir = tempfile.mkdtemp(prefix="selma-ray-", dir="/tmp")  # short: Ray's socket paths have a length limit
    token = secrets.token_hex(16)
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token, "RAY_USAGE_STATS_ENABLED": "0",
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    env.pop("RAY_ADDRESS", None)
    port, dashboard = free_port(), free_port()
    try:
        head = [RAY, "start", "--head", f"--port={port}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
                "--include-dashboard=true", f"--temp-dir={temp_dir}", "--num-cpus=2", "--disable-usage-stats"]
        subprocess.run(head, env=env, check=True, capture_output=True, timeout=180)
        node = [RAY, "start", f"--address=127.0.0.1:{port}", "--num-cpus=2", f"--resources={{\"{NODE_RESOURCE}\": 2}}",
                "--disable-usage-stats"]
        subprocess.run(node, env=env, check=True, capture_output=True, timeout=180)
        yield {"address": f"http://127.0.0.1:{dashboard}", "env": env, "gcs": f"127.0.0.1:{port}"}
    finally:
        stop(cluster_processes([temp_dir, f"127.0.0.1:{port}", f"--port={dashboard}"]))
        shutil.rmtree(temp_dir, ignore_errors=True)


def job(cluster, *args: str, token: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
    env = dict(cluster["env"])
    if not token:
        env.pop("RAY_AUTH_TOKEN")
    command, *rest = args
    return subprocess.run([RAY, "job", command, "--address", cluster["address"], *rest], env=env, capture_output=True,
                          text=True, timeout=timeout, cwd=REPO)


def test_the_tiny_pipeline_runs_as_a_submitted_job_on_a_two_node_cluster(cluster, tmp_path):
    run_dir = tmp_path / "run"
    runtime_env = {"env_vars": {"SELMA_CACHE": os.environ["SELMA_CACHE"], "TOKENIZERS_PARALLELISM": "false"},
                   "excludes": [".venv", ".venv-vllm", "runs", ".git", "**/__pycache__"]}
    submit = ["submit", "--no-wait", "--submission-id", "selma-tiny", "--working-dir", ".",
              "--runtime-env-json", json.dumps(runtime_env), "--",
              "python", "jobs/pipeline.py", "--config", "tiny", "--run-dir", str(run_dir),
              "skills.names=[coco, whoops]", "prompts.per_skill=4", "images.steps=2",
              f"images.resources.custom={{{NODE_RESOURCE}: 1}}", "train.max_steps=4", "train.checkpoint_every=2"]

    refused = job(cluster, "list", token=False)
    assert refused.returncode != 0  # the cluster wants its token

    submitted = job(cluster, *submit)
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    deadline, status = time.time() + 900, ""
    while time.time() < deadline:
        reply = job(cluster, "status", "selma-tiny")
        status = (reply.stdout + reply.stderr).lower()  # "Job 'selma-tiny' succeeded"
        if any(f"job 'selma-tiny' {end}" in status for end in ("succeeded", "failed", "stopped")):
            break
        time.sleep(5)
    logs = job(cluster, "logs", "selma-tiny").stdout
    assert "job 'selma-tiny' succeeded" in status, status + logs[-4000:]

    run = RunDir(str(run_dir))
    stages = run.manifest()["stages"]
    assert all(stages[name]["status"] == "committed" for name in ("prompts", "images", "train", "merge"))
    assert stages["images"]["counts"] == {"coco": 4, "whoops": 4}
    assert run.exists("merged", "pytorch_lora_weights.safetensors")
    assert all(run.exists("experts", skill, "pytorch_lora_weights.safetensors") for skill in ("coco", "whoops"))
    assert "stage merge" in logs
