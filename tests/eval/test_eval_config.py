"""``selma eval`` refuses what it cannot do before any Ray work, naming the field."""

import pytest
from shared_data import BENCHMARKS, needs_benchmarks

from selma.config import load_config
from selma.core.errors import ConfigError
from selma.core.rundir import RunDir
from selma.eval.run import check_eval_config

pytestmark = needs_benchmarks

DSG = f"eval.dsg_annotations={BENCHMARKS / 'dsg-1k-anns.csv'}"


def check(tmp_path, *overrides):
    config = load_config("tiny", list(overrides))
    return check_eval_config(config, RunDir(str(tmp_path / "run")))


@pytest.mark.parametrize("overrides, field", [
    ((), "eval.dsg_annotations"),
    ((DSG, "eval.benchmarks=[tifa]"), "eval.tifa_prompts"),
    ((DSG, "eval.benchmarks=[tifa]", f"eval.tifa_prompts={BENCHMARKS / 'tifa_v1.0_text_inputs.json'}"), "eval.questions"),
    ((DSG, "eval.benchmarks=[prompts]"), "eval.prompts_file"),
    ((DSG, "eval.vqa.model=/nowhere/vlm"), "eval.vqa.model"),
    ((DSG, "eval.models=[base, merged]"), "eval.models"),
    ((DSG, "eval.models=[expert-coco]"), "eval.models"),
    ((DSG, "eval.models=[/nowhere/lora]"), "eval.models"),
])
def test_what_eval_cannot_use_is_named(tmp_path, overrides, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        check(tmp_path, "eval.models=[base]", *overrides)


@pytest.mark.parametrize("override, field", [
    ("eval.rewards={aesthetic: /w}", "eval.rewards"),
    ("eval.benchmarks=[drawbench]", "eval.benchmarks"),
    ("eval.questions={backend: openai, model: m}", "eval.questions"),
    ("eval.questions={backend: template}", "eval.questions.backend"),
    ("eval.vqa.backend=blip", "eval.vqa.backend"),
    ("eval.models=[base, base]", "eval.models"),
])
def test_invalid_eval_settings_fail_validation(override, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_config("tiny", [override])


def test_models_resolve_to_lora_folders(tmp_path):
    lora = tmp_path / "my adapter"
    lora.mkdir()
    (lora / "pytorch_lora_weights.safetensors").write_bytes(b"")
    models = check(tmp_path, DSG, f"eval.models=[base, '{lora}']")
    assert [(m.name, m.lora) for m in models] == [("base", None), ("lora-my-adapter", str(lora.resolve()))]
