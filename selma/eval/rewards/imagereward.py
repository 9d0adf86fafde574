"""ImageReward (Xu et al., 2023), run on transformers' BLIP modules after a key-by-key conversion.

Weights: ``ImageReward.pt`` (the original state dict, keys ``blip.visual_encoder.*``,
``blip.text_encoder.*``, ``mlp.layers.*``; or a ``.safetensors`` file of it; ``weights`` may name the
folder or the checkpoint file itself), ``med_config.json`` (both from ``THUDM/ImageReward``) and a
``bert-base-uncased`` tokenizer (``vocab.txt`` and/or ``tokenizer.json``, beside them or in
``tokenizer/``); BLIP's ``[DEC]`` and ``[ENC]`` tokens are added as ImageReward's ``init_tokenizer``
does. An optional ``vision_config.json`` (arguments of BLIP's ``VisionTransformer``: ``image_size``,
``patch_size``, ``embed_dim``, ``depth``, ``num_heads``, ``mlp_ratio``) replaces the default ViT-L/16
at 224 pixels. Score: ``(mlp(text_encoder(prompt, image)[CLS]) - 0.16717...) / 1.03333...``.

The model is transformers' ``BlipVisionModel`` and ``BlipTextModel`` (the BLIP "med" BERT with
cross-attention) plus ImageReward's MLP head; the conversion uses every checkpoint tensor and fills
every model tensor, so a wrong mapping fails loudly. The ``image-reward`` package (broken imports with
current transformers) is not needed.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from selma.eval.rewards.base import (
    RewardScorer,
    _empty_model,
    _first_existing,
    clip_resize_center_crop,
    load_converted_state_dict,
    load_state_dict_file,
)

# torch and transformers are imported in the functions that use them (cheap import): selma.config loads
# REWARD_SCORERS from this package (tests/eval/test_rewards.py checks that no heavy library loads).

IMAGEREWARD_MEAN = 0.16717362830052426
IMAGEREWARD_STD = 1.0333394966054072
IMAGEREWARD_MAX_TOKENS = 35
IMAGEREWARD_MLP_SIZES = (1024, 128, 64, 16, 1)
# The contrastive projections of BLIP_Pretrain are in ImageReward.pt but unused by the reward.
IMAGEREWARD_UNUSED_PREFIXES = ("blip.vision_proj.", "blip.text_proj.")
# BLIP's create_vit("large", 224): ImageReward's image encoder.
BLIP_VIT_LARGE = {"image_size": 224, "patch_size": 16, "embed_dim": 1024, "depth": 24, "num_heads": 16,
                  "mlp_ratio": 4.0}
BERT_TOKENIZER_FILES = ("tokenizer.json", "vocab.txt")


def _imagereward_vision_key(key: str) -> str | None:
    """``blip.visual_encoder.*`` (BLIP's timm-style ViT) -> ``BlipVisionModel`` key; None if unknown."""
    fixed = {
        "cls_token": "embeddings.class_embedding",
        "pos_embed": "embeddings.position_embedding",
        "patch_embed.proj.weight": "embeddings.patch_embedding.weight",
        "patch_embed.proj.bias": "embeddings.patch_embedding.bias",
        "norm.weight": "post_layernorm.weight",
        "norm.bias": "post_layernorm.bias",
    }
    if key in fixed:
        return fixed[key]
    match = re.fullmatch(r"blocks\.(\d+)\.(norm1|norm2|attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)\.(weight|bias)", key)
    if match is None:
        return None
    index, module, kind = match.groups()
    module = {"norm1": "layer_norm1", "norm2": "layer_norm2", "attn.qkv": "self_attn.qkv",
              "attn.proj": "self_attn.projection", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}[module]
    return f"encoder.layers.{index}.{module}.{kind}"


def convert_imagereward_state_dict(state_dict: dict) -> tuple[dict, dict, dict]:
    """Split an original ``ImageReward.pt`` into vision, text and MLP state dicts (transformers keys).

    The text encoder is BLIP's "med" BERT, whose key names transformers' ``BlipTextModel`` kept;
    its ``embeddings.position_ids`` buffer and the unused ``blip.vision_proj`` / ``blip.text_proj``
    are dropped. Any other key that is not mapped raises ValueError.
    """
    vision, text, mlp, unknown = {}, {}, {}, []
    for key, tensor in state_dict.items():
        if key.startswith("blip.visual_encoder."):
            target = _imagereward_vision_key(key[len("blip.visual_encoder."):])
            if target is None:
                unknown.append(key)
            else:
                vision[target] = tensor
        elif key.startswith("blip.text_encoder."):
            name = key[len("blip.text_encoder."):]
            if name != "embeddings.position_ids":
                text[name] = tensor
        elif key.startswith("mlp.layers."):
            mlp[key[len("mlp.layers."):]] = tensor
        elif not key.startswith(IMAGEREWARD_UNUSED_PREFIXES):
            unknown.append(key)
    if unknown:
        head = ", ".join(unknown[:8]) + (f", ... ({len(unknown)} in all)" if len(unknown) > 8 else "")
        raise ValueError(f"ImageReward checkpoint: unknown tensors {head}")
    return vision, text, mlp


def imagereward_mlp(input_size: int):
    """ImageReward's reward head: linear layers (1024, 128, 64, 16, 1) with dropouts, no activations."""
    from torch import nn

    sizes = (input_size, *IMAGEREWARD_MLP_SIZES)
    return nn.Sequential(
        nn.Linear(sizes[0], sizes[1]), nn.Dropout(0.2),
        nn.Linear(sizes[1], sizes[2]), nn.Dropout(0.2),
        nn.Linear(sizes[2], sizes[3]), nn.Dropout(0.1),
        nn.Linear(sizes[3], sizes[4]),
        nn.Linear(sizes[4], sizes[5]),
    )


def imagereward_modules(med_config: dict, vision_config: dict, *, pad_token_id: int | None = None,
                        bos_token_id: int | None = None, sep_token_id: int | None = None):
    """Empty (meta-device) ``BlipVisionModel``, ``BlipTextModel`` and MLP head for ImageReward.

    ``med_config``: BLIP's med_config.json; ``vision_config``: BLIP ``VisionTransformer`` arguments.
    """
    from transformers import BlipTextConfig, BlipVisionConfig, BlipVisionModel
    from transformers.models.blip.modeling_blip_text import BlipTextModel

    med, vit = med_config, vision_config
    vision = BlipVisionConfig(
        hidden_size=vit["embed_dim"],
        intermediate_size=int(vit["embed_dim"] * vit["mlp_ratio"]),
        num_hidden_layers=vit["depth"],
        num_attention_heads=vit["num_heads"],
        image_size=vit["image_size"],
        patch_size=vit["patch_size"],
        hidden_act="gelu",
        layer_norm_eps=1e-6,  # BLIP's VisionTransformer: partial(nn.LayerNorm, eps=1e-6)
    )
    text = BlipTextConfig(
        vocab_size=med["vocab_size"],
        hidden_size=med["hidden_size"],
        encoder_hidden_size=vit["embed_dim"],  # BLIP_Pretrain sets encoder_width = vision width
        intermediate_size=med["intermediate_size"],
        num_hidden_layers=med["num_hidden_layers"],
        num_attention_heads=med["num_attention_heads"],
        max_position_embeddings=med["max_position_embeddings"],
        hidden_act=med.get("hidden_act", "gelu"),
        layer_norm_eps=med.get("layer_norm_eps", 1e-12),
        pad_token_id=pad_token_id if pad_token_id is not None else med.get("pad_token_id", 0),
        bos_token_id=bos_token_id,
        sep_token_id=sep_token_id,
        is_decoder=True,  # gives every layer its cross-attention; the forward runs bidirectionally
    )
    return (
        _empty_model(lambda: BlipVisionModel(vision)),
        _empty_model(lambda: BlipTextModel(text, add_pooling_layer=False)),
        _empty_model(lambda: imagereward_mlp(med["hidden_size"])),
    )


class ImageRewardScorer(RewardScorer):
    """ImageReward (Xu et al., 2023): a BLIP image-grounded text encoder and an MLP reward head."""

    name = "imagereward"
    checkpoint_names = ("ImageReward.pt", "ImageReward.safetensors")
    expected_files = (
        "ImageReward.pt (or ImageReward.safetensors) and med_config.json from THUDM/ImageReward, and a "
        "bert-base-uncased tokenizer (vocab.txt and/or tokenizer.json) beside them or in tokenizer/; optional "
        "vision_config.json (default ViT-L/16 at 224 pixels)"
    )

    def _tokenizer(self, folder: Path):
        from transformers import BertTokenizer

        for candidate in (folder / "tokenizer", folder):
            if _first_existing(candidate, BERT_TOKENIZER_FILES) is not None:
                tokenizer = BertTokenizer.from_pretrained(candidate, local_files_only=True)
                break
        else:
            raise self._missing("no tokenizer files")
        # BLIP's init_tokenizer: [DEC] as bos token, [ENC] as an extra special token.
        tokenizer.add_special_tokens({"bos_token": "[DEC]"})
        tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
        return tokenizer

    def _load(self) -> None:
        import torch

        folder = self._folder()
        checkpoint = self.weights if self.weights.is_file() else _first_existing(folder, self.checkpoint_names)
        if checkpoint is None:
            raise self._missing("no checkpoint file")
        if not (folder / "med_config.json").is_file():
            raise self._missing("no med_config.json")
        med = json.loads((folder / "med_config.json").read_text(encoding="utf-8"))
        vision_file = folder / "vision_config.json"
        vit = dict(BLIP_VIT_LARGE)
        if vision_file.is_file():
            vit.update(json.loads(vision_file.read_text(encoding="utf-8")))
        if med.get("position_embedding_type", "absolute") != "absolute" or not med.get("add_cross_attention", False):
            raise ValueError(f"{self.name}: med_config.json must describe BLIP's med BERT "
                             "(absolute positions, add_cross_attention true)")
        self.tokenizer = self._tokenizer(folder)
        vision_sd, text_sd, mlp_sd = convert_imagereward_state_dict(load_state_dict_file(checkpoint))
        if max(self.tokenizer.get_vocab().values()) >= med["vocab_size"]:
            raise ValueError(f"{self.name}: the tokenizer has ids beyond med_config.json's vocab_size "
                             f"{med['vocab_size']}")

        vision, text, mlp = imagereward_modules(med, vit, pad_token_id=self.tokenizer.pad_token_id,
                                                bos_token_id=self.tokenizer.bos_token_id,
                                                sep_token_id=self.tokenizer.sep_token_id)
        what = f"{self.name} ({checkpoint})"
        load_converted_state_dict(vision, vision_sd, f"{what} image encoder")
        load_converted_state_dict(text, text_sd, f"{what} text encoder")
        load_converted_state_dict(mlp, mlp_sd, f"{what} MLP head")
        self.vision, self.text, self.mlp = (m.eval().to(self.device) for m in (vision, text, mlp))
        self.image_size = vit["image_size"]
        self.checkpoint = checkpoint
        self._torch = torch

    def _score_batch(self, images, prompts):
        torch = self._torch
        pixels = torch.stack([clip_resize_center_crop(image, self.image_size) for image in images]).to(self.device)
        text = self.tokenizer(prompts, padding="max_length", truncation=True, max_length=IMAGEREWARD_MAX_TOKENS,
                              return_tensors="pt").to(self.device)
        image_embeds = self.vision(pixel_values=pixels).last_hidden_state
        image_atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=self.device)
        output = self.text(
            input_ids=text["input_ids"],
            attention_mask=text["attention_mask"],
            encoder_hidden_states=image_embeds,
            encoder_attention_mask=image_atts,
        )
        rewards = self.mlp(output.last_hidden_state[:, 0, :].float())
        return ((rewards - IMAGEREWARD_MEAN) / IMAGEREWARD_STD).squeeze(-1).tolist()
