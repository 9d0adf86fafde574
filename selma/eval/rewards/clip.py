"""The transformers ``CLIPModel`` scorers: CLIPScore and PickScore.

Weights folders:

``clipscore`` -- a transformers ``CLIPModel`` folder (``config.json`` + ``model.safetensors`` or
    ``pytorch_model.bin``) with its processor files (``preprocessor_config.json`` or
    ``processor_config.json`` and the tokenizer files), e.g. ``openai/clip-vit-large-patch14``.
    Score (Hessel et al., 2021): ``2.5 * max(cos(image, text), 0)``, in [0, 2.5]; multiply by 40
    for torchmetrics' ``100 * max(cos, 0)`` scale. No "A photo depicts" prefix is added.
``pickscore`` -- ``yuvalkirstain/PickScore_v1`` (a ``CLIPModel``) plus the processor files of
    ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``, beside the model or in a ``processor/`` subfolder.
    Score: ``logit_scale.exp() * cos(image, text)``, as in PickScore's official example.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from selma.eval.rewards.base import CLIP_TOKENIZER_FILES, RewardScorer, _first_existing

if TYPE_CHECKING:
    import torch

# torch and transformers are imported in the functions that use them (cheap import): selma.config loads
# REWARD_SCORERS from this package (tests/eval/test_rewards.py checks that no heavy library loads).

CLIPSCORE_WEIGHT = 2.5
MODEL_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                      "pytorch_model.bin.index.json")
IMAGE_PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")


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
