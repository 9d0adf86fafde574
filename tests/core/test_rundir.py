import json
import signal
import socket
import subprocess
import sys
import time

import pyarrow as pa
import pyarrow.fs as pafs
import pytest

from selma.core.rundir import RunDir, RunDirError, RunDirInUse, _holder, _Lease


@pytest.fixture(params=["path", "uri"])
def run(request, tmp_path):
    location = str(tmp_path / "run")
    return RunDir(location if request.param == "path" else f"file://{location}")


def test_tables_round_trip_and_temporary_files_are_invisible(run):
    table = pa.table({"id": ["a", "b"], "n": [1, 2]})
    run.write_table("prompts/coco/part-1.parquet", table)
    run.makedirs("prompts/coco")
    with run.fs.open_output_stream(run.path("prompts/coco/.tmp-half-written.parquet")) as stream:
        stream.write(b"PAR1 garbage")
    run.makedirs("prompts/_work")
    run.write_table("prompts/_work/hidden.parquet", table)
    assert [f.rsplit("/", 1)[-1] for f in run.list_files("prompts")] == ["part-1.parquet"]
    assert run.read_table("prompts").to_pydict() == {"id": ["a", "b"], "n": [1, 2]}
    assert run.read_table("images") is None
    assert run.list_dirs("prompts") == ["coco"]


def test_a_stage_is_finished_only_when_committed_with_the_same_config(run):
    run.begin_stage("prompts", "hash-a")
    assert not run.is_committed("prompts", "hash-a")
    run.commit_stage("prompts", counts={"coco": 3})
    assert run.is_committed("prompts", "hash-a")
    assert not run.is_committed("prompts", "hash-b")
    assert RunDir(run.uri).stage("prompts")["counts"] == {"coco": 3}
    with pytest.raises(RunDirError, match="different config"):
        run.begin_stage("prompts", "hash-b")


def test_a_stage_made_under_an_earlier_hash_of_the_same_config_is_this_configs(run):
    run.begin_stage("prompts", "old-hash")
    run.commit_stage("prompts")
    assert run.is_committed("prompts", "new-hash", "old-hash")
    run.check_stage_config("prompts", "new-hash", "old-hash")
    run.begin_stage("prompts", "new-hash", "old-hash")
    assert run.stage("prompts")["config_hash"] == "new-hash"
    with pytest.raises(RunDirError, match=r"hash new-hash, now other-hash"):
        run.check_stage_config("prompts", "other-hash", "old-hash")


def test_discard_removes_outputs_and_the_manifest_entry(run):
    run.begin_stage("images", "h")
    run.write_table("images/coco/part.parquet", pa.table({"x": [1]}))
    run.discard_stage("images", ("images",))
    assert not run.exists("images")
    assert run.stage("images") == {}


def test_put_dir_replaces_a_directory_as_a_whole(run, tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir(), second.mkdir()
    (first / "old.txt").write_text("old")
    (second / "new.txt").write_text("new")
    run.put_dir(first, "experts/coco")
    run.put_dir(second, "experts/coco")
    with run.local_copy("experts/coco") as local:
        assert sorted(p.name for p in local.iterdir()) == ["new.txt"]


@pytest.mark.parametrize("where", ["local", "memory"])
def test_put_dir_keeps_the_subfolders_it_is_told_to_keep(where, tmp_path):
    run = RunDir(str(tmp_path / "run") if where == "local" else f"memory://selma-keep-{tmp_path.name}/run")
    checkpoint, final = tmp_path / "checkpoint", tmp_path / "final"
    (checkpoint / "step-2").mkdir(parents=True)
    (checkpoint / "step-2" / "lora.bin").write_text("step 2")
    final.mkdir()
    (final / "lora.bin").write_text("final")
    run.put_dir(checkpoint, "experts/coco/checkpoints")
    run.write_bytes("experts/coco/stale.txt", b"from an interrupted attempt")
    run.makedirs("experts/coco/scratch")
    run.write_bytes("experts/coco/scratch/x.txt", b"x")
    run.put_dir(final, "experts/coco", keep=("checkpoints", "validation"))
    assert run.read_bytes("experts/coco/checkpoints/step-2/lora.bin") == b"step 2"
    assert run.read_bytes("experts/coco/lora.bin") == b"final"
    assert not run.exists("experts/coco/stale.txt") and not run.exists("experts/coco/scratch")
    (final / "checkpoints").mkdir()
    with pytest.raises(ValueError, match="keeps"):
        run.put_dir(final, "experts/coco", keep=("checkpoints",))
    assert run.read_bytes("experts/coco/checkpoints/step-2/lora.bin") == b"step 2"


def test_an_fsspec_only_scheme_works():
    run = RunDir("memory://selma-test/run")
    run.write_table("images/coco/part.parquet", pa.table({"image_id": ["x"]}))
    run.begin_stage("images", "h")
    run.commit_stage("images")
    assert RunDir("memory://selma-test/run").is_committed("images", "h")
    assert run.read_table("images").column("image_id").to_pylist() == ["x"]


# --------------------------------------------------------------------------- damaged files, temporary files


def test_a_damaged_manifest_or_parquet_file_is_named(tmp_path):
    run = RunDir(str(tmp_path / "run"))
    run.write_bytes("run.json", b'{"stages": {')
    with pytest.raises(RunDirError, match=r"run\.json: not valid JSON"):
        run.manifest()
    run.write_bytes("images/coco/part-1.parquet", b"PAR1 not really parquet PAR1")
    with pytest.raises(RunDirError, match=r"images/coco/part-1\.parquet: not a readable Parquet file.*selma images"):
        run.read_table("images")
    with pytest.raises(RunDirError, match=r"part-1\.parquet"):
        run.parquet_rows(run.list_files("images")[0])


def test_failed_writes_leave_no_temporary_files(run, tmp_path):
    with pytest.raises(TypeError):
        run.write_bytes("prompts/coco/part.parquet", object())
    with pytest.raises(OSError):
        run.put_dir(tmp_path / "no-such-folder", "experts/coco")
    left = run.fs.get_file_info(pafs.FileSelector(run.root, recursive=True))
    assert [i.path for i in left if i.type == pafs.FileType.File] == []
    assert not [i.path for i in left if ".tmp-" in i.path]


def test_a_failed_stage_keeps_its_reason_and_can_begin_again(run):
    run.begin_stage("images", "h")
    run.fail_stage("images", ValueError("prompt p-1 is 90 tokens"))
    entry = RunDir(run.uri).stage("images")
    assert entry["status"] == "failed" and entry["error"] == "ValueError: prompt p-1 is 90 tokens"
    run.begin_stage("images", "h")
    assert RunDir(run.uri).stage("images")["attempts"] == 2


# --------------------------------------------------------------------------- one writer per run directory

HOLD = """
import sys, time
from selma.core.rundir import RunDir, _Lease, _holder
run = RunDir(sys.argv[1])
if sys.argv[2] == "lease":
    lease = _Lease(run)
    lease.settle_s, lease.renew_s = 0.05, 0.2
    lease.acquire(_holder("holder-lease"))
    print("held", flush=True)
    time.sleep(600)
with run.lock("holder-flock"):
    print("held", flush=True)
    time.sleep(600)
"""


def _holder_process(run_dir, kind: str):
    process = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir), kind], stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "held"
    return process


def test_a_second_command_is_refused_naming_the_holder_and_a_dead_holders_lock_is_taken_over(tmp_path):
    from run_helpers import SKILLS_OVERRIDE, committed_run, selma, snapshot

    run_dir = tmp_path / "run"
    committed_run(run_dir, ("prompts", "images", "train"), experts=True)
    before = snapshot(run_dir)
    holder = _holder_process(run_dir, "flock")
    try:
        refused = selma("merge", "--run-dir", run_dir, SKILLS_OVERRIDE)
        assert refused.returncode == 2, refused.stderr
        assert f"in use by PID {holder.pid} on {socket.gethostname()} since " in refused.stderr
        assert "(holder-flock)" in refused.stderr and "Traceback" not in refused.stderr
        assert snapshot(run_dir) == before
        with pytest.raises(RunDirInUse, match=f"PID {holder.pid}"):
            with RunDir(str(run_dir)).lock():
                pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    merged = selma("merge", "--run-dir", run_dir, SKILLS_OVERRIDE)
    assert merged.returncode == 0, merged.stderr
    assert RunDir(str(run_dir)).stage("merge")["status"] == "committed"


UPDATES = """
import os, sys, time
from selma.core.rundir import RunDir
run = RunDir(sys.argv[1])
while not os.path.exists(sys.argv[3]):  # start together
    time.sleep(0.001)
for i in range(300):
    run.update_stage("prompts", **{f"{sys.argv[2]}-{i}": i})
"""


def test_two_processes_updating_the_manifest_lose_nothing(tmp_path):
    start = tmp_path / "start"
    writers = [subprocess.Popen([sys.executable, "-c", UPDATES, str(tmp_path / "run"), name, str(start)])
               for name in "ab"]
    time.sleep(2)
    start.touch()
    assert [w.wait(timeout=120) for w in writers] == [0, 0]
    entry = RunDir(str(tmp_path / "run")).stage("prompts")
    assert sorted(entry) == sorted(f"{name}-{i}" for name in "ab" for i in range(300))


def test_the_lock_is_reentrant_within_a_process_and_released_after(run):
    with run.lock("outer"):
        with run.lock("inner"):
            run.update_stage("prompts", status="running")
        run.update_stage("prompts", status="committed")
    with run.lock("again"):
        assert run.stage("prompts")["status"] == "committed"


def test_the_object_store_lease_refuses_a_live_holder_and_takes_over_a_dead_or_expired_one(tmp_path):
    run = RunDir(str(tmp_path / "run"))
    holder = _holder_process(tmp_path / "run", "lease")
    try:
        lease = _Lease(run)
        lease.settle_s = 0.05
        with pytest.raises(RunDirInUse, match=f"PID {holder.pid} .*holder-lease"):
            lease.acquire(_holder("second"))
        first = json.loads(run.read_bytes(".lock.json"))["expires_at"]
        time.sleep(0.5)
        assert json.loads(run.read_bytes(".lock.json"))["expires_at"] > first  # renewed while held
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    lease.acquire(_holder("second"))  # the holder on this host is gone
    lease.release()
    assert not run.exists(".lock.json")

    run.write_json(".lock.json", {"pid": 1, "host": "another-host", "since": "earlier", "command": "selma run",
                                  "token": "theirs", "expires_at": time.time() - 1})
    expired = _Lease(run)
    expired.settle_s = 0.05
    expired.acquire(_holder("third"))
    assert json.loads(run.read_bytes(".lock.json"))["token"] == expired.token
    expired.release()

    run.write_json(".lock.json", {"pid": 1, "host": "another-host", "since": "earlier", "command": "selma run",
                                  "token": "theirs", "expires_at": time.time() + 60})
    with pytest.raises(RunDirInUse, match="PID 1 on another-host"):
        _Lease(run).acquire(_holder("fourth"))
