"""HPS v2 / v2.1 (Wu et al., 2023), run on transformers' ``CLIPModel`` after an open_clip conversion.

Weights: ``HPS_v2_compressed.pt`` / ``HPS_v2.1_compressed.pt`` (the release's torch file holding
``{"state_dict": ...}`` with open_clip key names; a ``.safetensors`` file of the same state dict is
accepted too; ``weights`` may name the folder or the checkpoint file itself), and CLIP BPE tokenizer
files: ``tokenizer.json``, or ``vocab.json`` + ``merges.txt`` (both as in
``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``), or open_clip's ``bpe_simple_vocab_16e6.txt.gz``; beside
the checkpoint or in ``tokenizer/``. Without them, the vocabulary inside an installed ``open_clip``
package is used (read as a file; open_clip is not imported). An optional ``open_clip_config.json``
(open_clip's model config format) replaces the default ``ViT-H-14`` architecture. Score:
``cos(image, text)`` of the normalised open_clip features, exactly what ``hpsv2.score`` returns (its
``image_features @ text_features.T``; no logit scale).

The open_clip checkpoint is converted key by key to transformers' ``CLIPModel``, using every
checkpoint tensor and filling every model tensor, so a wrong mapping fails loudly. open_clip itself
(whose torchvision dependency does not load beside a CPU build of torch) is not needed.
"""

from __future__ import annotations

import gzip
import html
import importlib.util
import json
import re
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from selma.eval.rewards.base import (
    CLIP_TOKENIZER_FILES,
    RewardScorer,
    _empty_model,
    _first_existing,
    _normalize,
    _tensor_image,
    load_converted_state_dict,
    load_state_dict_file,
)
from selma.models.tiny import bytes_to_unicode

if TYPE_CHECKING:
    import PIL.Image
    import torch

# torch and transformers are imported in the functions that use them (cheap import): selma.config loads
# REWARD_SCORERS from this package (tests/eval/test_rewards.py checks that no heavy library loads).
# ftfy is optional (the [eval] extra); open_clip is never imported.

# open_clip's model_configs/ViT-H-14.json, the HPS v2 architecture.
VIT_H_14 = {
    "embed_dim": 1024,
    "vision_cfg": {"image_size": 224, "layers": 32, "width": 1280, "head_width": 80, "patch_size": 14},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 1024, "heads": 16, "layers": 24},
}
OPEN_CLIP_BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"


def hps_resize_max_pad(image: "PIL.Image.Image", size: int) -> "torch.Tensor":
    """HPS v2's evaluation transform (its open_clip fork, ``light_augmentation=True``).

    ``ToTensor`` first, then ``ResizeMaxSize``: scale the longer side to ``size`` with bicubic
    (antialiased, on the float tensor, as torchvision resizes tensors), pad the shorter side with
    zeros, centred; then ``Normalize``. The official transform keeps an RGBA image's alpha channel,
    which the model then cannot take; here every image is converted to RGB first.
    """
    import torch.nn.functional as F

    tensor = _tensor_image(image.convert("RGB"))
    height, width = tensor.shape[1:]
    scale = size / float(max(height, width))
    if scale != 1.0:
        new_height, new_width = round(height * scale), round(width * scale)
        tensor = F.interpolate(tensor[None], size=(new_height, new_width), mode="bicubic",
                               align_corners=False, antialias=True)[0]
    pad_h, pad_w = size - tensor.shape[1], size - tensor.shape[2]
    if pad_h or pad_w:
        tensor = F.pad(tensor, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2), value=0.0)
    return _normalize(tensor)


def open_clip_clean(text: str) -> str:
    """open_clip's tokenizer clean-up: ftfy (when installed), HTML unescape, whitespace, lower case."""
    try:
        import ftfy

        text = ftfy.fix_text(text)
    except ImportError:
        pass
    text = html.unescape(html.unescape(text)).strip()
    return re.sub(r"\s+", " ", text).strip().lower()


# open_clip config entries that do not change ViT-H-14-style CLIP: key -> accepted values.
_OPEN_CLIP_NEUTRAL = {
    "top": {"custom_text": (False,), "quick_gelu": (False, True), "init_logit_scale": None,
            "init_logit_bias": (None,), "cast_dtype": None},
    "vision_cfg": {"mlp_ratio": None, "head_width": None, "patch_dropout": None, "ls_init_value": (None,),
                   "global_average_pool": (False,), "attentional_pool": (False,), "no_ln_pre": (False,),
                   "pool_type": ("tok",), "final_ln_after_pool": (False,), "output_tokens": (False,),
                   "timm_model_name": (None,), "act_kwargs": (None,), "norm_kwargs": (None,)},
    "text_cfg": {"mlp_ratio": None, "ls_init_value": (None,), "hf_model_name": (None,), "embed_cls": (False,),
                 "pad_id": None, "no_causal_mask": (False,), "pool_type": ("argmax",), "proj_bias": (False,),
                 "proj_type": ("linear",), "output_tokens": (False,), "final_ln_after_pool": (False,),
                 "act_kwargs": (None,), "norm_kwargs": (None,)},
}
_OPEN_CLIP_REQUIRED = {
    "top": ("embed_dim", "vision_cfg", "text_cfg"),
    "vision_cfg": ("image_size", "layers", "width", "patch_size"),
    "text_cfg": ("context_length", "vocab_size", "width", "heads", "layers"),
}


def check_open_clip_config(config: dict) -> None:
    """Raise ValueError unless ``config`` is a plain open_clip ViT CLIP (what HPS uses)."""
    sections = {"top": config, "vision_cfg": config.get("vision_cfg") or {}, "text_cfg": config.get("text_cfg") or {}}
    for section, values in sections.items():
        for key in _OPEN_CLIP_REQUIRED[section]:
            if key not in values:
                raise ValueError(f"open_clip config: {section}.{key} is required")
        for key, value in values.items():
            if key in _OPEN_CLIP_REQUIRED[section]:
                continue
            if key not in _OPEN_CLIP_NEUTRAL[section]:
                raise ValueError(f"open_clip config: {section}.{key} is not supported (only plain ViT CLIP models)")
            accepted = _OPEN_CLIP_NEUTRAL[section][key]
            if accepted is not None and value not in accepted:
                raise ValueError(f"open_clip config: {section}.{key}={value!r} is not supported")
    image_size = sections["vision_cfg"]["image_size"]
    if isinstance(image_size, (list, tuple)) and len(set(image_size)) != 1:
        raise ValueError(f"open_clip config: only square images are supported, got {image_size}")


def hf_clip_config_from_open_clip(config: dict, *, pad_token_id: int, bos_token_id: int):
    """A transformers ``CLIPConfig`` with the architecture of an open_clip model config."""
    from transformers import CLIPConfig

    check_open_clip_config(config)
    vision, text = config["vision_cfg"], config["text_cfg"]
    image_size = vision["image_size"][0] if isinstance(vision["image_size"], (list, tuple)) else vision["image_size"]
    activation = "quick_gelu" if config.get("quick_gelu") else "gelu"
    v_width, t_width = vision["width"], text["width"]
    text_config = dict(
        vocab_size=text["vocab_size"],
        hidden_size=t_width,
        intermediate_size=int(t_width * text.get("mlp_ratio", 4.0)),
        num_hidden_layers=text["layers"],
        num_attention_heads=text["heads"],
        max_position_embeddings=text["context_length"],
        hidden_act=activation,
        layer_norm_eps=1e-5,
        projection_dim=config["embed_dim"],
        pad_token_id=pad_token_id,
        bos_token_id=bos_token_id,
        # eos_token_id 2 selects transformers' legacy pooling at input_ids.argmax(-1): exactly
        # open_clip's text.argmax(dim=-1) (the end-of-text token has the largest id).
        eos_token_id=2,
    )
    vision_config = dict(
        hidden_size=v_width,
        intermediate_size=int(v_width * vision.get("mlp_ratio", 4.0)),
        num_hidden_layers=vision["layers"],
        num_attention_heads=v_width // vision.get("head_width", 64),
        image_size=image_size,
        patch_size=vision["patch_size"],
        hidden_act=activation,
        layer_norm_eps=1e-5,
        projection_dim=config["embed_dim"],
    )
    return CLIPConfig(text_config=text_config, vision_config=vision_config, projection_dim=config["embed_dim"])


def _convert_open_clip_block(source: str, target: str, state_dict: dict, out: dict, used: set) -> None:
    def take(name):
        used.add(f"{source}.{name}")
        return state_dict[f"{source}.{name}"]

    for norm_in, norm_out in (("ln_1", "layer_norm1"), ("ln_2", "layer_norm2")):
        for kind in ("weight", "bias"):
            out[f"{target}.{norm_out}.{kind}"] = take(f"{norm_in}.{kind}")
    q, k, v = take("attn.in_proj_weight").chunk(3, dim=0)
    qb, kb, vb = take("attn.in_proj_bias").chunk(3, dim=0)
    for name, weight, bias in (("q_proj", q, qb), ("k_proj", k, kb), ("v_proj", v, vb)):
        out[f"{target}.self_attn.{name}.weight"] = weight
        out[f"{target}.self_attn.{name}.bias"] = bias
    for kind in ("weight", "bias"):
        out[f"{target}.self_attn.out_proj.{kind}"] = take(f"attn.out_proj.{kind}")
        out[f"{target}.mlp.fc1.{kind}"] = take(f"mlp.c_fc.{kind}")
        out[f"{target}.mlp.fc2.{kind}"] = take(f"mlp.c_proj.{kind}")


def convert_open_clip_state_dict(state_dict: dict, config: dict) -> dict:
    """open_clip ``CLIP`` state dict -> transformers ``CLIPModel`` state dict (strict).

    Raises ValueError naming any tensor of ``state_dict`` that was not used (the buffer
    ``attn_mask``, stored by some open_clip versions, is the only one dropped).
    """
    out: dict = {}
    used: set = {"attn_mask"} & set(state_dict)

    def take(name):
        if name not in state_dict:
            raise ValueError(f"open_clip checkpoint: missing tensor {name!r}")
        used.add(name)
        return state_dict[name]

    def block(source: str, target: str):
        try:
            _convert_open_clip_block(source, target, state_dict, out, used)
        except KeyError as error:
            raise ValueError(f"open_clip checkpoint: missing tensor {error.args[0]!r}") from None

    out["vision_model.embeddings.class_embedding"] = take("visual.class_embedding")
    out["vision_model.embeddings.position_embedding.weight"] = take("visual.positional_embedding")
    out["vision_model.embeddings.patch_embedding.weight"] = take("visual.conv1.weight")
    for kind in ("weight", "bias"):
        out[f"vision_model.pre_layrnorm.{kind}"] = take(f"visual.ln_pre.{kind}")
        out[f"vision_model.post_layernorm.{kind}"] = take(f"visual.ln_post.{kind}")
        out[f"text_model.final_layer_norm.{kind}"] = take(f"ln_final.{kind}")
    for index in range(config["vision_cfg"]["layers"]):
        block(f"visual.transformer.resblocks.{index}", f"vision_model.encoder.layers.{index}")
    for index in range(config["text_cfg"]["layers"]):
        block(f"transformer.resblocks.{index}", f"text_model.encoder.layers.{index}")
    out["visual_projection.weight"] = take("visual.proj").t()
    out["text_model.embeddings.token_embedding.weight"] = take("token_embedding.weight")
    out["text_model.embeddings.position_embedding.weight"] = take("positional_embedding")
    out["text_projection.weight"] = take("text_projection").t()
    out["logit_scale"] = take("logit_scale").reshape(())
    unused = sorted(set(state_dict) - used)
    if unused:
        head = ", ".join(unused[:8]) + (f", ... ({len(unused)} in all)" if len(unused) > 8 else "")
        raise ValueError(f"open_clip checkpoint: tensors not used by the architecture: {head}")
    return out


def clip_tokenizer_from_open_clip_bpe(bpe_path: Path, context_length: int = 77):
    """A transformers ``CLIPTokenizer`` with the vocabulary of open_clip's ``SimpleTokenizer``."""
    from transformers import CLIPTokenizer

    lines = gzip.open(bpe_path).read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1:49152 - 256 - 2 + 1] if line.strip()]
    byte_chars = list(bytes_to_unicode().values())
    tokens = byte_chars + [char + "</w>" for char in byte_chars] + ["".join(merge) for merge in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {token: index for index, token in enumerate(tokens)}
    with tempfile.TemporaryDirectory(prefix="selma-clip-bpe-") as folder:
        (Path(folder) / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
        merge_lines = ["#version: 0.2"] + [" ".join(merge) for merge in merges]
        (Path(folder) / "merges.txt").write_text("\n".join(merge_lines) + "\n", encoding="utf-8")
        return CLIPTokenizer.from_pretrained(folder, model_max_length=context_length, local_files_only=True)


def _installed_open_clip_bpe() -> Path | None:
    """open_clip's bundled BPE vocabulary, found without importing open_clip (or torchvision)."""
    try:
        spec = importlib.util.find_spec("open_clip")
    except (ImportError, ValueError):
        return None
    for location in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(location) / OPEN_CLIP_BPE_FILE
        if candidate.is_file():
            return candidate
    return None


class HPSv2Scorer(RewardScorer):
    """HPS v2 (Wu et al., 2023): cosine of open_clip ViT-H-14 features fine-tuned on HPD v2."""

    name = "hpsv2"
    checkpoint_names = ("HPS_v2_compressed.pt", "HPS_v2_compressed.safetensors")

    @property
    def expected_files(self) -> str:  # type: ignore[override]
        return (
            f"{' or '.join(self.checkpoint_names)} (the HPS release, {{'state_dict': ...}} with open_clip keys) "
            f"and CLIP tokenizer files (tokenizer.json, or vocab.json + merges.txt, or {OPEN_CLIP_BPE_FILE}) beside "
            "it or in tokenizer/ (or an installed open_clip package); optional open_clip_config.json "
            "(default ViT-H-14)"
        )

    def _checkpoint(self) -> Path:
        folder = self._folder()
        if self.weights.is_file():
            return self.weights
        found = _first_existing(folder, self.checkpoint_names)
        if found is None:
            raise self._missing("no checkpoint file")
        return found

    def _tokenizer(self, folder: Path, context_length: int):
        from transformers import CLIPTokenizer

        for candidate in (folder / "tokenizer", folder):
            if _first_existing(candidate, CLIP_TOKENIZER_FILES) is not None:
                return CLIPTokenizer.from_pretrained(candidate, local_files_only=True)
            if (candidate / OPEN_CLIP_BPE_FILE).is_file():
                return clip_tokenizer_from_open_clip_bpe(candidate / OPEN_CLIP_BPE_FILE, context_length)
        installed = _installed_open_clip_bpe()
        if installed is not None:
            return clip_tokenizer_from_open_clip_bpe(installed, context_length)
        raise self._missing("no tokenizer files")

    def _load(self) -> None:
        import torch
        from transformers import CLIPModel

        checkpoint = self._checkpoint()
        folder = checkpoint.parent
        config_file = folder / "open_clip_config.json"
        self.open_clip_config = (json.loads(config_file.read_text(encoding="utf-8"))
                                 if config_file.is_file() else VIT_H_14)
        check_open_clip_config(self.open_clip_config)
        self.context_length = self.open_clip_config["text_cfg"]["context_length"]
        self.tokenizer = self._tokenizer(folder, self.context_length)
        state_dict = convert_open_clip_state_dict(load_state_dict_file(checkpoint), self.open_clip_config)
        config = hf_clip_config_from_open_clip(
            self.open_clip_config, pad_token_id=self.tokenizer.pad_token_id, bos_token_id=self.tokenizer.bos_token_id
        )
        model = _empty_model(lambda: CLIPModel(config))
        load_converted_state_dict(model, state_dict, f"{self.name} ({checkpoint})")
        self.model = model.eval().to(self.device)
        vision_size = self.open_clip_config["vision_cfg"]["image_size"]
        self.image_size = vision_size[0] if isinstance(vision_size, (list, tuple)) else vision_size
        self.checkpoint = checkpoint
        self._torch = torch

    def embeddings(self, images: list, prompts: list[str]) -> tuple["torch.Tensor", "torch.Tensor"]:
        """Normalised image and text features, as open_clip's ``CLIP(image, text)`` returns them."""
        torch = self._torch
        pixels = torch.stack([hps_resize_max_pad(image, self.image_size) for image in images]).to(self.device)
        text = self.tokenizer([open_clip_clean(p) for p in prompts], padding="max_length", truncation=True,
                              max_length=self.context_length, return_tensors="pt").to(self.device)
        image_features = self.model.visual_projection(self.model.vision_model(pixel_values=pixels).pooler_output)
        text_features = self.model.text_projection(
            self.model.text_model(input_ids=text["input_ids"], attention_mask=text["attention_mask"]).pooler_output
        )
        normalize = torch.nn.functional.normalize
        return normalize(image_features.float(), dim=-1), normalize(text_features.float(), dim=-1)

    def _score_batch(self, images, prompts):
        image_features, text_features = self.embeddings(images, prompts)
        return (image_features * text_features).sum(dim=-1).tolist()


class HPSv21Scorer(HPSv2Scorer):
    """HPS v2.1: the same model and score, the v2.1 checkpoint."""

    name = "hpsv2.1"
    checkpoint_names = ("HPS_v2.1_compressed.pt", "HPS_v2.1_compressed.safetensors")
