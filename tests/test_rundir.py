import pyarrow as pa
import pytest

from selma.rundir import RunDir, RunDirError


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


def test_discard_removes_outputs_and_the_manifest_entry(run):
    run.begin_stage("images", "h")
    run.write_table("images/coco/part.parquet", pa.table({"x": [1]}))
    run.discard_stage("images")
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


def test_an_fsspec_only_scheme_works():
    run = RunDir("memory://selma-test/run")
    run.write_table("images/coco/part.parquet", pa.table({"image_id": ["x"]}))
    run.begin_stage("images", "h")
    run.commit_stage("images")
    assert RunDir("memory://selma-test/run").is_committed("images", "h")
    assert run.read_table("images").column("image_id").to_pylist() == ["x"]
