"""Reward scorers on tiny random models, checked against independent re-computations.

The HPS and ImageReward references below are written straight from the original code
(open_clip's CLIP with ``nn.MultiheadAttention``; BLIP's timm-style ViT and "med" BERT with
ImageReward's MLP head) and read the checkpoints in their original key layout, so they check
the scorers' key mappings and transformers-based forwards.
"""

from __future__ import annotations

import json
import math
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from selma.core.models import resolve_model
from selma.eval import rewards
from selma.eval.rewards import base as reward_base
from selma.eval.rewards import hps as reward_hps
from selma.models import tiny_scorers

REPO_ROOT = Path(__file__).resolve().parents[2]
SPECS = {"clipscore": "tiny:clip", "pickscore": "tiny:clip", "hpsv2": "tiny:hps", "hpsv2.1": "tiny:hps",
         "imagereward": "tiny:imagereward"}
PROMPTS = [
    "a red apple on a wooden table",
    "two dogs running on the beach",
    "a blue cube above a green sphere",
    "an astronaut riding a horse",
    "three yellow flowers in a vase",
]
LONG_PROMPT = "a photo of " + "a very big red apple and " * 40 + "a cat"
ATOL = 1e-5

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def images():
    from PIL import Image

    rng = np.random.default_rng(0)
    sizes = [(32, 32), (40, 48), (48, 40), (17, 90), (64, 64)]  # (height, width)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in sizes]


@pytest.fixture(scope="module")
def scorers():
    return {name: rewards.load_reward_scorer(name, spec, device="cpu", batch_size=2) for name, spec in SPECS.items()}


def _copy_folder(spec: str, target: Path) -> Path:
    shutil.copytree(resolve_model(spec), target)
    return target


# --------------------------------------------------------------------------- API and shared behaviour


def test_importing_the_module_loads_no_heavy_library():
    code = ("import sys, selma.eval.rewards; "
            "print(sorted(m for m in ('torch', 'transformers', 'PIL') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_registry_and_unknown_scorer_lists_the_known_ones():
    assert set(rewards.REWARD_SCORERS) == {"clipscore", "pickscore", "hpsv2", "hpsv2.1", "imagereward"}
    with pytest.raises(KeyError) as error:
        rewards.load_reward_scorer("aesthetic", "tiny:clip")
    for name in rewards.REWARD_SCORERS:
        assert name in str(error.value)


@pytest.mark.parametrize("name", list(SPECS))
def test_one_finite_float_per_pair(scorers, images, name):
    scores = scorers[name].score(images, PROMPTS)
    assert len(scores) == len(images)
    assert all(type(s) is float and math.isfinite(s) for s in scores)
    assert len(set(scores)) > 1
    assert scorers[name].score([], []) == []
    assert isinstance(scorers[name], rewards.RewardScorer) and scorers[name].name == name
    with pytest.raises(ValueError):
        scorers[name].score(images, PROMPTS[:2])


@pytest.mark.parametrize("name", list(SPECS))
def test_matched_and_shuffled_prompts_score_differently(scorers, images, name):
    matched = scorers[name].score(images, PROMPTS)
    shuffled = scorers[name].score(images, PROMPTS[1:] + PROMPTS[:1])
    assert not np.allclose(matched, shuffled, atol=1e-4)


@pytest.mark.parametrize("name", list(SPECS))
def test_batch_size_does_not_change_scores(scorers, images, name):
    one_by_one = rewards.load_reward_scorer(name, SPECS[name], device="cpu", batch_size=1).score(images, PROMPTS)
    all_at_once = rewards.load_reward_scorer(name, SPECS[name], device="cpu", batch_size=64).score(images, PROMPTS)
    np.testing.assert_allclose(one_by_one, scorers[name].score(images, PROMPTS), atol=ATOL)
    np.testing.assert_allclose(one_by_one, all_at_once, atol=ATOL)


@pytest.mark.parametrize("name", list(SPECS))
def test_long_prompts_are_truncated_not_rejected(scorers, images, name):
    scores = scorers[name].score(images[:2], [LONG_PROMPT, LONG_PROMPT + " and a dog"])
    assert all(math.isfinite(s) for s in scores)
    # Only the first tokens count: whatever follows the cut changes nothing.
    same_image = scorers[name].score([images[0], images[0]], [LONG_PROMPT, LONG_PROMPT + " and a dog"])
    assert same_image[0] == pytest.approx(same_image[1], abs=ATOL)


def test_images_may_be_given_as_paths(scorers, images, tmp_path):
    path = tmp_path / "image.png"
    images[1].save(path)
    assert scorers["hpsv2"].score([str(path)], PROMPTS[:1]) == pytest.approx(
        scorers["hpsv2"].score(images[1:2], PROMPTS[:1]), abs=ATOL)


# --------------------------------------------------------------------------- missing weights


@pytest.mark.parametrize("name, expected_file", [
    ("clipscore", "config.json"), ("pickscore", "config.json"), ("hpsv2", "HPS_v2_compressed.pt"),
    ("hpsv2.1", "HPS_v2.1_compressed.pt"), ("imagereward", "ImageReward.pt"),
])
def test_missing_weights_name_the_scorer_the_path_and_the_expected_files(tmp_path, name, expected_file):
    path = tmp_path / "nowhere"
    with pytest.raises(rewards.RewardWeightsError) as error:
        rewards.load_reward_scorer(name, str(path))
    message = str(error.value)
    assert name in message and str(path) in message and expected_file in message
    assert isinstance(error.value, FileNotFoundError)
    assert error.value.scorer == name and error.value.path == str(path)
    assert str(pickle.loads(pickle.dumps(error.value))) == message  # Ray ships exceptions pickled

    path.mkdir()  # an empty folder is no better
    with pytest.raises(rewards.RewardWeightsError, match=expected_file.replace(".", r"\.")):
        rewards.load_reward_scorer(name, str(path))


def test_missing_tokenizer_or_config_files_are_named(tmp_path, monkeypatch):
    monkeypatch.setattr(reward_hps, "_installed_open_clip_bpe", lambda: None)
    hps = tmp_path / "hps"
    hps.mkdir()
    shutil.copy(Path(resolve_model("tiny:hps")) / "HPS_v2_compressed.pt", hps)
    with pytest.raises(rewards.RewardWeightsError, match="no tokenizer files.*merges.txt"):
        rewards.load_reward_scorer("hpsv2", hps)

    imagereward = _copy_folder("tiny:imagereward", tmp_path / "imagereward")
    (imagereward / "med_config.json").unlink()
    with pytest.raises(rewards.RewardWeightsError, match="med_config.json"):
        rewards.load_reward_scorer("imagereward", imagereward)

    clip = _copy_folder("tiny:clip", tmp_path / "clip")
    for name in ("tokenizer.json", "vocab.json"):
        (clip / name).unlink()
    with pytest.raises(rewards.RewardWeightsError, match="tokenizer"):
        rewards.load_reward_scorer("pickscore", clip)


# --------------------------------------------------------------------------- CLIPScore and PickScore


def _official_clip_embeddings(folder, images, prompts):
    """PickScore's published usage: AutoProcessor + CLIPModel.get_image/text_features."""
    import torch
    from transformers import AutoProcessor, CLIPModel

    processor = AutoProcessor.from_pretrained(folder, local_files_only=True)
    model = CLIPModel.from_pretrained(folder, local_files_only=True).eval()

    def features(output):  # a tensor in transformers 4, an output with pooler_output in 5
        return output if isinstance(output, torch.Tensor) else output.pooler_output

    with torch.no_grad():
        image_inputs = processor(images=images, return_tensors="pt")
        text_inputs = processor(text=prompts, padding=True, truncation=True, max_length=77, return_tensors="pt")
        image_embs = features(model.get_image_features(**image_inputs))
        text_embs = features(model.get_text_features(**text_inputs))
    image_embs = image_embs / image_embs.norm(dim=-1, keepdim=True)
    text_embs = text_embs / text_embs.norm(dim=-1, keepdim=True)
    return model, (image_embs * text_embs).sum(-1)


def test_clipscore_and_pickscore_equal_a_hand_computation(scorers, images):
    model, cosine = _official_clip_embeddings(resolve_model("tiny:clip"), images, PROMPTS)
    expected_clipscore = (2.5 * cosine.clamp(min=0)).tolist()
    expected_pickscore = (model.logit_scale.exp() * cosine).tolist()
    assert any(c > 0 for c in cosine.tolist())  # the tiny model is built to give positive cosines
    np.testing.assert_allclose(scorers["clipscore"].score(images, PROMPTS), expected_clipscore, atol=ATOL)
    np.testing.assert_allclose(scorers["pickscore"].score(images, PROMPTS), expected_pickscore, atol=1e-4)


def test_clipscore_clips_negative_cosines_to_zero(scorers, images, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = _copy_folder("tiny:clip", tmp_path / "clip")
    weights = load_file(folder / "model.safetensors")
    weights["text_projection.weight"] = -weights["text_projection.weight"]  # every cosine changes sign
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    _, cosine = _official_clip_embeddings(folder, images, PROMPTS)
    assert max(cosine.tolist()) < 0
    assert rewards.load_reward_scorer("clipscore", folder, device="cpu").score(images, PROMPTS) == [0.0] * len(images)
    pickscore = rewards.load_reward_scorer("pickscore", folder, device="cpu").score(images, PROMPTS)
    np.testing.assert_allclose(pickscore, [-s for s in scorers["pickscore"].score(images, PROMPTS)], atol=1e-4)


def test_pickscore_reads_the_processor_from_a_processor_subfolder(scorers, images, tmp_path):
    folder = _copy_folder("tiny:clip", tmp_path / "pickscore")
    (folder / "processor").mkdir()
    for name in ("processor_config.json", "tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt"):
        shutil.move(folder / name, folder / "processor" / name)
    scores = rewards.load_reward_scorer("pickscore", folder, device="cpu").score(images, PROMPTS)
    np.testing.assert_allclose(scores, scorers["pickscore"].score(images, PROMPTS), atol=ATOL)


# --------------------------------------------------------------------------- HPS v2 / v2.1


def _layer_norm(x, sd, prefix, eps=1e-5):
    import torch.nn.functional as F

    return F.layer_norm(x, x.shape[-1:], sd[f"{prefix}.weight"], sd[f"{prefix}.bias"], eps)


def _open_clip_resblocks(x, sd, prefix, layers, heads, attn_mask=None):
    """open_clip's ``Transformer`` on (L, N, D) input: pre-norm blocks with nn.MultiheadAttention."""
    import torch.nn.functional as F

    width = x.shape[-1]
    for index in range(layers):
        p = f"{prefix}.resblocks.{index}"
        h = _layer_norm(x, sd, f"{p}.ln_1")
        attended, _ = F.multi_head_attention_forward(
            h, h, h, width, heads, sd[f"{p}.attn.in_proj_weight"], sd[f"{p}.attn.in_proj_bias"], None, None, False,
            0.0, sd[f"{p}.attn.out_proj.weight"], sd[f"{p}.attn.out_proj.bias"], training=False, need_weights=False,
            attn_mask=attn_mask,
        )
        x = x + attended
        h = _layer_norm(x, sd, f"{p}.ln_2")
        x = x + F.linear(F.gelu(F.linear(h, sd[f"{p}.mlp.c_fc.weight"], sd[f"{p}.mlp.c_fc.bias"])),
                         sd[f"{p}.mlp.c_proj.weight"], sd[f"{p}.mlp.c_proj.bias"])
    return x


def open_clip_reference_scores(state_dict, config, pixels, input_ids):
    """``diag(normalize(encode_image) @ normalize(encode_text).T)`` as open_clip's CLIP computes it."""
    import torch
    import torch.nn.functional as F

    sd = {k: v.float() for k, v in state_dict.items()}
    vision, text = config["vision_cfg"], config["text_cfg"]
    x = F.conv2d(pixels, sd["visual.conv1.weight"], stride=vision["patch_size"]).flatten(2).permute(0, 2, 1)
    x = torch.cat([sd["visual.class_embedding"].expand(x.shape[0], 1, -1), x], dim=1)
    x = x + sd["visual.positional_embedding"]
    x = _layer_norm(x, sd, "visual.ln_pre").permute(1, 0, 2)
    x = _open_clip_resblocks(x, sd, "visual.transformer", vision["layers"], vision["width"] // vision["head_width"])
    image = _layer_norm(x.permute(1, 0, 2)[:, 0], sd, "visual.ln_post") @ sd["visual.proj"]

    length = input_ids.shape[1]
    causal = torch.full((length, length), float("-inf")).triu(1)
    x = (sd["token_embedding.weight"][input_ids] + sd["positional_embedding"][:length]).permute(1, 0, 2)
    x = _layer_norm(_open_clip_resblocks(x, sd, "transformer", text["layers"], text["heads"], causal).permute(1, 0, 2),
                    sd, "ln_final")
    text_features = x[torch.arange(x.shape[0]), input_ids.argmax(dim=-1)] @ sd["text_projection"]
    return (F.normalize(image, dim=-1) * F.normalize(text_features, dim=-1)).sum(-1)


@pytest.mark.parametrize("name, checkpoint", [("hpsv2", "HPS_v2_compressed.pt"), ("hpsv2.1", "HPS_v2.1_compressed.pt")])
def test_hps_equals_the_open_clip_computation(scorers, images, name, checkpoint):
    import torch

    scorer = scorers[name]
    folder = Path(resolve_model("tiny:hps"))
    assert scorer.checkpoint == folder / checkpoint
    config = json.loads((folder / "open_clip_config.json").read_text())
    state_dict = torch.load(folder / checkpoint, weights_only=True)["state_dict"]
    pixels = torch.stack([reward_hps.hps_resize_max_pad(image, config["vision_cfg"]["image_size"]) for image in images])
    ids = scorer.tokenizer([reward_hps.open_clip_clean(p) for p in PROMPTS], padding="max_length", truncation=True,
                           max_length=77, return_tensors="pt")["input_ids"]
    assert (ids[:, 0] == scorer.tokenizer.bos_token_id).all()
    with torch.no_grad():
        expected = open_clip_reference_scores(state_dict, config, pixels, ids).tolist()
    np.testing.assert_allclose(scorer.score(images, PROMPTS), expected, atol=ATOL)


def test_hps_v2_and_v21_are_different_checkpoints(scorers, images):
    assert not np.allclose(scorers["hpsv2"].score(images, PROMPTS), scorers["hpsv2.1"].score(images, PROMPTS))


def test_hps_resize_max_pad_scales_the_longer_side_and_pads_with_black():
    import torch
    from PIL import Image

    image = Image.new("RGB", (64, 32), (255, 255, 255))  # width 64, height 32
    tensor = reward_hps.hps_resize_max_pad(image, 32)
    assert tuple(tensor.shape) == (3, 32, 32)
    black = reward_base._normalize(torch.zeros(3, 1, 1)).view(3)
    white = reward_base._normalize(torch.ones(3, 1, 1)).view(3)
    for row in list(range(8)) + list(range(24, 32)):  # 16 content rows, centred
        assert torch.allclose(tensor[:, row, :], black[:, None].expand(3, 32), atol=1e-6)
    assert torch.allclose(tensor[:, 8:24, :], white[:, None, None].expand(3, 16, 32), atol=1e-4)


def test_hps_accepts_a_checkpoint_path_a_safetensors_file_and_an_open_clip_bpe_file(scorers, images, tmp_path,
                                                                                    monkeypatch):
    import gzip

    import torch
    from safetensors.torch import save_file

    folder = Path(resolve_model("tiny:hps"))
    expected = scorers["hpsv2"].score(images, PROMPTS)
    by_file = rewards.load_reward_scorer("hpsv2", folder / "HPS_v2_compressed.pt", device="cpu")
    np.testing.assert_allclose(by_file.score(images, PROMPTS), expected, atol=ATOL)

    # A safetensors checkpoint, with open_clip's gzipped BPE merges as the only tokenizer file.
    monkeypatch.setattr(reward_hps, "_installed_open_clip_bpe", lambda: None)
    other = tmp_path / "hps"
    other.mkdir()
    state_dict = torch.load(folder / "HPS_v2_compressed.pt", weights_only=True)["state_dict"]
    save_file({k: v.contiguous() for k, v in state_dict.items()}, str(other / "HPS_v2_compressed.safetensors"))
    shutil.copy(folder / "open_clip_config.json", other)
    with gzip.open(other / reward_hps.OPEN_CLIP_BPE_FILE, "wt", encoding="utf-8") as bpe:
        bpe.write((folder / "merges.txt").read_text(encoding="utf-8"))
    scorer = rewards.load_reward_scorer("hpsv2", other, device="cpu")
    # open_clip numbers the vocabulary without the tiny tokenizer's deduplication: compare tokens.
    for prompt in PROMPTS + [LONG_PROMPT]:
        ours = scorer.tokenizer(prompt, truncation=True, max_length=77)["input_ids"]
        tiny = scorers["hpsv2"].tokenizer(prompt, truncation=True, max_length=77)["input_ids"]
        assert scorer.tokenizer.convert_ids_to_tokens(ours) == scorers["hpsv2"].tokenizer.convert_ids_to_tokens(tiny)


def test_hps_loading_is_strict_about_the_checkpoint(tmp_path):
    import torch

    folder = _copy_folder("tiny:hps", tmp_path / "hps")
    checkpoint = folder / "HPS_v2_compressed.pt"
    original = torch.load(checkpoint, weights_only=True)["state_dict"]

    extra = dict(original, **{"visual.transformer.resblocks.0.ls_1.gamma": torch.ones(32)})
    torch.save({"state_dict": extra}, checkpoint)
    with pytest.raises(ValueError, match="ls_1.gamma"):
        rewards.load_reward_scorer("hpsv2", folder, device="cpu")

    missing = {k: v for k, v in original.items() if k != "visual.proj"}
    torch.save({"state_dict": missing}, checkpoint)
    with pytest.raises(ValueError, match="visual.proj"):
        rewards.load_reward_scorer("hpsv2", folder, device="cpu")

    wrong_shape = dict(original, **{"ln_final.weight": torch.ones(7)})
    torch.save({"state_dict": wrong_shape}, checkpoint)
    with pytest.raises(ValueError, match="final_layer_norm"):
        rewards.load_reward_scorer("hpsv2", folder, device="cpu")


def test_checkpoints_holding_arbitrary_objects_are_not_unpickled(tmp_path):
    import argparse

    import torch

    folder = _copy_folder("tiny:hps", tmp_path / "hps")
    state_dict = torch.load(folder / "HPS_v2_compressed.pt", weights_only=True)["state_dict"]
    # Training scripts often save their arguments; any class outside torch's weights-only allow
    # list stands for a malicious pickle, and is refused.
    args = argparse.Namespace(lr=1e-5)
    torch.save({"state_dict": state_dict, "args": args}, folder / "HPS_v2_compressed.pt")
    with pytest.raises(ValueError, match="weights-only"):
        rewards.load_reward_scorer("hpsv2", folder, device="cpu")


def test_open_clip_configs_with_unsupported_options_are_refused(tmp_path):
    folder = _copy_folder("tiny:hps", tmp_path / "hps")
    config = json.loads((folder / "open_clip_config.json").read_text())
    config["vision_cfg"]["ls_init_value"] = 1e-5
    (folder / "open_clip_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="ls_init_value"):
        rewards.load_reward_scorer("hpsv2", folder, device="cpu")
    assert reward_hps.VIT_H_14["vision_cfg"]["width"] == 1280 and reward_hps.VIT_H_14["text_cfg"]["layers"] == 24


# --------------------------------------------------------------------------- ImageReward


def imagereward_reference_scores(state_dict, med, vit, pixels, input_ids, attention_mask):
    """ImageReward.score: BLIP ViT (timm-style, LayerNorm eps 1e-6), med BERT with cross-attention
    to every image token, [CLS] -> MLP (linear layers, no activations) -> (r - mean) / std."""
    import torch
    import torch.nn.functional as F

    sd = {k: (v.float() if v.is_floating_point() else v) for k, v in state_dict.items()}
    batch = pixels.shape[0]
    v = "blip.visual_encoder"
    x = F.conv2d(pixels, sd[f"{v}.patch_embed.proj.weight"], sd[f"{v}.patch_embed.proj.bias"], stride=vit["patch_size"])
    x = torch.cat([sd[f"{v}.cls_token"].expand(batch, -1, -1), x.flatten(2).transpose(1, 2)], dim=1)
    x = x + sd[f"{v}.pos_embed"][:, :x.shape[1]]
    width, heads = vit["embed_dim"], vit["num_heads"]
    for index in range(vit["depth"]):
        p = f"{v}.blocks.{index}"
        h = _layer_norm(x, sd, f"{p}.norm1", eps=1e-6)
        qkv = F.linear(h, sd[f"{p}.attn.qkv.weight"], sd[f"{p}.attn.qkv.bias"])
        q, k, value = qkv.reshape(batch, -1, 3, heads, width // heads).permute(2, 0, 3, 1, 4)
        attention = ((q @ k.transpose(-2, -1)) * (width // heads) ** -0.5).softmax(dim=-1)
        h = (attention @ value).transpose(1, 2).reshape(batch, -1, width)
        x = x + F.linear(h, sd[f"{p}.attn.proj.weight"], sd[f"{p}.attn.proj.bias"])
        h = _layer_norm(x, sd, f"{p}.norm2", eps=1e-6)
        x = x + F.linear(F.gelu(F.linear(h, sd[f"{p}.mlp.fc1.weight"], sd[f"{p}.mlp.fc1.bias"])),
                         sd[f"{p}.mlp.fc2.weight"], sd[f"{p}.mlp.fc2.bias"])
    image_embeds = _layer_norm(x, sd, f"{v}.norm", eps=1e-6)

    t, eps, heads = "blip.text_encoder", med["layer_norm_eps"], med["num_attention_heads"]
    length = input_ids.shape[1]
    h = sd[f"{t}.embeddings.word_embeddings.weight"][input_ids]
    h = h + sd[f"{t}.embeddings.position_embeddings.weight"][:length]
    h = _layer_norm(h, sd, f"{t}.embeddings.LayerNorm", eps)
    self_mask = (1.0 - attention_mask[:, None, None, :].float()) * -10000.0

    def bert_attention(prefix, hidden, context, mask):
        size = hidden.shape[-1] // heads

        def split(tensor):
            return tensor.view(tensor.shape[0], tensor.shape[1], heads, size).permute(0, 2, 1, 3)

        q = split(F.linear(hidden, sd[f"{prefix}.self.query.weight"], sd[f"{prefix}.self.query.bias"]))
        k = split(F.linear(context, sd[f"{prefix}.self.key.weight"], sd[f"{prefix}.self.key.bias"]))
        value = split(F.linear(context, sd[f"{prefix}.self.value.weight"], sd[f"{prefix}.self.value.bias"]))
        scores = q @ k.transpose(-1, -2) / math.sqrt(size)
        if mask is not None:
            scores = scores + mask
        context_layer = (scores.softmax(dim=-1) @ value).permute(0, 2, 1, 3).reshape(hidden.shape)
        out = F.linear(context_layer, sd[f"{prefix}.output.dense.weight"], sd[f"{prefix}.output.dense.bias"])
        return _layer_norm(out + hidden, sd, f"{prefix}.output.LayerNorm", eps)

    for index in range(med["num_hidden_layers"]):
        p = f"{t}.encoder.layer.{index}"
        h = bert_attention(f"{p}.attention", h, h, self_mask)
        h = bert_attention(f"{p}.crossattention", h, image_embeds, None)  # image attention mask: all ones
        inner = F.gelu(F.linear(h, sd[f"{p}.intermediate.dense.weight"], sd[f"{p}.intermediate.dense.bias"]))
        h = _layer_norm(F.linear(inner, sd[f"{p}.output.dense.weight"], sd[f"{p}.output.dense.bias"]) + h,
                        sd, f"{p}.output.LayerNorm", eps)
    reward = h[:, 0]
    for index in (0, 2, 4, 6, 7):
        reward = F.linear(reward, sd[f"mlp.layers.{index}.weight"], sd[f"mlp.layers.{index}.bias"])
    return (reward.squeeze(-1) - 0.16717362830052426) / 1.0333394966054072


def _imagereward_inputs(scorer, folder, images, prompts):
    import torch

    vit = json.loads((folder / "vision_config.json").read_text())
    pixels = torch.stack([reward_base.clip_resize_center_crop(image, vit["image_size"]) for image in images])
    text = scorer.tokenizer(prompts, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
    return vit, pixels, text


def test_imagereward_equals_the_original_computation(scorers, images):
    import torch

    scorer = scorers["imagereward"]
    folder = Path(resolve_model("tiny:imagereward"))
    med = json.loads((folder / "med_config.json").read_text())
    state_dict = torch.load(folder / "ImageReward.pt", weights_only=True)
    vit, pixels, text = _imagereward_inputs(scorer, folder, images, PROMPTS)
    assert text["input_ids"].shape[1] == 35 and (text["input_ids"][:, 0] == scorer.tokenizer.cls_token_id).all()
    with torch.no_grad():
        expected = imagereward_reference_scores(state_dict, med, vit, pixels, text["input_ids"],
                                                text["attention_mask"]).tolist()
    np.testing.assert_allclose(scorer.score(images, PROMPTS), expected, atol=ATOL)


def test_imagereward_adds_blips_special_tokens_to_a_plain_bert_tokenizer(scorers):
    tokenizer = scorers["imagereward"].tokenizer
    folder = Path(resolve_model("tiny:imagereward"))
    plain_size = len((folder / "vocab.txt").read_text().split())
    assert tokenizer.convert_tokens_to_ids(["[DEC]", "[ENC]"]) == [plain_size, plain_size + 1]
    assert json.loads((folder / "med_config.json").read_text())["vocab_size"] == plain_size + 2


def test_imagereward_depends_on_the_cross_attention_and_the_checkpoint(scorers, images, tmp_path):
    import torch

    baseline = scorers["imagereward"].score(images, PROMPTS)
    folder = _copy_folder("tiny:imagereward", tmp_path / "imagereward")
    state_dict = torch.load(folder / "ImageReward.pt", weights_only=True)
    key = "blip.text_encoder.encoder.layer.1.crossattention.self.value.weight"
    noise = torch.randn(state_dict[key].shape, generator=torch.Generator().manual_seed(0))
    state_dict[key] = state_dict[key] + 0.5 * noise
    torch.save(state_dict, folder / "ImageReward.pt")
    perturbed = rewards.load_reward_scorer("imagereward", folder, device="cpu").score(images, PROMPTS)
    assert all(abs(a - b) > 1e-4 for a, b in zip(baseline, perturbed))
    # The same prompt with different images: the image reaches the reward through cross-attention.
    same_prompt = scorers["imagereward"].score(images, [PROMPTS[0]] * len(images))
    assert len({round(s, 6) for s in same_prompt}) == len(images)


def test_imagereward_loading_is_strict_about_the_checkpoint(tmp_path):
    import torch

    folder = _copy_folder("tiny:imagereward", tmp_path / "imagereward")
    checkpoint = folder / "ImageReward.pt"
    original = torch.load(checkpoint, weights_only=True)

    torch.save(dict(original, **{"blip.visual_encoder.blocks.0.attn.extra": torch.ones(3)}), checkpoint)
    with pytest.raises(ValueError, match="attn.extra"):
        rewards.load_reward_scorer("imagereward", folder, device="cpu")

    dropped = "blip.text_encoder.encoder.layer.0.crossattention.output.LayerNorm.bias"
    torch.save({k: v for k, v in original.items() if k != dropped}, checkpoint)
    with pytest.raises(ValueError, match="missing.*crossattention.output.LayerNorm.bias"):
        rewards.load_reward_scorer("imagereward", folder, device="cpu")

    torch.save({k: v for k, v in original.items() if k != "mlp.layers.7.bias"}, checkpoint)
    with pytest.raises(ValueError, match="MLP head.*missing 7.bias"):
        rewards.load_reward_scorer("imagereward", folder, device="cpu")


def test_clip_resize_center_crop_follows_torchvision():
    import torch
    from PIL import Image

    rng = np.random.default_rng(1)
    image = Image.fromarray(rng.integers(0, 256, (40, 47, 3), dtype=np.uint8))  # height 40, width 47
    # Resize(32): shorter side 40 -> 32, longer int(32 * 47 / 40) = int(37.6) = 37;
    # CenterCrop(32): left int(round(2.5)) = 2 (Python rounds half to even, as torchvision relies on).
    expected = image.resize((37, 32), Image.Resampling.BICUBIC).crop((2, 0, 34, 32))
    expected = torch.from_numpy(np.asarray(expected, dtype=np.float32) / 255).permute(2, 0, 1)
    np.testing.assert_allclose(reward_base.clip_resize_center_crop(image, 32), reward_base._normalize(expected),
                               atol=1e-6)


# --------------------------------------------------------------------------- tiny builders


def test_tiny_checkpoint_builders_are_deterministic(tmp_path):
    import torch

    for builder, file in ((tiny_scorers.build_tiny_hps, "HPS_v2.1_compressed.pt"),
                          (tiny_scorers.build_tiny_imagereward, "ImageReward.pt")):
        first = torch.load(builder(tmp_path / f"{file}-a") / file, weights_only=True)
        second = torch.load(builder(tmp_path / f"{file}-b") / file, weights_only=True)
        first, second = first.get("state_dict", first), second.get("state_dict", second)
        assert first.keys() == second.keys()
        assert all(torch.equal(first[k], second[k]) for k in first)


def test_tiny_sentence_encoder_loads_with_sentence_transformers():
    sentence_transformers = pytest.importorskip("sentence_transformers")

    folder = resolve_model("tiny:sbert")
    model = sentence_transformers.SentenceTransformer(folder, local_files_only=True, device="cpu")
    embeddings = model.encode(["a red apple", "two dogs on a beach", "a red apple"])
    assert embeddings.shape == (3, tiny_scorers.WIDTH)
    assert np.isfinite(embeddings).all()
    np.testing.assert_allclose(embeddings[0], embeddings[2], atol=1e-6)
    assert not np.allclose(embeddings[0], embeddings[1])
