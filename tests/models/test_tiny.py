"""Tiny random models: they build offline, load like real checkpoints, and are deterministic."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from selma.core.models import resolve_model
from selma.models import tiny

REPO_ROOT = Path(__file__).resolve().parents[2]
PROMPT = "three red circles above a blue square"

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory) -> Path:
    return tiny.build_tiny_pipeline(tmp_path_factory.mktemp("tiny") / "sd", family="sd", seed=0)


def _subprocess_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1", **extra)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")])
    return env


def _weights(folder: Path) -> dict[str, "np.ndarray"]:
    from safetensors.numpy import load_file

    tensors = {}
    for file in sorted(folder.rglob("*.safetensors")):
        for name, value in load_file(file).items():
            tensors[f"{file.relative_to(folder)}:{name}"] = value
    return tensors


# --------------------------------------------------------------------------- pipelines


@pytest.mark.parametrize(
    "family, resolution, pipeline_class",
    [("sd", 64, "StableDiffusionPipeline"), ("sdxl", 64, "StableDiffusionXLPipeline"),
     ("sd", 32, "StableDiffusionPipeline")],
)
def test_pipeline_round_trip_generates_at_configured_resolution(tmp_path, family, resolution, pipeline_class):
    import torch
    from diffusers import DiffusionPipeline

    path = tiny.build_tiny_pipeline(tmp_path / family, family=family, resolution=resolution)
    pipe = DiffusionPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)

    assert type(pipe).__name__ == pipeline_class
    assert pipe.scheduler.config.steps_offset == 1
    assert pipe.scheduler.config.prediction_type == "epsilon"
    assert getattr(pipe, "safety_checker", None) is None
    assert pipe.tokenizer.model_max_length == 77
    assert pipe.text_encoder.config.max_position_embeddings == 77
    module_names = {name for name, _ in pipe.unet.named_modules()}
    for attention in ("attn1", "attn2"):  # self- and cross-attention: the LoRA targets
        for projection in ("to_q", "to_k", "to_v", "to_out.0"):
            assert any(name.endswith(f"{attention}.{projection}") for name in module_names)

    # No height/width: the default size must come out of the saved configs.
    same_seed = [torch.Generator().manual_seed(0) for _ in range(2)]
    images = pipe([PROMPT, "a dog next to a tree"], num_inference_steps=2, output_type="np",
                  generator=same_seed).images
    assert images.shape == (2, resolution, resolution, 3)
    assert np.isfinite(images).all()
    assert np.abs(images[0] - images[1]).mean() > 1e-4, "the prompt must reach the UNet"


def test_sdxl_pipeline_has_two_text_encoders(tmp_path):
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig

    path = tiny.build_tiny_pipeline(tmp_path / "sdxl", family="sdxl")
    index = json.loads((path / "model_index.json").read_text())
    assert index["text_encoder_2"] == ["transformers", "CLIPTextModelWithProjection"]
    assert index["tokenizer_2"] == ["transformers", "CLIPTokenizer"]
    unet = UNet2DConditionModel.load_config(path, subfolder="unet")
    first = CLIPTextConfig.from_pretrained(path / "text_encoder")
    second = CLIPTextConfig.from_pretrained(path / "text_encoder_2")
    assert unet["addition_embed_type"] == "text_time"
    assert unet["cross_attention_dim"] == first.hidden_size + second.hidden_size
    assert unet["projection_class_embeddings_input_dim"] == 6 * unet["addition_time_embed_dim"] + second.projection_dim


def test_build_is_deterministic_per_seed(tmp_path, tiny_sd):
    again = _weights(tiny.build_tiny_pipeline(tmp_path / "again", family="sd", seed=0))
    other = _weights(tiny.build_tiny_pipeline(tmp_path / "other", family="sd", seed=1))
    first = _weights(tiny_sd)

    assert first.keys() == again.keys() == other.keys()
    assert all(np.array_equal(first[name], again[name]) for name in first)
    for component in ("unet", "vae", "text_encoder"):
        names = [name for name in first if name.startswith(component + "/")]
        assert names and any(not np.array_equal(first[name], other[name]) for name in names), component
    assert (tiny_sd / "tokenizer" / "tokenizer.json").read_bytes() == (
        tmp_path / "again" / "tokenizer" / "tokenizer.json").read_bytes()


def test_small_on_disk(tiny_sd):
    size = sum(file.stat().st_size for file in tiny_sd.rglob("*") if file.is_file())
    assert size < 12 * 2**20


# --------------------------------------------------------------------------- tokenizer


def test_tokenizer_common_words_are_single_tokens(tiny_sd):
    from transformers import AutoTokenizer, CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(tiny_sd, subfolder="tokenizer")
    ids = tokenizer(PROMPT).input_ids
    assert len(ids) == len(PROMPT.split()) + 2
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
    assert tokenizer.convert_ids_to_tokens(ids[1:-1]) == [word + "</w>" for word in PROMPT.split()]
    assert tokenizer.decode(ids, skip_special_tokens=True) == PROMPT
    multi_token = [w for w in tiny.corpus_words() if len(tokenizer(w, add_special_tokens=False).input_ids) != 1]
    assert multi_token == []
    # The training data stage loads it through AutoTokenizer.
    assert AutoTokenizer.from_pretrained(tiny_sd, subfolder="tokenizer")(PROMPT).input_ids == ids


def test_tokenizer_handles_unseen_text_without_unknowns(tiny_sd):
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(tiny_sd, subfolder="tokenizer")
    text = "Xylophone QUOKKA 2024 café 😀"
    ids = tokenizer(text).input_ids
    # unk is <|endoftext|> in CLIP: it must appear only as the final EOS.
    assert tokenizer.unk_token_id not in ids[1:-1]
    assert len(ids) > len(text.split()) + 2
    assert tokenizer.decode(ids, skip_special_tokens=True) == "xylophone quokka 2 0 2 4 café 😀"


def test_tokenizer_truncates_and_pads_to_77(tiny_sd):
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(tiny_sd, subfolder="tokenizer")
    long_prompt = " ".join(["red circle"] * 100)
    batch = tokenizer([long_prompt, "a cat"], padding="max_length", truncation=True,
                      max_length=tokenizer.model_max_length)
    assert [len(ids) for ids in batch.input_ids] == [77, 77]
    assert batch.input_ids[0][-1] == tokenizer.eos_token_id
    assert sum(batch.attention_mask[1]) == 4


def test_classic_vocab_files_match_tokenizer_json(tiny_sd, tmp_path):
    from transformers import CLIPTokenizer

    classic = tmp_path / "classic"
    shutil.copytree(tiny_sd / "tokenizer", classic)
    (classic / "tokenizer.json").unlink()
    text = PROMPT + " with a xylophone"
    assert CLIPTokenizer.from_pretrained(classic)(text).input_ids == \
        CLIPTokenizer.from_pretrained(tiny_sd / "tokenizer")(text).input_ids


def test_tokenizer_training_is_identical_across_processes():
    script = "import json; from selma.models.tiny import train_clip_bpe; print(json.dumps(train_clip_bpe()))"
    digests = set()
    for _ in range(2):
        out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                             env=_subprocess_env(), check=True).stdout
        vocab, merges = json.loads(out)
        digests.add(hashlib.sha256(json.dumps([vocab, merges]).encode()).hexdigest())
    vocab, merges = tiny.train_clip_bpe()
    digests.add(hashlib.sha256(json.dumps([vocab, [list(m) for m in merges]]).encode()).hexdigest())
    assert len(digests) == 1


# --------------------------------------------------------------------------- language model


def test_tiny_lm_loads_and_generates(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = tiny.build_tiny_lm(tmp_path / "lm")
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path).eval()

    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.config.head_dim == 64
    assert model.config.vocab_size == len(tokenizer)
    specials = [tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.unk_token_id]
    assert None not in specials and len(set(specials)) == 4
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "a red cat"}], tokenize=False,
                                         add_generation_prompt=True)
    assert chat.startswith(tokenizer.bos_token) and "a red cat" in chat and chat.endswith("assistant:")

    tokenizer.padding_side = "left"
    inputs = tokenizer(["a red cat", "two dogs on the left of a tree"], return_tensors="pt", padding=True)
    assert (inputs.input_ids[1, 0] == tokenizer.bos_token_id).item()
    with torch.inference_mode():
        output = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert output.shape == (2, inputs.input_ids.shape[1] + 4)
    assert all(isinstance(text, str) for text in tokenizer.batch_decode(output, skip_special_tokens=True))
    assert tokenizer.decode(tokenizer("two dogs, left.").input_ids, skip_special_tokens=True) == "two dogs, left."


# --------------------------------------------------------------------------- specs and cache


def test_non_tiny_specs_pass_through():
    for spec in ("/models/sd14", "CompVis/stable-diffusion-v1-4", "relative/path"):
        assert not tiny.is_tiny_spec(spec)
        assert resolve_model(spec) == spec


def test_spec_names_and_errors():
    assert tiny.tiny_model_name("tiny:sd") == tiny.tiny_model_name("tiny:sd@64") == "tiny-sd-64-v1"
    assert tiny.tiny_model_name("tiny:sdxl@128") == "tiny-sdxl-128-v1"
    assert tiny.tiny_model_name("tiny:lm") == "tiny-lm-v1"
    for bad in ("tiny:foo", "tiny:sd@big", "tiny:lm@64", "tiny:"):
        with pytest.raises(ValueError):
            resolve_model(bad)


def test_resolve_model_builds_once_into_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SELMA_CACHE", str(tmp_path))
    builds = []
    real_build = tiny.build_tiny_lm

    def counting_build(out_dir, seed=0):
        builds.append(out_dir)
        return real_build(out_dir, seed=seed)

    monkeypatch.setattr(tiny, "build_tiny_lm", counting_build)
    first = resolve_model("tiny:lm")
    second = resolve_model("tiny:lm")

    assert first == second == str(tmp_path / "models" / "tiny-lm-v1")
    assert len(builds) == 1
    assert sorted(os.listdir(tmp_path / "models")) == ["tiny-lm-v1"]  # no staging folder left
    assert (Path(first) / "model.safetensors").is_file()


def test_failed_build_leaves_nothing_behind(tmp_path, monkeypatch):
    monkeypatch.setenv("SELMA_CACHE", str(tmp_path))

    def broken_build(out_dir, seed=0):
        (Path(out_dir) / "half-written").write_text("x")
        raise RuntimeError("disk full")

    monkeypatch.setattr(tiny, "build_tiny_lm", broken_build)
    with pytest.raises(RuntimeError, match="disk full"):
        resolve_model("tiny:lm")
    assert os.listdir(tmp_path / "models") == []


CONCURRENT_RESOLVER = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path
    from selma.models import tiny

    work = Path(sys.argv[1])
    real_build = tiny.build_tiny_pipeline

    def slow_build(*args, **kwargs):
        path = real_build(*args, **kwargs)
        (work / "builds" / str(os.getpid())).touch()
        time.sleep(1.0)  # keep both builds in flight together
        return path

    tiny.build_tiny_pipeline = slow_build
    (work / "ready" / str(os.getpid())).touch()
    deadline = time.time() + 120
    while len(os.listdir(work / "ready")) < 2:  # start both resolves at the same moment
        assert time.time() < deadline, "the other process never got ready"
        time.sleep(0.01)
    from selma.core.models import resolve_model
    print(resolve_model("tiny:sd"))
""")


def test_concurrent_resolve_from_two_processes_yields_one_valid_directory(tmp_path):
    from diffusers import DiffusionPipeline

    cache, work = tmp_path / "cache", tmp_path / "work"
    (work / "ready").mkdir(parents=True)
    (work / "builds").mkdir()
    env = _subprocess_env(SELMA_CACHE=str(cache))
    # Import torch/diffusers before the barrier so both resolves really overlap.
    script = "import diffusers, transformers, torch\n" + CONCURRENT_RESOLVER
    processes = [subprocess.Popen([sys.executable, "-c", script, str(work)], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True, env=env) for _ in range(2)]
    results = [process.communicate(timeout=240) for process in processes]
    for process, (_, stderr) in zip(processes, results):
        assert process.returncode == 0, stderr

    paths = {stdout.strip().splitlines()[-1] for stdout, _ in results}
    target = cache / "models" / "tiny-sd-64-v1"
    assert paths == {str(target)}
    assert len(os.listdir(work / "builds")) == 2, "both processes should have raced to build"
    assert os.listdir(cache / "models") == ["tiny-sd-64-v1"]
    pipe = DiffusionPipeline.from_pretrained(target)
    assert pipe.unet.config.sample_size * pipe.vae_scale_factor == 64


def test_import_is_light():
    script = ("import sys, selma.models.tiny; "
              "print([m for m in ('torch', 'diffusers', 'transformers', 'tokenizers') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         env=_subprocess_env(), check=True).stdout
    assert out.strip() == "[]"
