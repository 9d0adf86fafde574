"""Human-preference reward scorers: CLIPScore, PickScore, HPS v2 / v2.1 and ImageReward.

Every scorer reads an explicit, local weights folder (or a ``tiny:`` spec, built once by
``selma.core.models.resolve_model``), never a model hub, and scores image-prompt pairs::

    scorer = load_reward_scorer("pickscore", "/models/pickscore")
    scorer.score([image_a, image_b], ["a red cube", "two cats"])  # -> [21.3, 19.8]

Models are built once per scorer (in ``__init__``) and run in float32 under
``torch.inference_mode()``. Prompts longer than a model's context are truncated, as the
reference implementations do. torch / transformers are imported only when a scorer is built.

Weights folders (``weights`` may also name the checkpoint file itself for HPS and ImageReward;
its configuration and tokenizer files are then looked up beside it):

``clipscore`` -- a transformers ``CLIPModel`` folder (``config.json`` + ``model.safetensors`` or
    ``pytorch_model.bin``) with its processor files (``preprocessor_config.json`` or
    ``processor_config.json`` and the tokenizer files), e.g. ``openai/clip-vit-large-patch14``.
    Score (Hessel et al., 2021): ``2.5 * max(cos(image, text), 0)``, in [0, 2.5]; multiply by 40
    for torchmetrics' ``100 * max(cos, 0)`` scale. No "A photo depicts" prefix is added.
``pickscore`` -- ``yuvalkirstain/PickScore_v1`` (a ``CLIPModel``) plus the processor files of
    ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``, beside the model or in a ``processor/`` subfolder.
    Score: ``logit_scale.exp() * cos(image, text)``, as in PickScore's official example.
``hpsv2`` / ``hpsv2.1`` -- ``HPS_v2_compressed.pt`` / ``HPS_v2.1_compressed.pt`` (the release's
    torch file holding ``{"state_dict": ...}`` with open_clip key names; a ``.safetensors`` file of
    the same state dict is accepted too), and CLIP BPE tokenizer files: ``tokenizer.json``, or
    ``vocab.json`` + ``merges.txt`` (both as in ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``), or
    open_clip's ``bpe_simple_vocab_16e6.txt.gz``; beside the checkpoint or in ``tokenizer/``.
    Without them, the vocabulary inside an installed ``open_clip`` package is used (read as a
    file; open_clip is not imported). An optional ``open_clip_config.json`` (open_clip's model
    config format) replaces the default ``ViT-H-14`` architecture. Score: ``cos(image, text)`` of
    the normalised open_clip features, exactly what ``hpsv2.score`` returns (its
    ``image_features @ text_features.T``; no logit scale).
``imagereward`` -- ``ImageReward.pt`` (the original state dict, keys ``blip.visual_encoder.*``,
    ``blip.text_encoder.*``, ``mlp.layers.*``; or a ``.safetensors`` file of it),
    ``med_config.json`` (both from ``THUDM/ImageReward``) and a ``bert-base-uncased`` tokenizer
    (``vocab.txt`` and/or ``tokenizer.json``, beside them or in ``tokenizer/``); BLIP's ``[DEC]``
    and ``[ENC]`` tokens are added as ImageReward's ``init_tokenizer`` does. An optional
    ``vision_config.json`` (arguments of BLIP's ``VisionTransformer``: ``image_size``,
    ``patch_size``, ``embed_dim``, ``depth``, ``num_heads``, ``mlp_ratio``) replaces the default
    ViT-L/16 at 224 pixels. Score: ``(mlp(text_encoder(prompt, image)[CLS]) - 0.16717...) / 1.03333...``.

HPS and ImageReward run on transformers' own modules (``CLIPModel``; ``BlipVisionModel`` and
``BlipTextModel``, the BLIP "med" BERT with cross-attention) after a key-by-key conversion of the
original checkpoints that uses every checkpoint tensor and fills every model tensor, so a wrong
mapping fails loudly. Neither open_clip (whose torchvision dependency does not load beside a CPU
build of torch) nor the ``image-reward`` package (broken imports with current transformers) is
needed. Checkpoints are read with ``torch.load(weights_only=True)``: nothing is unpickled beyond
tensors and plain containers.
"""

from __future__ import annotations

import html
import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:
    import PIL.Image
    import torch

DEFAULT_BATCH_SIZE = 16
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
CLIPSCORE_WEIGHT = 2.5
IMAGEREWARD_MEAN = 0.16717362830052426
IMAGEREWARD_STD = 1.0333394966054072
IMAGEREWARD_MAX_TOKENS = 35
IMAGEREWARD_MLP_SIZES = (1024, 128, 64, 16, 1)
# The contrastive projections of BLIP_Pretrain are in ImageReward.pt but unused by the reward.
IMAGEREWARD_UNUSED_PREFIXES = ("blip.vision_proj.", "blip.text_proj.")

# open_clip's model_configs/ViT-H-14.json, the HPS v2 architecture.
VIT_H_14 = {
    "embed_dim": 1024,
    "vision_cfg": {"image_size": 224, "layers": 32, "width": 1280, "head_width": 80, "patch_size": 14},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 1024, "heads": 16, "layers": 24},
}
# BLIP's create_vit("large", 224): ImageReward's image encoder.
BLIP_VIT_LARGE = {"image_size": 224, "patch_size": 16, "embed_dim": 1024, "depth": 24, "num_heads": 16,
                  "mlp_ratio": 4.0}

MODEL_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                      "pytorch_model.bin.index.json")
IMAGE_PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")
CLIP_TOKENIZER_FILES = ("tokenizer.json", "vocab.json")
OPEN_CLIP_BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
BERT_TOKENIZER_FILES = ("tokenizer.json", "vocab.txt")


class RewardWeightsError(FileNotFoundError):
    """A scorer's weights folder is missing or lacks files; names the scorer, path and files."""

    def __init__(self, scorer: str, path: str | Path, expected: str, detail: str = ""):
        self.scorer, self.path, self.expected, self.detail = scorer, str(path), expected, detail
        message = f"{scorer}: no usable weights at {path}"
        if detail:
            message += f" ({detail})"
        message += f". Expected: {expected}"
        super().__init__(message)

    def __reduce__(self):  # picklable (Ray ships exceptions between processes)
        return type(self), (self.scorer, self.path, self.expected, self.detail)


# --------------------------------------------------------------------------- shared helpers


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _resolve_weights(weights: str | Path) -> Path:
    from selma.core.models import resolve_model
    from selma.models.tiny import is_tiny_spec

    if isinstance(weights, str) and is_tiny_spec(weights):
        weights = resolve_model(weights)
    return Path(weights).expanduser()


def _first_existing(folder: Path, names: Sequence[str]) -> Path | None:
    for name in names:
        if (folder / name).is_file():
            return folder / name
    return None


def _as_pil(image) -> "PIL.Image.Image":
    from PIL import Image

    if isinstance(image, Image.Image):
        return image
    if isinstance(image, (str, Path)):
        with Image.open(image) as opened:
            opened.load()
            return opened.copy()
    raise TypeError(f"expected a PIL image or an image path, got {type(image).__name__}")


def load_state_dict_file(path: Path) -> dict[str, "torch.Tensor"]:
    """Tensors of a ``.safetensors`` file, or of a torch file (``weights_only=True``).

    A torch file may hold the state dict itself or wrap it as ``{"state_dict": ...}`` (HPS).
    """
    import torch

    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # an unsafe pickle, a truncated download, not a torch file
        raise ValueError(
            f"cannot read {path} as a weights-only torch checkpoint ({type(error).__name__}: {error}); "
            "arbitrary pickled objects are not loaded: re-save the state dict with torch.save or as .safetensors"
        ) from error
    if isinstance(checkpoint, dict) and isinstance(checkpoint.get("state_dict"), dict):
        checkpoint = checkpoint["state_dict"]
    if not isinstance(checkpoint, dict) or not all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        raise ValueError(f"{path} does not hold a state dict of tensors")
    return dict(checkpoint)


def load_converted_state_dict(model: "torch.nn.Module", state_dict: dict, what: str) -> None:
    """Load ``state_dict`` (float32) into ``model`` built on the meta device; every tensor must match.

    Raises ValueError listing missing keys (model tensors the checkpoint does not fill),
    unexpected keys (checkpoint tensors the model does not use) or shape mismatches.
    """
    import torch

    state_dict = {k: (v.float() if v.is_floating_point() else v).contiguous() for k, v in state_dict.items()}
    expected = dict(model.state_dict())
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    mismatched = [f"{k}: checkpoint {tuple(state_dict[k].shape)} != model {tuple(t.shape)}"
                  for k, t in expected.items() if k in state_dict and tuple(state_dict[k].shape) != tuple(t.shape)]
    if missing or unexpected or mismatched:
        def _head(items):
            return ", ".join(items[:8]) + (f", ... ({len(items)} in all)" if len(items) > 8 else "")

        problems = []
        if missing:
            problems.append(f"missing {_head(missing)}")
        if unexpected:
            problems.append(f"unexpected {_head(unexpected)}")
        if mismatched:
            problems.append(f"shape mismatch {_head(mismatched)}")
        raise ValueError(f"{what}: checkpoint does not match the model architecture: " + "; ".join(problems))
    model.load_state_dict(state_dict, strict=True, assign=True)
    leftover = [name for name, tensor in list(model.named_parameters()) + list(model.named_buffers())
                if tensor.device == torch.device("meta")]
    if leftover:
        raise ValueError(f"{what}: tensors left unset after loading: {', '.join(leftover[:8])}")


def _empty_model(factory):
    """Build a model with parameters on the meta device (no random init); buffers stay real."""
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        return factory()


def _tensor_image(image: "PIL.Image.Image") -> "torch.Tensor":
    """torchvision's ``ToTensor`` for an 8-bit RGB image: float CHW in [0, 1]."""
    import numpy as np
    import torch

    array = np.asarray(image, dtype=np.uint8)
    if array.ndim == 2:
        array = array[:, :, None]
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div(255)


def _normalize(tensor: "torch.Tensor", mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD) -> "torch.Tensor":
    import torch

    mean = torch.tensor(mean, dtype=tensor.dtype).view(-1, 1, 1)
    std = torch.tensor(std, dtype=tensor.dtype).view(-1, 1, 1)
    return (tensor - mean) / std


def clip_resize_center_crop(image: "PIL.Image.Image", size: int) -> "torch.Tensor":
    """CLIP's / ImageReward's ``_transform(size)``, as torchvision computes it on a PIL image.

    ``Resize(size, BICUBIC)`` (shorter side to ``size``, longer side truncated), ``CenterCrop``
    (offsets rounded as torchvision does), then RGB, ``ToTensor`` and ``Normalize``.
    """
    from PIL import Image

    width, height = image.size
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = size, int(size * long / short)
    new_width, new_height = (new_short, new_long) if width <= height else (new_long, new_short)
    if (new_width, new_height) != (width, height):
        image = image.resize((new_width, new_height), Image.Resampling.BICUBIC)
    top = int(round((new_height - size) / 2.0))
    left = int(round((new_width - size) / 2.0))
    image = image.crop((left, top, left + size, top + size))
    return _normalize(_tensor_image(image.convert("RGB")))


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


# --------------------------------------------------------------------------- the scorers


class RewardScorer:
    """Scores image-prompt pairs; higher is better. Subclasses load their model in ``_load``."""

    name: str = ""
    expected_files: str = ""

    def __init__(self, weights: str | Path, *, device: str | None = None, batch_size: int = DEFAULT_BATCH_SIZE):
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.weights = _resolve_weights(weights)
        self.device = device or default_device()
        self.batch_size = batch_size
        self._load()

    def _missing(self, detail: str = "") -> RewardWeightsError:
        return RewardWeightsError(self.name, self.weights, self.expected_files, detail)

    def _folder(self) -> Path:
        if not self.weights.exists():
            raise self._missing("the path does not exist")
        return self.weights if self.weights.is_dir() else self.weights.parent

    def _load(self) -> None:
        raise NotImplementedError

    def _score_batch(self, images: list, prompts: list[str]) -> list[float]:
        raise NotImplementedError

    def score(self, images: Sequence["PIL.Image.Image"], prompts: Sequence[str]) -> list[float]:
        """One float per (image, prompt) pair, in order. Images may also be file paths."""
        import torch

        images, prompts = list(images), list(prompts)
        if len(images) != len(prompts):
            raise ValueError(f"{self.name}: {len(images)} images but {len(prompts)} prompts")
        for prompt in prompts:
            if not isinstance(prompt, str):
                raise TypeError(f"{self.name}: prompts must be strings, got {type(prompt).__name__}")
        scores: list[float] = []
        with torch.inference_mode():
            for start in range(0, len(images), self.batch_size):
                batch = [_as_pil(image) for image in images[start:start + self.batch_size]]
                scores.extend(float(s) for s in self._score_batch(batch, prompts[start:start + self.batch_size]))
        return scores

    def __repr__(self) -> str:
        return f"{type(self).__name__}(weights={str(self.weights)!r}, device={self.device!r})"


def _transformers_major() -> int:
    import transformers

    return int(transformers.__version__.split(".")[0])


class _CLIPModelScorer(RewardScorer):
    """A transformers ``CLIPModel`` folder with its processor files (CLIPScore, PickScore)."""

    expected_files = (
        "a transformers CLIPModel folder: config.json and model.safetensors (or pytorch_model.bin), plus the "
        "processor files (preprocessor_config.json or processor_config.json, tokenizer.json or vocab.json + "
        "merges.txt) beside them or in a processor/ subfolder"
    )

    def _load(self) -> None:
        import torch
        from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

        folder = self.weights
        if not folder.is_dir():
            raise self._missing("not a directory" if folder.exists() else "the path does not exist")
        if not (folder / "config.json").is_file() or _first_existing(folder, MODEL_WEIGHT_FILES) is None:
            raise self._missing("no config.json or model weights")
        processor_dir = folder / "processor" if (folder / "processor").is_dir() else folder
        if (_first_existing(processor_dir, IMAGE_PROCESSOR_FILES) is None
                or _first_existing(processor_dir, CLIP_TOKENIZER_FILES) is None):
            raise self._missing(f"no image processor or tokenizer files in {processor_dir}")
        self.model = CLIPModel.from_pretrained(folder, local_files_only=True).float().eval().to(self.device)
        # The PIL image processor, as the references used (transformers 5 prefers torchvision's).
        backend = {"backend": "pil"} if _transformers_major() >= 5 else {"use_fast": False}
        self.image_processor = AutoImageProcessor.from_pretrained(processor_dir, local_files_only=True, **backend)
        self.tokenizer = AutoTokenizer.from_pretrained(processor_dir, local_files_only=True)
        self.max_length = self.model.config.text_config.max_position_embeddings
        self._torch = torch

    def embeddings(self, images: list, prompts: list[str]) -> tuple["torch.Tensor", "torch.Tensor"]:
        """L2-normalised image and text embeddings (``get_image_features`` / ``get_text_features``)."""
        pixels = self.image_processor(images=images, return_tensors="pt")["pixel_values"].to(self.device)
        text = self.tokenizer(prompts, padding="max_length", truncation=True, max_length=self.max_length,
                              return_tensors="pt").to(self.device)
        image_embeds = self.model.visual_projection(self.model.vision_model(pixel_values=pixels).pooler_output)
        text_embeds = self.model.text_projection(
            self.model.text_model(input_ids=text["input_ids"], attention_mask=text["attention_mask"]).pooler_output
        )
        normalize = self._torch.nn.functional.normalize
        return normalize(image_embeds.float(), dim=-1), normalize(text_embeds.float(), dim=-1)


class CLIPScoreScorer(_CLIPModelScorer):
    """CLIPScore (Hessel et al., 2021): ``2.5 * max(cos(image, text), 0)``."""

    name = "clipscore"
    weight = CLIPSCORE_WEIGHT

    def _score_batch(self, images, prompts):
        image_embeds, text_embeds = self.embeddings(images, prompts)
        cosine = (image_embeds * text_embeds).sum(dim=-1)
        return (self.weight * cosine.clamp(min=0)).tolist()


class PickScoreScorer(_CLIPModelScorer):
    """PickScore (Kirstain et al., 2023): ``logit_scale.exp() * cos(image, text)``."""

    name = "pickscore"

    def _score_batch(self, images, prompts):
        image_embeds, text_embeds = self.embeddings(images, prompts)
        cosine = (image_embeds * text_embeds).sum(dim=-1)
        return (self.model.logit_scale.exp().float() * cosine).tolist()


# --------------------------------------------------------------------------- HPS v2 (open_clip)

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
    import gzip
    import tempfile

    from transformers import CLIPTokenizer

    from selma.models.tiny import bytes_to_unicode

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
    import importlib.util

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


# --------------------------------------------------------------------------- ImageReward (BLIP)


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


# --------------------------------------------------------------------------- registry

REWARD_SCORERS: dict[str, type[RewardScorer]] = {
    "clipscore": CLIPScoreScorer,
    "pickscore": PickScoreScorer,
    "hpsv2": HPSv2Scorer,
    "hpsv2.1": HPSv21Scorer,
    "imagereward": ImageRewardScorer,
}


def load_reward_scorer(name: str, weights: str | Path, *, device: str | None = None,
                       batch_size: int = DEFAULT_BATCH_SIZE) -> RewardScorer:
    """Build the scorer ``name`` from the local weights folder (or ``tiny:`` spec) ``weights``.

    Raises KeyError listing the known scorers for an unknown ``name``, and RewardWeightsError
    (a FileNotFoundError) naming the scorer, the path and the expected files when weights are missing.
    """
    key = name.strip().lower()
    if key not in REWARD_SCORERS:
        raise KeyError(f"unknown reward scorer {name!r}; known scorers: {', '.join(REWARD_SCORERS)}")
    return REWARD_SCORERS[key](weights, device=device, batch_size=batch_size)


def known_scorers() -> list[str]:
    return list(REWARD_SCORERS)


__all__ = [
    "REWARD_SCORERS",
    "RewardScorer",
    "RewardWeightsError",
    "load_reward_scorer",
    "known_scorers",
    "CLIPScoreScorer",
    "PickScoreScorer",
    "HPSv2Scorer",
    "HPSv21Scorer",
    "ImageRewardScorer",
]

