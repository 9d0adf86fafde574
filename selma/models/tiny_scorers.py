"""Tiny, randomly initialised scorer models for the evaluation tests.

Each builder writes a complete weights folder in the layout that ``selma.eval.rewards`` (or
sentence-transformers) expects of the real release, so the tests load them through the same
code path as real checkpoints. Everything is built offline and seeded: nothing touches a hub.

* ``build_tiny_clip``: a ``CLIPModel`` + ``CLIPProcessor`` folder (CLIPScore, PickScore).
* ``build_tiny_hps``: ``HPS_v2_compressed.pt`` and ``HPS_v2.1_compressed.pt`` in the HPS release
  format (a torch file holding ``{"state_dict": ...}`` with open_clip's key names), a tiny
  ``open_clip_config.json`` that replaces the default ViT-H-14 architecture, and CLIP tokenizer
  files.
* ``build_tiny_imagereward``: ``ImageReward.pt`` in the original ImageReward key layout
  (``blip.visual_encoder.*``, ``blip.text_encoder.*``, ``blip.vision_proj.*``,
  ``blip.text_proj.*``, ``mlp.layers.*``), ``med_config.json``, a ``vision_config.json`` that
  replaces the default ViT-L/16, and a plain ``bert-base-uncased``-style tokenizer (the scorer
  adds BLIP's ``[DEC]`` and ``[ENC]`` tokens itself, as ImageReward's ``init_tokenizer`` does).
* ``build_tiny_sentence_encoder``: a sentence-transformers folder (tiny BERT + mean pooling).

The open_clip and ImageReward state dicts are written key by key from the original modules'
structure (not by inverting the scorers' key mappings), so the tests do check those mappings.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from transformers import (
    BertConfig,
    BertModel,
    BertTokenizer,
    CLIPConfig,
    CLIPImageProcessor,
    CLIPModel,
    CLIPProcessor,
    CLIPVisionConfig,
)

from selma.models.tiny import _clip_text_config, build_clip_tokenizer, corpus_words, write_clip_vocab_files

IMAGE_SIZE = 32
PATCH_SIZE = 8
WIDTH = 32
HEADS = 4
LAYERS = 2
EMBED_DIM = 16
IMAGEREWARD_MAX_POSITIONS = 40  # ImageReward tokenizes to 35 tokens
IMAGEREWARD_MLP_SIZES = (1024, 128, 64, 16, 1)  # fixed in ImageReward's MLP head
HPS_CHECKPOINTS = {"HPS_v2_compressed.pt": 0, "HPS_v2.1_compressed.pt": 1}  # file -> seed

BERT_SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
_BERT_CHARACTERS = list("abcdefghijklmnopqrstuvwxyz0123456789") + list(".,!?;:'\"()-&/")


# --------------------------------------------------------------------------- CLIP


def build_tiny_clip(out_dir: str | Path, seed: int = 0) -> Path:
    """Save a tiny ``CLIPModel`` and its ``CLIPProcessor`` (32-pixel images, 77-token prompts).

    The two towers end in the same layer-norm bias and the same projection, so image and text
    embeddings share a component and their cosines are mostly positive: CLIPScore clips negative
    cosines to 0, which with purely random towers would hide most differences between inputs.
    """
    tokenizer = build_clip_tokenizer()
    text_config = _clip_text_config(tokenizer, hidden_size=WIDTH, projection_dim=EMBED_DIM)
    vision_config = CLIPVisionConfig(
        hidden_size=WIDTH,
        intermediate_size=2 * WIDTH,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
        projection_dim=EMBED_DIM,
    )
    config = CLIPConfig(
        text_config=text_config.to_dict(), vision_config=vision_config.to_dict(), projection_dim=EMBED_DIM
    )
    torch.manual_seed(seed)
    model = CLIPModel(config).eval()
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        shared_bias = torch.randn(WIDTH, generator=generator) * 0.8
        model.vision_model.post_layernorm.bias.copy_(shared_bias)
        model.text_model.final_layer_norm.bias.copy_(shared_bias)
        model.text_projection.weight.copy_(model.visual_projection.weight)
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    )
    processor = CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir, safe_serialization=True)
    processor.save_pretrained(out_dir)
    write_clip_vocab_files(out_dir)
    return out_dir


# --------------------------------------------------------------------------- HPS (open_clip layout)


def tiny_open_clip_config(vocab_size: int) -> dict:
    """A tiny model config in open_clip's JSON format (the same keys as its ``ViT-H-14.json``)."""
    return {
        "embed_dim": EMBED_DIM,
        "vision_cfg": {
            "image_size": IMAGE_SIZE,
            "layers": LAYERS,
            "width": WIDTH,
            "head_width": WIDTH // HEADS,
            "patch_size": PATCH_SIZE,
        },
        "text_cfg": {
            "context_length": 77,
            "vocab_size": vocab_size,
            "width": WIDTH,
            "heads": HEADS,
            "layers": LAYERS,
        },
    }


def _normal(generator, *shape, std: float = 0.02):
    return torch.randn(*shape, generator=generator) * std


def _layer_norm(prefix: str, width: int, generator) -> dict:
    return {
        f"{prefix}.weight": 1.0 + _normal(generator, width, std=0.1),
        f"{prefix}.bias": _normal(generator, width, std=0.1),
    }


def _linear(prefix: str, out_features: int, in_features: int, generator, *, bias: bool = True) -> dict:
    std = 1.0 / math.sqrt(in_features)
    tensors = {f"{prefix}.weight": _normal(generator, out_features, in_features, std=std)}
    if bias:
        tensors[f"{prefix}.bias"] = _normal(generator, out_features, std=0.02)
    return tensors


def _open_clip_resblocks(prefix: str, layers: int, width: int, mlp_ratio: float, generator) -> dict:
    """open_clip's ``Transformer.resblocks`` (``ResidualAttentionBlock`` with ``nn.MultiheadAttention``)."""
    tensors = {}
    hidden = int(width * mlp_ratio)
    for index in range(layers):
        block = f"{prefix}.resblocks.{index}"
        tensors.update(_layer_norm(f"{block}.ln_1", width, generator))
        tensors[f"{block}.attn.in_proj_weight"] = _normal(generator, 3 * width, width, std=width**-0.5)
        tensors[f"{block}.attn.in_proj_bias"] = _normal(generator, 3 * width)
        tensors.update(_linear(f"{block}.attn.out_proj", width, width, generator))
        tensors.update(_layer_norm(f"{block}.ln_2", width, generator))
        tensors.update(_linear(f"{block}.mlp.c_fc", hidden, width, generator))
        tensors.update(_linear(f"{block}.mlp.c_proj", width, hidden, generator))
    return tensors


def tiny_open_clip_state_dict(config: dict, seed: int = 0) -> dict:
    """Random weights under open_clip ``CLIP``'s state-dict keys for ``config`` (open_clip format)."""
    generator = torch.Generator().manual_seed(seed)
    embed_dim = config["embed_dim"]
    vision, text = config["vision_cfg"], config["text_cfg"]
    v_width, t_width = vision["width"], text["width"]
    grid = vision["image_size"] // vision["patch_size"]
    tensors = {
        "positional_embedding": _normal(generator, text["context_length"], t_width, std=0.01),
        "text_projection": _normal(generator, t_width, embed_dim, std=t_width**-0.5),
        "logit_scale": torch.tensor(math.log(1 / 0.07)),
        "token_embedding.weight": _normal(generator, text["vocab_size"], t_width, std=0.5),
        "visual.class_embedding": _normal(generator, v_width, std=v_width**-0.5),
        "visual.positional_embedding": _normal(generator, grid * grid + 1, v_width, std=v_width**-0.5),
        "visual.proj": _normal(generator, v_width, embed_dim, std=v_width**-0.5),
        "visual.conv1.weight": _normal(generator, v_width, 3, vision["patch_size"], vision["patch_size"], std=0.05),
    }
    tensors.update(_layer_norm("visual.ln_pre", v_width, generator))
    tensors.update(_open_clip_resblocks("visual.transformer", vision["layers"], v_width,
                                        vision.get("mlp_ratio", 4.0), generator))
    tensors.update(_layer_norm("visual.ln_post", v_width, generator))
    tensors.update(_open_clip_resblocks("transformer", text["layers"], t_width, text.get("mlp_ratio", 4.0), generator))
    tensors.update(_layer_norm("ln_final", t_width, generator))
    return tensors


def build_tiny_hps(out_dir: str | Path, seed: int = 0) -> Path:
    """Save tiny HPS v2 and v2.1 checkpoints in the release format, their config and tokenizer.

    ``HPS_v2.1_compressed.pt`` is stored in float16 (the scorer upcasts), the v2 file in float32.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = build_clip_tokenizer()
    tokenizer.save_pretrained(out_dir)
    write_clip_vocab_files(out_dir)
    config = tiny_open_clip_config(len(tokenizer))
    (out_dir / "open_clip_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    for file_name, offset in HPS_CHECKPOINTS.items():
        state_dict = tiny_open_clip_state_dict(config, seed=seed + offset)
        if "2.1" in file_name:
            state_dict = {name: tensor.half() for name, tensor in state_dict.items()}
        torch.save({"state_dict": state_dict}, out_dir / file_name)
    return out_dir


# --------------------------------------------------------------------------- ImageReward (BLIP layout)


def bert_vocabulary() -> list[str]:
    """A lower-case WordPiece vocabulary: BERT's special tokens, characters, ``##`` pieces, words."""
    words = [word for word in corpus_words() if word.isalpha()]
    tokens = BERT_SPECIAL_TOKENS + _BERT_CHARACTERS + ["##" + char for char in _BERT_CHARACTERS] + words
    return list(dict.fromkeys(tokens))


def build_bert_tokenizer(out_dir: str | Path):
    """Write ``vocab.txt`` + ``tokenizer_config.json`` (a bert-base-uncased-style folder); load it."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "vocab.txt").write_text("\n".join(bert_vocabulary()) + "\n", encoding="utf-8")
    tokenizer_config = {"tokenizer_class": "BertTokenizer", "do_lower_case": True, "model_max_length": 512}
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n", encoding="utf-8")
    tokenizer = BertTokenizer.from_pretrained(out_dir, local_files_only=True)
    tokenizer.save_pretrained(out_dir)  # adds tokenizer.json, as a real bert-base-uncased folder has
    return tokenizer


def tiny_med_config(vocab_size: int) -> dict:
    """BLIP's ``med_config.json`` with tiny sizes."""
    return {
        "architectures": ["BertModel"],
        "attention_probs_dropout_prob": 0.1,
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.1,
        "hidden_size": WIDTH,
        "initializer_range": 0.02,
        "intermediate_size": 2 * WIDTH,
        "layer_norm_eps": 1e-12,
        "max_position_embeddings": IMAGEREWARD_MAX_POSITIONS,
        "model_type": "bert",
        "num_attention_heads": HEADS,
        "num_hidden_layers": LAYERS,
        "pad_token_id": 0,
        "type_vocab_size": 2,
        "vocab_size": vocab_size,
        "encoder_width": WIDTH,
        "add_cross_attention": True,
    }


def tiny_blip_vision_config() -> dict:
    """Arguments of BLIP's ``VisionTransformer`` for a tiny ViT (the scorer's default is ViT-L/16)."""
    return {
        "image_size": IMAGE_SIZE,
        "patch_size": PATCH_SIZE,
        "embed_dim": WIDTH,
        "depth": LAYERS,
        "num_heads": HEADS,
        "mlp_ratio": 4.0,
    }


def _bert_attention(prefix: str, width: int, key_width: int, generator) -> dict:
    tensors = {}
    tensors.update(_linear(f"{prefix}.self.query", width, width, generator))
    tensors.update(_linear(f"{prefix}.self.key", width, key_width, generator))
    tensors.update(_linear(f"{prefix}.self.value", width, key_width, generator))
    tensors.update(_linear(f"{prefix}.output.dense", width, width, generator))
    tensors.update(_layer_norm(f"{prefix}.output.LayerNorm", width, generator))
    return tensors


def tiny_imagereward_state_dict(med_config: dict, vision_config: dict, seed: int = 0) -> dict:
    """Random weights under the keys of ImageReward's ``ImageReward`` module (BLIP_Pretrain + MLP)."""
    generator = torch.Generator().manual_seed(seed)
    v_width, patch = vision_config["embed_dim"], vision_config["patch_size"]
    grid = vision_config["image_size"] // patch
    v_hidden = int(v_width * vision_config["mlp_ratio"])
    tensors = {
        "blip.visual_encoder.cls_token": _normal(generator, 1, 1, v_width, std=0.5),
        "blip.visual_encoder.pos_embed": _normal(generator, 1, grid * grid + 1, v_width, std=0.5),
        "blip.visual_encoder.patch_embed.proj.weight": _normal(generator, v_width, 3, patch, patch, std=0.05),
        "blip.visual_encoder.patch_embed.proj.bias": _normal(generator, v_width),
    }
    for index in range(vision_config["depth"]):
        block = f"blip.visual_encoder.blocks.{index}"
        tensors.update(_layer_norm(f"{block}.norm1", v_width, generator))
        tensors.update(_linear(f"{block}.attn.qkv", 3 * v_width, v_width, generator))
        tensors.update(_linear(f"{block}.attn.proj", v_width, v_width, generator))
        tensors.update(_layer_norm(f"{block}.norm2", v_width, generator))
        tensors.update(_linear(f"{block}.mlp.fc1", v_hidden, v_width, generator))
        tensors.update(_linear(f"{block}.mlp.fc2", v_width, v_hidden, generator))
    tensors.update(_layer_norm("blip.visual_encoder.norm", v_width, generator))

    t_width, encoder_width = med_config["hidden_size"], v_width  # BLIP_Pretrain sets encoder_width
    text = "blip.text_encoder"
    tensors[f"{text}.embeddings.position_ids"] = torch.arange(med_config["max_position_embeddings"]).expand(1, -1)
    tensors[f"{text}.embeddings.word_embeddings.weight"] = _normal(
        generator, med_config["vocab_size"], t_width, std=0.5
    )
    tensors[f"{text}.embeddings.position_embeddings.weight"] = _normal(
        generator, med_config["max_position_embeddings"], t_width, std=0.5
    )
    tensors.update(_layer_norm(f"{text}.embeddings.LayerNorm", t_width, generator))
    for index in range(med_config["num_hidden_layers"]):
        layer = f"{text}.encoder.layer.{index}"
        tensors.update(_bert_attention(f"{layer}.attention", t_width, t_width, generator))
        tensors.update(_bert_attention(f"{layer}.crossattention", t_width, encoder_width, generator))
        tensors.update(_linear(f"{layer}.intermediate.dense", med_config["intermediate_size"], t_width, generator))
        tensors.update(_linear(f"{layer}.output.dense", t_width, med_config["intermediate_size"], generator))
        tensors.update(_layer_norm(f"{layer}.output.LayerNorm", t_width, generator))
    # BLIP_Pretrain's contrastive projections: in the checkpoint, unused by the reward.
    tensors.update(_linear("blip.vision_proj", 256, v_width, generator))
    tensors.update(_linear("blip.text_proj", 256, t_width, generator))

    sizes = (t_width, *IMAGEREWARD_MLP_SIZES)
    for position, (in_features, out_features) in zip((0, 2, 4, 6, 7), zip(sizes[:-1], sizes[1:])):
        tensors.update(_linear(f"mlp.layers.{position}", out_features, in_features, generator))
    return tensors


def build_tiny_imagereward(out_dir: str | Path, seed: int = 0) -> Path:
    """Save a tiny ``ImageReward.pt`` (original key layout), its configs and tokenizer."""
    out_dir = Path(out_dir)
    tokenizer = build_bert_tokenizer(out_dir)
    med_config = tiny_med_config(len(tokenizer) + 2)  # + [DEC] and [ENC], as BLIP adds them
    vision_config = tiny_blip_vision_config()
    (out_dir / "med_config.json").write_text(json.dumps(med_config, indent=2) + "\n", encoding="utf-8")
    (out_dir / "vision_config.json").write_text(json.dumps(vision_config, indent=2) + "\n", encoding="utf-8")
    torch.save(tiny_imagereward_state_dict(med_config, vision_config, seed=seed), out_dir / "ImageReward.pt")
    return out_dir


# --------------------------------------------------------------------------- sentence encoder


def build_tiny_sentence_encoder(out_dir: str | Path, seed: int = 0) -> Path:
    """Save a sentence-transformers folder: a tiny ``BertModel``, its tokenizer and mean pooling.

    Written in the classic folder layout (``modules.json``, ``sentence_bert_config.json``,
    ``1_Pooling/config.json``) that every sentence-transformers release loads with
    ``SentenceTransformer(out_dir, local_files_only=True)``.
    """
    out_dir = Path(out_dir)
    tokenizer = build_bert_tokenizer(out_dir)
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=WIDTH,
        intermediate_size=2 * WIDTH,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        max_position_embeddings=128,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    # With its (unused) pooler, so that loading reports no missing weights.
    BertModel(config).save_pretrained(out_dir, safe_serialization=True)
    files = {
        "modules.json": [
            {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
            {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        ],
        "sentence_bert_config.json": {"max_seq_length": 64, "do_lower_case": False},
        "config_sentence_transformers.json": {"prompts": {}, "default_prompt_name": None,
                                              "similarity_fn_name": "cosine"},
        "1_Pooling/config.json": {
            "word_embedding_dimension": WIDTH,
            "pooling_mode_cls_token": False,
            "pooling_mode_mean_tokens": True,
            "pooling_mode_max_tokens": False,
            "pooling_mode_mean_sqrt_len_tokens": False,
            "pooling_mode_weightedmean_tokens": False,
            "pooling_mode_lasttoken": False,
            "include_prompt": True,
        },
    }
    for name, content in files.items():
        path = out_dir / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(content, indent=2) + "\n", encoding="utf-8")
    return out_dir
