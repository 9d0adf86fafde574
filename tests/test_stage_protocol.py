"""The Stage protocol and the pipeline that runs it: every shipped stage declares what it reads,
writes, hashes and needs; a new stage is one class plus one entry in the stage list, and the
pipeline then resumes, streams, fails, restarts and refuses for it like for the shipped ones."""

from __future__ import annotations

import json

import pyarrow as pa
import pytest

from selma import pipeline
from selma.config import load_config
from selma.core.config import SelmaConfig
from selma.core.progress import Progress
from selma.core.rundir import RunDir, RunDirError
from selma.core.stage import Stage, StageBase, StageContext


def test_every_shipped_stage_implements_the_protocol_consistently():
    names = [stage.name for stage in pipeline.STAGES]
    assert len(set(names)) == len(names)
    for index, stage in enumerate(pipeline.STAGES):
        assert isinstance(stage, Stage), stage
        for section in stage.sections:  # a section, or one field of a section (dotted: train.select)
            owner, _, field = section.partition(".")
            assert owner in SelmaConfig.model_fields, (stage, section)
            assert not field or field in SelmaConfig.model_fields[owner].annotation.model_fields, (stage, section)
        assert stage.writes, f"{stage} writes nothing --restart could discard"
        if stage.needs:
            assert stage.needs in names[:index], f"{stage} needs a stage that does not run before it"
        if stage.streams_to:
            assert names[index + 1] == stage.streams_to and hasattr(stage, "run_streaming")
    assert pipeline.RUN_STAGE_NAMES == ("prompts", "images", "train", "merge")
    by_name = {stage.name: stage for stage in pipeline.STAGES}
    assert by_name["prompts"].streams_to == "images"
    assert by_name["train"].writes == ("experts",) and by_name["merge"].writes == ("merged",)
    assert not by_name["eval"].chained
    config = load_config("tiny", ["images.resources={workers: 2, gpus: 0.5, custom: {gpu_node: 1}}"])
    assert by_name["images"].resources(config) is config.images.resources
    assert config.images.resources.describe() == "2 workers × (1 CPU, 0.5 GPU, gpu_node 1)"
    assert by_name["train"].resources(config) is config.train.resources and by_name["merge"].resources(config) is None


def test_stage_hashes_chain_only_the_stages_selma_run_commits():
    config = load_config("tiny")
    hashes = pipeline.stage_hashes(config)
    assert list(hashes) == ["prompts", "images", "train", "merge"]
    changed = pipeline.stage_hashes(load_config("tiny", ["train.max_steps=7"]))
    assert [name for name in hashes if hashes[name] != changed[name]] == ["train", "merge"]
    selected = pipeline.stage_hashes(load_config("tiny", ["train.select=step:6"]))
    assert [name for name in hashes if hashes[name] != selected[name]] == ["merge"]
    assert pipeline.stage_hashes(load_config("tiny", ["eval.limit=3"])) == hashes


class Numbers(StageBase):
    """A toy first stage: writes numbers/<n>.json; streams them to the next stage in two passes."""

    name = "numbers"
    writes = ("numbers",)
    sections = ("skills",)
    needs_ray = False
    streams_to = "squares"
    calls: list[str] = []

    def run(self, ctx: StageContext) -> dict:
        self.calls.append("run")
        for n in range(4):
            ctx.run.write_json(f"numbers/{n}.json", {"n": n})
        return {"count": 4}

    def run_streaming(self, ctx: StageContext, consume) -> tuple[dict, dict | None]:
        self.calls.append("run_streaming")
        consumed = None
        for first in (0, 2):
            for n in (first, first + 1):
                ctx.run.write_json(f"numbers/{n}.json", {"n": n})
            consumed = consume([first, first + 1])
        return {"count": 4}, consumed


class Squares(StageBase):
    name = "squares"
    reads = ("numbers",)
    writes = ("squares",)
    sections = ("images",)
    needs = "numbers"
    needs_ray = False
    streams: list = []
    fail = False

    def run(self, ctx: StageContext) -> dict:
        self.streams.append(ctx.stream)
        if self.fail:
            raise RuntimeError("the squares ran out")
        numbers = ctx.stream if ctx.stream is not None else range(4)
        for n in numbers:
            ctx.run.write_json(f"squares/{n}.json", {"square": n * n})
        return {"squared": sum(ctx.run.exists("squares", f"{n}.json") for n in range(4))}


@pytest.fixture
def toy_stages(monkeypatch):
    Numbers.calls, Squares.streams, Squares.fail = [], [], False
    stages = (Numbers(), Squares())
    monkeypatch.setattr(pipeline, "STAGES", stages)
    monkeypatch.setattr(pipeline, "STAGE_NAMES", ("numbers", "squares"))
    return stages


def _config(tmp_path, *overrides):
    return load_config("tiny", [f"run_dir={tmp_path / 'run'}", *overrides])


def test_a_new_stage_runs_streams_commits_and_is_skipped_on_rerun(toy_stages, tmp_path):
    messages: list[str] = []
    config = _config(tmp_path)
    pipeline.run_stages(config, ("numbers", "squares"), progress=messages.append)
    run = RunDir(str(tmp_path / "run"))
    assert Numbers.calls == ["run_streaming"] and Squares.streams == [[0, 1], [2, 3]]
    assert run.stage("numbers")["status"] == run.stage("squares")["status"] == "committed"
    assert run.stage("squares")["squared"] == 4
    assert "[numbers] running, streaming into [squares]" in messages
    assert json.loads(run.read_bytes("run.json"))["config"]["run_dir"] == str(tmp_path / "run")
    messages.clear()
    pipeline.run_stages(config, ("numbers", "squares"), progress=messages.append)
    assert Numbers.calls == ["run_streaming"]  # nothing ran again
    assert messages == [f"[numbers] already committed in {run.uri}, skipping",
                        f"[squares] already committed in {run.uri}, skipping"]


def test_a_stage_alone_runs_without_a_stream_and_needs_its_upstream(toy_stages, tmp_path):
    with pytest.raises(RunDirError, match="stage 'squares' needs stage 'numbers'"):
        pipeline.run_stages(_config(tmp_path), ("squares",), progress=lambda _: None)
    assert not (tmp_path / "run").exists()
    pipeline.run_stages(_config(tmp_path), ("numbers",), progress=lambda _: None)
    pipeline.run_stages(_config(tmp_path), ("squares",), progress=lambda _: None)
    assert Numbers.calls == ["run"] and Squares.streams == [None]


def test_a_failing_stage_is_marked_failed_and_resumes(toy_stages, tmp_path):
    Squares.fail = True
    with pytest.raises(RuntimeError, match="ran out"):
        pipeline.run_stages(_config(tmp_path), ("numbers", "squares"), progress=lambda _: None)
    run = RunDir(str(tmp_path / "run"))
    assert run.stage("numbers")["status"] == "failed" and run.stage("squares")["status"] == "failed"
    assert run.stage("squares")["error"] == "RuntimeError: the squares ran out"
    Squares.fail = False
    pipeline.run_stages(_config(tmp_path), ("numbers", "squares"), progress=lambda _: None)
    assert run.stage("squares")["status"] == "committed" and run.stage("squares")["attempts"] == 2


def test_restart_discards_what_the_stages_declare_they_write(toy_stages, tmp_path):
    pipeline.run_stages(_config(tmp_path), ("numbers", "squares"), progress=lambda _: None)
    run = RunDir(str(tmp_path / "run"))
    run.write_json("errors/squares/bad.json", {})
    run.write_json("keep/me.json", {})
    messages: list[str] = []
    pipeline.run_stages(_config(tmp_path), ("squares",), restart=True, progress=messages.append)
    assert "[squares] discarded for --restart" in messages and "[numbers] discarded for --restart" not in messages
    assert not run.exists("errors", "squares") and run.exists("keep", "me.json") and run.exists("numbers", "0.json")
    assert run.stage("squares")["status"] == "committed" and run.stage("squares")["attempts"] == 1


def test_a_stage_made_under_another_config_is_refused_and_nothing_written(toy_stages, tmp_path):
    pipeline.run_stages(_config(tmp_path), ("numbers", "squares"), progress=lambda _: None)
    manifest = (tmp_path / "run" / "run.json").read_bytes()
    with pytest.raises(RunDirError, match="stage 'squares' was committed with a different config"):
        pipeline.run_stages(_config(tmp_path, "images.steps=3"), ("squares",), progress=lambda _: None)
    assert (tmp_path / "run" / "run.json").read_bytes() == manifest


def test_a_replaced_stage_keeps_the_hash_chain(toy_stages, tmp_path):
    class GivenNumbers(Numbers):
        streams_to = None

        def run(self, ctx):
            ctx.run.write_table("numbers/given.parquet", pa.table({"n": [7]}))
            return {"count": 1}

    config = _config(tmp_path)
    pipeline.run_stages(config, ("numbers",), progress=lambda _: None, replaced={"numbers": GivenNumbers()})
    run = RunDir(str(tmp_path / "run"))
    assert run.is_committed("numbers", pipeline.stage_hashes(config)["numbers"]) and run.exists("numbers", "given.parquet")
    with pytest.raises(ValueError, match="no stage named"):
        pipeline.run_stages(config, ("numbers",), replaced={"nothing": GivenNumbers()})


def test_progress_counters_write_spaced_lines_off_a_terminal(monkeypatch):
    lines: list[str] = []
    progress = Progress(lines.append, interval_s=3600)
    assert not progress.interactive and Progress.of(progress) is progress
    with progress.counter("images", total=10, unit="images drawn") as drawn:
        for done in range(1, 11):
            drawn.update(done)
    assert len(lines) == 2  # the first update, then the last line when the counter closes
    assert lines[0].startswith("[images] 1/10 images drawn (") and lines[1].startswith("[images] 10/10 images drawn (")
    quiet: list[str] = []
    with Progress(quiet.append, interval_s=0).counter("train coco", total=5, unit="steps") as steps:
        steps.update(3, "loss 0.125")
    assert len(quiet) == 1, "the last count is not repeated when the counter closes"
    assert quiet[0].startswith("[train coco] 3/5 steps loss 0.125 (")
    silent: list[str] = []
    Progress(silent.append).counter("never updated").close()
    assert silent == []
