"""VQA backends on tiny random VLMs (a Llava and a BLIP-2 built locally; no hub).

A random model's answers are gibberish, so the tests check what does not depend on quality:
the prompt that reaches the model, one answer per pair, batching invariance, P(yes) against a
softmax computed by hand from the model's own logits, and the vLLM engine against transformers.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from selma.core.models import resolve_model
from selma.eval import vqa
from selma.models import tiny_vlm
from selma.models.tiny import build_lm_tokenizer

REPO_ROOT = Path(__file__).resolve().parents[2]
# Absolute (the subprocess runs elsewhere), but not resolved: the venv's python is a symlink.
VLLM_PYTHON = os.path.abspath(os.environ.get("SELMA_VLLM_PYTHON", str(REPO_ROOT / ".venv-vllm" / "bin" / "python")))
# Questions of different lengths, so batches are padded.
QUESTIONS = [
    "Is there a red dog?",
    "What color is the car?",
    "How many cats are sitting on the wooden table near the window?",
    "Is the sky blue?",
    "What is the man holding?",
]
# The tiny models' prompts, written out by hand (the tiny Llava's chat template; BLIP-2's format).
MANUAL_PROMPTS = {
    "tiny:vlm": "user: <image>\n{question}</s>\nassistant:",
    "tiny:blip2": "Question: {question} Answer:",
}
YES_TOKENS = ["Yes", "yes", "ĠYes", "Ġyes"]  # byte-level BPE spells a leading space "Ġ"

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def make_images() -> list[Image.Image]:
    """Random images of different sizes and modes (the processors resize and convert them)."""
    rng = np.random.default_rng(0)
    sizes = [(40, 50), (32, 32), (64, 24), (50, 40), (33, 61)]
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in sizes]
    images[3] = images[3].convert("L")
    return images


@pytest.fixture(scope="module")
def images() -> list[Image.Image]:
    return make_images()


@pytest.fixture(scope="module", params=["tiny:vlm", "tiny:blip2"])
def spec(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def backend(spec):
    with vqa.load_vqa_backend("transformers", spec, batch_size=2, max_new_tokens=6) as loaded:
        yield loaded


@pytest.fixture(scope="module")
def scorer(spec):
    with vqa.load_vqa_backend("vqascore", spec, batch_size=2) as loaded:
        yield loaded


def manual_inputs(backend, image, prompt: str):
    """Model inputs for one pair, built straight from the processor (no padding)."""
    return backend.processor(images=[image.convert("RGB")], text=[prompt], return_tensors="pt")


def manual_yes_probability(backend, image, question: str) -> float:
    """P(yes) by hand: softmax of the last-position logits of a plain forward, summed over YES_TOKENS."""
    import torch

    prompt = MANUAL_PROMPTS[backend_spec(backend)].format(question=question + " Please answer yes or no.")
    with torch.inference_mode():
        logits = backend.model(**manual_inputs(backend, image, prompt)).logits[0, -1]
    ids = backend.tokenizer.convert_tokens_to_ids(YES_TOKENS)
    return float(logits.softmax(-1)[ids].sum())


def backend_spec(backend) -> str:
    return "tiny:vlm" if backend.model.config.model_type == "llava" else "tiny:blip2"


# --------------------------------------------------------------------------- tiny models


def test_vqa_module_imports_without_torch_or_diffusers():
    code = ("import sys, selma.eval.vqa; "
            "print(sorted(m for m in ('torch', 'transformers', 'diffusers') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_tiny_vlm_loads_through_the_plain_auto_classes(images):
    import torch
    from transformers import (
        AutoModelForImageTextToText,
        AutoProcessor,
        Blip2ForConditionalGeneration,
        LlavaForConditionalGeneration,
    )

    expected = {"tiny:vlm": (LlavaForConditionalGeneration, 16), "tiny:blip2": (Blip2ForConditionalGeneration, 4)}
    for spec, (model_class, image_tokens) in expected.items():
        path = resolve_model(spec)
        processor = AutoProcessor.from_pretrained(path)
        model = AutoModelForImageTextToText.from_pretrained(path)
        assert type(model) is model_class
        prompt = MANUAL_PROMPTS[spec].format(question="Is there a dog?")
        inputs = processor(images=[images[0]], text=[prompt], return_tensors="pt")
        ids = inputs["input_ids"][0].tolist()
        assert ids.count(model.config.image_token_id) == image_tokens
        with torch.inference_mode():
            logits = model(**inputs).logits
        assert logits.shape == (1, len(ids), model.config.get_text_config().vocab_size)
        assert torch.isfinite(logits).all()
    assert AutoProcessor.from_pretrained(resolve_model("tiny:vlm")).chat_template
    assert not AutoProcessor.from_pretrained(resolve_model("tiny:blip2")).chat_template


@pytest.mark.parametrize("builder", [tiny_vlm.build_tiny_vlm, tiny_vlm.build_tiny_blip2])
def test_tiny_vlm_builds_are_deterministic_and_small(tmp_path, builder):
    first, second = builder(tmp_path / "a"), builder(tmp_path / "b")
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (first / name).read_bytes() == (second / name).read_bytes(), name
    assert sum(f.stat().st_size for f in first.iterdir()) < 5 * 2**20


# --------------------------------------------------------------------------- errors


def test_unknown_backend_lists_the_known_ones():
    with pytest.raises(ValueError) as error:
        vqa.load_vqa_backend("blip", "tiny:vlm")
    assert all(kind in str(error.value) for kind in vqa.VQA_BACKENDS)


def test_missing_weights_give_a_clear_error(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(FileNotFoundError, match="no hub downloads") as error:
        vqa.load_vqa_backend("transformers", str(missing))
    assert str(missing) in str(error.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        vqa.load_vqa_backend("vqascore", str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match="local"):  # a hub id is not a local folder
        vqa.load_vqa_backend("transformers", "Salesforce/blip2-opt-2.7b")


def test_prompt_template_must_name_the_question():
    with pytest.raises(ValueError, match=re.escape("{question}")):
        vqa.load_vqa_backend("transformers", "tiny:blip2", prompt_template="Q: A:")


# --------------------------------------------------------------------------- prompts


def test_the_prompt_format_reaches_the_model(backend, spec, images):
    question = QUESTIONS[0]
    ids = backend.encode([images[0]], [question])["input_ids"][0].tolist()
    tokenizer = backend.tokenizer
    image_token_id = backend.model.config.image_token_id
    # Exactly one BOS (the tiny Llava's chat template would add a second one if it were not dropped).
    assert ids.count(tokenizer.bos_token_id) == 1
    text = tokenizer.decode([i for i in ids if i != image_token_id])
    assert text == "<s>" + MANUAL_PROMPTS[spec].format(question=question).replace("<image>", "")
    # The backend's greedy answer is the model's continuation of that hand-written prompt.
    import torch

    inputs = manual_inputs(backend, images[0], MANUAL_PROMPTS[spec].format(question=question))
    with torch.inference_mode():
        generated = backend.model.generate(**inputs, do_sample=False, max_new_tokens=backend.max_new_tokens)
    expected = tokenizer.decode(generated[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()
    assert backend.answer([images[0]], [question]) == [expected]


def test_prompt_template_overrides_the_chat_template(images):
    backend = vqa.load_vqa_backend("transformers", "tiny:vlm", prompt_template="<image>Q: {question} A:")
    ids = backend.encode([images[0]], ["Is the sky blue?"])["input_ids"][0].tolist()
    text = backend.tokenizer.decode([i for i in ids if i != backend.model.config.image_token_id])
    assert text == "<s>Q: Is the sky blue? A:"


# --------------------------------------------------------------------------- answers


def test_one_answer_per_pair_and_batching_does_not_change_answers(backend, images):
    batched = backend.answer(images, QUESTIONS)  # batches of 2, 2 and 1: padded
    assert len(batched) == len(QUESTIONS) and all(isinstance(a, str) and a for a in batched)
    one_by_one = [backend.answer([image], [question])[0] for image, question in zip(images, QUESTIONS)]
    assert batched == one_by_one
    # The image matters: the same question about different images is answered differently.
    assert len(set(backend.answer(images, [QUESTIONS[2]] * len(images)))) > 1


def test_pairs_must_match():
    backend = vqa.VQABackend()
    with pytest.raises(NotImplementedError):
        backend.yes_probability([], [])
    with pytest.raises(ValueError, match="2 images but 1 questions"):
        vqa.check_pairs([1, 2], ["q"])


def test_empty_input_gives_no_answers(backend):
    assert backend.answer([], []) == []
    assert backend.yes_probability([], []) == []


# --------------------------------------------------------------------------- P(yes)


def test_yes_probability_is_the_softmax_of_the_yes_tokens(scorer, images):
    assert sorted(scorer.yes_ids) == sorted(scorer.tokenizer.convert_tokens_to_ids(YES_TOKENS))
    probabilities = scorer.yes_probability(images, QUESTIONS)
    assert len(probabilities) == len(QUESTIONS)
    assert all(0.0 <= p <= 1.0 for p in probabilities)
    manual = [manual_yes_probability(scorer, image, q) for image, q in zip(images, QUESTIONS)]
    assert probabilities == pytest.approx(manual, rel=1e-4, abs=1e-7)
    assert len(set(probabilities)) == len(probabilities)  # each pair scored on its own


def test_vqascore_answers_follow_the_probability(scorer, images):
    probabilities = scorer.yes_probability(images, QUESTIONS)
    assert scorer.answer(images, QUESTIONS) == ["yes" if p >= 0.5 else "no" for p in probabilities]
    assert [vqa.yes_no(p) for p in (0.0, 0.4999, 0.5, 0.9)] == ["no", "no", "yes", "yes"]


def test_transformers_backend_scores_like_vqascore(backend, scorer, images):
    assert backend.yes_probability(images[:3], QUESTIONS[:3]) == pytest.approx(
        scorer.yes_probability(images[:3], QUESTIONS[:3]), rel=1e-5)


def test_a_model_edited_to_say_yes_is_answered_yes(tmp_path, images):
    """The tiny Llava with its "Yes" output row aimed at one pair's final hidden state says yes there."""
    import torch

    source = vqa.load_vqa_backend("vqascore", "tiny:vlm")
    prompt = MANUAL_PROMPTS["tiny:vlm"].format(question=QUESTIONS[0] + " Please answer yes or no.")
    captured = {}
    hook = source.model.lm_head.register_forward_hook(lambda module, args, output: captured.update(h=args[0][0, -1]))
    with torch.inference_mode():
        source.model(**manual_inputs(source, images[0], prompt))
    hook.remove()
    hidden = captured["h"]
    yes_id = source.tokenizer.convert_tokens_to_ids("Yes")
    with torch.no_grad():
        source.model.lm_head.weight[yes_id] = 40.0 * hidden / hidden.dot(hidden)  # logit 40 for that pair
    edited = tmp_path / "says-yes"
    source.model.save_pretrained(edited)
    source.processor.save_pretrained(edited)
    scorer = vqa.load_vqa_backend("vqascore", str(edited), batch_size=2)
    probabilities = scorer.yes_probability(images[:3], QUESTIONS[:3])
    assert probabilities[0] > 0.99
    assert scorer.answer(images[:3], QUESTIONS[:3]) == [vqa.yes_no(p) for p in probabilities]
    assert scorer.answer(images[:1], QUESTIONS[:1]) == ["yes"]


def test_yes_tokens_fall_back_to_first_tokens_when_yes_is_split():
    tokenizer = build_lm_tokenizer()  # its vocabulary has no "yes" word
    assert len(tokenizer.encode("Yes", add_special_tokens=False)) > 1
    assert vqa.yes_token_ids(tokenizer) == sorted(tokenizer.convert_tokens_to_ids(["Y", "y"]))


# --------------------------------------------------------------------------- vLLM

VLLM_SCRIPT = """
import json, sys
from PIL import Image
from selma.eval.vqa import load_vqa_backend

if __name__ == "__main__":
    model, image_dir, out = sys.argv[1:4]
    request = json.loads(open(f"{image_dir}/request.json").read())
    images = [Image.open(f"{image_dir}/{i}.png") for i in range(len(request["questions"]))]
    backend = load_vqa_backend("vllm", model, max_new_tokens=request["max_new_tokens"],
                               engine_kwargs=request["engine_kwargs"])
    result = {"answers": backend.answer(images, request["questions"]),
              "yes": backend.yes_probability(images, request["questions"])}
    backend.close()
    open(out, "w").write(json.dumps(result))
"""
VLLM_ENGINE_KWARGS = {"dtype": "float32", "max_model_len": 512, "enforce_eager": True, "max_num_seqs": 8,
                      "kv_cache_memory_bytes": 268435456, "seed": 0}


def _vllm_lacks_torchvision() -> bool:
    check = subprocess.run([VLLM_PYTHON, "-c", "import torchvision"], capture_output=True)
    return check.returncode != 0


@pytest.mark.slow
@pytest.mark.skipif(not Path(VLLM_PYTHON).exists(), reason="no vLLM environment (run `make vllm-setup`)")
@pytest.mark.parametrize("vllm_spec", ["tiny:blip2", "tiny:vlm"])
def test_vllm_backend_agrees_with_transformers(tmp_path, images, vllm_spec):
    if vllm_spec == "tiny:vlm" and _vllm_lacks_torchvision():
        pytest.skip("vLLM's Llava imports transformers' Pixtral image processor, which needs torchvision; the vLLM "
                    "env has none (PyPI's torchvision is a CUDA build: 'operator torchvision::nms does not exist')")
    path = resolve_model(vllm_spec)  # built here, with the main environment
    questions = QUESTIONS[:4]
    for i, image in enumerate(images[: len(questions)]):
        image.save(tmp_path / f"{i}.png")
    request = {"questions": questions, "max_new_tokens": 6, "engine_kwargs": VLLM_ENGINE_KWARGS}
    (tmp_path / "request.json").write_text(json.dumps(request))
    script = tmp_path / "run_vllm_vqa.py"
    script.write_text(textwrap.dedent(VLLM_SCRIPT))
    out = tmp_path / "result.json"
    result = subprocess.run([VLLM_PYTHON, str(script), path, str(tmp_path), str(out)], capture_output=True,
                            text=True, timeout=600, cwd=tmp_path,
                            env={**os.environ, "VLLM_NO_USAGE_STATS": "1", "TOKENIZERS_PARALLELISM": "false"})
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    from_vllm = json.loads(out.read_text())
    assert len(from_vllm["answers"]) == len(questions) and all(from_vllm["answers"])
    assert all(0.0 < p < 1.0 for p in from_vllm["yes"])

    # The same pairs (read back from the PNGs) through transformers.
    pngs = [Image.open(tmp_path / f"{i}.png") for i in range(len(questions))]
    reference = vqa.load_vqa_backend("transformers", path, max_new_tokens=6)
    assert from_vllm["answers"] == reference.answer(pngs, questions)
    assert from_vllm["yes"] == pytest.approx(reference.yes_probability(pngs, questions), rel=1e-3)
