"""A sweep of bad inputs, as a user would make them: each gets a one-line ``selma: <field or path>:
<reason>`` (exit 2) or a 4xx with a reason, and the run's committed files stay as they were.

The commands run in-process through ``selma.cli.main`` (the same code as the ``selma`` script);
tests/test_pipeline.py runs a few of them as real processes."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from run_helpers import SKILLS_OVERRIDE, committed_run, snapshot

from selma.cli import main


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A run with prompts, images and train committed and two experts; each test gets a copy."""
    run = tmp_path_factory.mktemp("template") / "run"
    committed_run(run, ("prompts", "images", "train"), experts=True)
    images = run / "images" / "coco"
    images.mkdir(parents=True)
    shutil.copy(run / "prompts" / "coco" / "part-0.parquet", images / "part-0.parquet")
    return run


@pytest.fixture
def run(finished_run, tmp_path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(finished_run, copy)
    return copy


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def selma_in_process(capsys, *argv) -> tuple[int, str]:
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exit:  # argparse
        code = exit.code
    return code, capsys.readouterr().err


# name: (argv builder given (run, tmp_path), the start of the message after "selma: ")
CONFIG_CASES = {
    "unknown field": (lambda r, t: ["config", "validate", "images.stepz=5"], r"images\.stepz: unknown field"),
    "a key resources replaced": (lambda r, t: ["config", "validate", "images.num_actors=2"],
                                 r"images\.num_actors: replaced by images\.resources\.workers"),
    "out of range": (lambda r, t: ["config", "validate", "images.steps=0"], r"images\.steps: .*greater than or equal to 1"),
    "wrong type": (lambda r, t: ["config", "validate", "train.rank=abc"], r"train\.rank: .*integer"),
    "override without =": (lambda r, t: ["config", "validate", "images.steps"], r"override 'images\.steps' is not of the form"),
    "override with bad YAML": (lambda r, t: ["config", "validate", "images.steps=[1,"], r"override images\.steps: .*not valid YAML"),
    "override through a value": (lambda r, t: ["config", "validate", "model.name=x"], r"override model\.name: model is not a section"),
    "missing config file": (lambda r, t: ["config", "validate", "--config", t / "nope.yaml"], r"config '.*nope\.yaml' is neither a file nor a preset"),
    "config file not YAML": (lambda r, t: ["config", "validate", "--config", write(t / "c.yaml", "model: [tiny")], r".*c\.yaml: not valid YAML"),
    "config file a list": (lambda r, t: ["config", "validate", "--config", write(t / "c.yaml", "- a\n- b\n")], r".*c\.yaml: the top level must be a mapping"),
    "config extends itself": (lambda r, t: ["config", "validate", "--config", write(t / "c.yaml", f"extends: {t / 'c.yaml'}\n")], r"config '.*c\.yaml' extends itself"),
    "unknown skill": (lambda r, t: ["config", "validate", "skills.names=[nope]"], r"skills\.names: unknown skill\(s\) \['nope'\]"),
    "unknown merge method": (lambda r, t: ["config", "validate", "merge.method=nope"], r"merge\.method: unknown method 'nope'"),
    "merge weights for other experts": (lambda r, t: ["config", "validate", SKILLS_OVERRIDE, "merge.weights={coco: 1, kites: 1}"], r"merge\.weights: must give one weight per expert"),
    "rouge threshold above 1": (lambda r, t: ["config", "validate", "prompts.rouge_threshold=1.5"], r"prompts\.rouge_threshold: .*less than or equal to 1"),
    "error rate above 1": (lambda r, t: ["config", "validate", "images.max_error_rate=2"], r"images\.max_error_rate: .*less than or equal to 1"),
    "no images per request": (lambda r, t: ["config", "validate", "serve.max_images_per_request=0"], r"serve\.max_images_per_request: .*greater than or equal to 1"),
    "resolution not a multiple of 8": (lambda r, t: ["config", "validate", "images.resolution=65"], r"images\.resolution: .*multiple of 8"),
    "batch does not divide": (lambda r, t: ["config", "validate", "train.effective_batch_size=6"], r"train: .*effective_batch_size \(6\) must be a multiple"),
    "skill file missing": (lambda r, t: ["skills", "list", "--file", t / "none.yaml"], r".*none\.yaml"),
    "unknown skill shown": (lambda r, t: ["skills", "show", "nope"], r"skills show: unknown skill 'nope'"),
    "merge-adapters on a missing folder": (lambda r, t: ["merge-adapters", t / "none", t / "none2", "--out", t / "o"], r".*none"),
}

RUN_CASES = {
    "stage made under another config": (lambda r, t: ["images", "--run-dir", r, SKILLS_OVERRIDE, "images.steps=5"],
                                        r".*run: stage 'images' was committed with a different config"),
    "merge before train": (lambda r, t: ["merge", "--run-dir", t / "empty"], r".*empty: stage 'merge' needs stage 'train'"),
    "serve a folder that is no run": (lambda r, t: ["serve", t / "empty"], r".*empty: no run\.json"),
    "serve a model the run lacks": (lambda r, t: ["serve", r, "--model", "expert-nope"], r"serve\.model: .*'expert-nope'"),
    "eval a model the run lacks": (lambda r, t: ["eval", r, "--models", "expert-nope", "--benchmark", "world"], r"eval\.models: "),
    "eval dsg without its data": (lambda r, t: ["eval", r, "--benchmark", "dsg"], r"eval\.dsg_annotations: "),
    "export a folder without images": (lambda r, t: ["export", "imagefolder", t / "empty", t / "out"], r".*empty: has no images"),
    "serve with its key variable unset": (lambda r, t: ["serve", r, "--model", "base", "serve.api_key_env=SELMA_TEST_UNSET_KEY"],
                                          r"serve\.api_key_env: names the environment variable SELMA_TEST_UNSET_KEY, which is not set"),
    "serve beyond loopback without a key": (lambda r, t: ["serve", r, "--model", "base", "--host", "0.0.0.0"], r"serve\.host: '0\.0\.0\.0' is reachable"),
    "serve on a port out of range": (lambda r, t: ["serve", r, "--port", "70000"], r"serve\.port: .*less than or equal to 65535"),
}


@pytest.mark.parametrize("case", sorted({**CONFIG_CASES, **RUN_CASES}))
def test_bad_input_gets_a_one_line_error_naming_the_field_or_path_and_changes_nothing(case, run, tmp_path, capsys):
    argv, message = {**CONFIG_CASES, **RUN_CASES}[case]
    (tmp_path / "empty").mkdir()
    before = snapshot(run)
    code, err = selma_in_process(capsys, *argv(run, tmp_path))
    assert code == 2, err
    assert re.match(f"selma: {message}", err), err
    assert "Traceback" not in err
    assert snapshot(run) == before
    assert sorted(p.name for p in (tmp_path / "empty").iterdir()) == []


def test_an_unknown_option_is_refused_by_the_parser(capsys):
    code, err = selma_in_process(capsys, "run", "--nope")
    assert code == 2 and "unrecognized arguments: --nope" in err


def test_a_damaged_manifest_is_named_and_left_for_the_user(run, capsys):
    (run / "run.json").write_text('{"config": {')
    before = snapshot(run)
    code, err = selma_in_process(capsys, "serve", run)
    assert code == 2 and re.match(r"selma: .*run/run\.json: not valid JSON", err), err
    code, err = selma_in_process(capsys, "merge", "--run-dir", run)
    assert code == 2 and "run.json: not valid JSON" in err, err
    assert snapshot(run) == before


def test_a_damaged_parquet_file_is_named_and_nothing_half_written_is_left(run, tmp_path, capsys):
    shard = run / "images" / "coco" / "part-0.parquet"
    shard.write_bytes(b"PAR1 truncated")
    before = snapshot(run)
    code, err = selma_in_process(capsys, "export", "imagefolder", run, tmp_path / "out")
    assert code == 2 and re.match(r"selma: .*images/coco/part-0\.parquet: not a readable Parquet file", err), err
    assert not list((tmp_path / "out").glob(".*")) and not (tmp_path / "out" / "metadata.jsonl").exists()
    assert snapshot(run) == before


def test_a_damaged_expert_fails_the_merge_stage_with_its_path_and_keeps_every_committed_stage(run, capsys):
    (run / "experts" / "whoops" / "pytorch_lora_weights.safetensors").write_bytes(b"\x00" * 16)
    before = snapshot(run)
    code, err = selma_in_process(capsys, "merge", "--run-dir", run, SKILLS_OVERRIDE)
    assert code == 2 and "experts/whoops/pytorch_lora_weights.safetensors" in err, err
    after = snapshot(run)
    assert {k: v for k, v in after.items() if k != "run.json"} == {k: v for k, v in before.items() if k != "run.json"}
    stages = json.loads((run / "run.json").read_text())["stages"]
    assert [stages[s]["status"] for s in ("prompts", "images", "train", "merge")] == [
        "committed", "committed", "committed", "failed"]


def test_a_runtime_failure_exits_1_with_one_line_and_debug_shows_the_traceback(tmp_path, capsys):
    blocker = write(tmp_path / "a-file", "not a folder")
    code, err = selma_in_process(capsys, "models", "tiny", blocker / "model")
    assert code == 1 and re.match(r"selma: \w+Error: ", err) and "--debug" in err and "Traceback" not in err
    with pytest.raises(OSError):
        main(["models", "tiny", str(blocker / "model"), "--debug"])


# --------------------------------------------------------------------------- requests to the server

LIMITS = dict(models=("merged", "base"), max_prompt_chars=200, max_images=2, max_steps=20, default_steps=8,
              guidance_scale=7.5)
REQUEST_CASES = {
    "not JSON": (b"{prompt: 1", 400, "invalid_json", r"not valid JSON"),
    "not an object": (b'["a prompt"]', 400, "invalid_json", r"must be a JSON object"),
    "no prompt": (b'{"model": "base"}', 400, "missing_required_parameter", r"^prompt: "),
    "prompt not a string": (b'{"prompt": 5}', 400, "invalid_value", r"^prompt: "),
    "empty prompt": (b'{"prompt": "   "}', 400, "invalid_value", r"prompt must not be empty"),
    "prompt too long in characters": (b'{"prompt": "' + b"a" * 201 + b'"}', 400, "string_above_max_length", r"longer than 200 characters"),
    "unknown model": (b'{"prompt": "a cat", "model": "expert-nope"}', 404, "model_not_found", r"'expert-nope' does not exist"),
    "too many images": (b'{"prompt": "a cat", "n": 3}', 400, "invalid_value", r"n must be between 1 and 2"),
    "zero images": (b'{"prompt": "a cat", "n": 0}', 400, "invalid_value", r"^n: "),
    "too many steps": (b'{"prompt": "a cat", "steps": 21}', 400, "invalid_value", r"steps must be between 1 and 20"),
    "size not square": (b'{"prompt": "a cat", "size": "64x128"}', 400, "invalid_size", r"only square sizes"),
    "size malformed": (b'{"prompt": "a cat", "size": "big"}', 400, "invalid_size", r"size must look like"),
    "url response": (b'{"prompt": "a cat", "response_format": "url"}', 400, "unsupported_value", r"does not host image files"),
    "negative seed": (b'{"prompt": "a cat", "seed": -1}', 400, "invalid_value", r"^seed: "),
    "guidance not finite": (b'{"prompt": "a cat", "guidance_scale": 1e999}', 400, "invalid_value", r"^guidance_scale: "),
    "body too large": (b'{"prompt": "' + b"a" * (1 << 20) + b'"}', 413, "body_too_large", r"larger than"),
}


@pytest.mark.parametrize("case", sorted(REQUEST_CASES))
def test_a_bad_request_gets_a_4xx_naming_the_parameter(case):
    from selma.serve.app import ApiError, Limits, parse_request, resolve_job

    body, status, code, message = REQUEST_CASES[case]
    with pytest.raises(ApiError) as caught:
        resolve_job(parse_request(body), Limits(**LIMITS), native=64)
    assert (caught.value.status, caught.value.code) == (status, code)
    assert re.search(message, caught.value.message), caught.value.message


def test_a_prompt_longer_than_the_text_encoder_takes_gets_a_400_naming_the_limit():
    from transformers import CLIPTokenizer

    from selma.core.models import resolve_model
    from selma.serve.app import ApiError, Limits, check_prompt_tokens, parse_request, resolve_job

    tokenizer = CLIPTokenizer.from_pretrained(resolve_model("tiny:sd"), subfolder="tokenizer")
    limits = Limits(**{**LIMITS, "max_prompt_chars": 2000})
    job = resolve_job(parse_request(json.dumps({"prompt": "red " * 90}).encode()), limits, native=64)
    with pytest.raises(ApiError) as caught:
        check_prompt_tokens(job, [tokenizer])
    assert caught.value.status == 400 and caught.value.param == "prompt"
    assert re.search(r"prompt is \d+ tokens; this model takes at most 77", caught.value.message)
