"""Tiny, randomly initialised vision-language models for the VQA tests.

* ``build_tiny_vlm``: a Llava-style ``LlavaForConditionalGeneration`` (tiny CLIP vision tower,
  tiny Llama language model with head_dim 64 as vLLM on CPU needs) and its ``LlavaProcessor``
  with a chat template that places the image before the question.
* ``build_tiny_blip2``: a ``Blip2ForConditionalGeneration`` (tiny BLIP-2 vision tower, Q-Former
  and OPT language model) and its ``Blip2Processor``; no chat template, as BLIP-2 has none.

Both are saved with ``save_pretrained`` so ``AutoProcessor`` / ``AutoModelForImageTextToText``
load them like real checkpoints. vLLM (CPU build) runs the BLIP-2; its Llava module needs
torchvision, which the CPU vLLM environment lacks. Tokenizers are trained locally (see
``selma.models.tiny.build_lm_tokenizer``); nothing touches a model hub. Building is seeded.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import AddedToken
from transformers import (
    Blip2Config,
    Blip2ForConditionalGeneration,
    Blip2Processor,
    Blip2QFormerConfig,
    Blip2VisionConfig,
    CLIPVisionConfig,
    GenerationConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    OPTConfig,
)
from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from selma.models.tiny import build_lm_tokenizer, corpus_words, name_generic_tokenizer_class, tiny_llama_config

IMAGE_TOKEN = "<image>"
IMAGE_SIZE = 32
PATCH_SIZE = 8
BLIP2_QUERY_TOKENS = 4
# Words of VQA prompts and answers, so that e.g. "Yes" and " yes" are single tokens as in real vocabularies.
VQA_WORDS = ["yes", "Yes", "No", "Question", "Answer", "Please", "answer", "question", "user", "assistant"]

# Like many real templates this one writes the BOS token although the tokenizer adds one too
# (transformers' apply_chat_template(tokenize=True) then tokenizes without special tokens).
# Message content is either a string or a list of parts ({"type": "image"} / {"type": "text", ...}).
VLM_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{ message['role'] }}: "
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image>\n{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}{{ eos_token }}\n"
    "{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}"
)


def _tokenizer_with_image_token():
    """The tiny LM tokenizer (plus VQA words) with ``<image>`` as a special token (one id, never split)."""
    tokenizer = build_lm_tokenizer(corpus_words() + VQA_WORDS)
    tokenizer.add_tokens([AddedToken(IMAGE_TOKEN, special=True, normalized=False)], special_tokens=True)
    return tokenizer


def _generation_config(tokenizer):
    return GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def _save(model, processor, out_dir: str | Path) -> Path:
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir, safe_serialization=True)
    processor.save_pretrained(out_dir)
    name_generic_tokenizer_class(out_dir / "tokenizer_config.json")
    return out_dir


def build_tiny_vlm(out_dir: str | Path, seed: int = 0) -> Path:
    """Save a tiny random Llava (32 px images, 16 image tokens) and its processor to ``out_dir``."""
    tokenizer = _tokenizer_with_image_token()
    tokenizer.chat_template = VLM_CHAT_TEMPLATE  # one template for the tokenizer and the processor
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    vision_config = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,  # Llava reads the second-to-last layer
        num_attention_heads=2,
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
        projection_dim=32,
    )
    # "default" drops the CLS feature: (32 / 8)² = 16 image tokens per image.
    image_seq_length = (IMAGE_SIZE // PATCH_SIZE) ** 2
    config = LlavaConfig(
        vision_config=vision_config,
        text_config=tiny_llama_config(tokenizer),
        image_token_index=image_token_id,
        image_seq_length=image_seq_length,
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    model.generation_config = _generation_config(tokenizer)
    # Saved as "CLIPImageProcessor": the torchvision-backed class where torchvision is installed,
    # its PIL twin (same outputs) where it is not.
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLS
        chat_template=VLM_CHAT_TEMPLATE,
        image_token=IMAGE_TOKEN,
    )
    return _save(model, processor, out_dir)


def build_tiny_blip2(out_dir: str | Path, seed: int = 0) -> Path:
    """Save a tiny random BLIP-2 (32 px images, 4 query tokens, OPT language model) and its processor."""
    tokenizer = _tokenizer_with_image_token()
    tokenizer.chat_template = None  # BLIP-2 takes a plain "Question: ... Answer:" prompt
    vision_config = Blip2VisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
    )
    qformer_config = Blip2QFormerConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        encoder_hidden_size=vision_config.hidden_size,
        cross_attention_frequency=1,
        max_position_embeddings=64,
        vocab_size=len(tokenizer),
    )
    text_config = OPTConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,  # head_dim 64, as vLLM's CPU attention needs
        word_embed_proj_dim=128,
        ffn_dim=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    config = Blip2Config(
        vision_config=vision_config,
        qformer_config=qformer_config,
        text_config=text_config,
        num_query_tokens=BLIP2_QUERY_TOKENS,
        image_text_hidden_size=32,
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
    )
    torch.manual_seed(seed)
    model = Blip2ForConditionalGeneration(config).eval()
    model.generation_config = _generation_config(tokenizer)
    image_processor = BlipImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    processor = Blip2Processor(
        image_processor=image_processor, tokenizer=tokenizer, num_query_tokens=BLIP2_QUERY_TOKENS
    )
    return _save(model, processor, out_dir)
