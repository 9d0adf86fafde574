"""Tiny, randomly initialised but complete models for tests and the CPU demo.

The pipelines are saved with ``save_pretrained`` so they load through the same
``DiffusionPipeline.from_pretrained(path)`` path as real checkpoints. Tokenizers are
trained locally on a small built-in English word list: nothing touches a model hub.

``resolve_model("tiny:sd")`` (:mod:`selma.core.models`, through :func:`resolve_tiny`) builds a
model once into ``$SELMA_CACHE/models`` (default ``~/.cache/selma/models``) and returns its path.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

from selma.core.models import build_once, cache_dir

# tokenizers, transformers, torch and diffusers are imported in the builders (cheap import): resolving a
# tiny: spec that is already built, and the reward scorers that selma.config loads, import this module
# (tests/models/test_tiny.py::test_import_is_light); the vLLM environment has no diffusers at all.

TINY_PREFIX = "tiny:"
PIPELINE_FAMILIES = ("sd", "sdxl")
CACHE_VERSION = "v1"
DEFAULT_RESOLUTION = 64
# Tiny models that are not text-to-image pipelines: family -> "module:function(out_dir)".
# Evaluation models live in their own modules so that building one imports only what it needs.
TINY_MODELS = {
    "lm": "selma.models.tiny:build_tiny_lm",
    "vlm": "selma.models.tiny_vlm:build_tiny_vlm",  # image-text-to-text (Llava-style)
    "blip2": "selma.models.tiny_vlm:build_tiny_blip2",
    "clip": "selma.models.tiny_scorers:build_tiny_clip",  # CLIPModel + processor (CLIPScore, PickScore)
    "hps": "selma.models.tiny_scorers:build_tiny_hps",
    "imagereward": "selma.models.tiny_scorers:build_tiny_imagereward",
    "sbert": "selma.models.tiny_scorers:build_tiny_sentence_encoder",
}
MAX_PROMPT_TOKENS = 77

CLIP_BOS = "<|startoftext|>"
CLIP_EOS = "<|endoftext|>"
END_OF_WORD = "</w>"

LM_BOS, LM_EOS, LM_PAD, LM_UNK = "<s>", "</s>", "<pad>", "<unk>"
LM_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ message['role'] }}: {{ message['content'] }}{{ eos_token }}\n"
    "{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}"
)

# Words of typical text-to-image prompts; each becomes a single token.
_SINGULAR_NOUNS = """
apple bag ball banana bed bench bicycle bird boat book bottle bowl box bridge building bus cake
candle car carrot castle chair cheese clock cloud computer cup door donut egg field flower fork
garden guitar hat heart house kite knife lamp laptop mirror moon mountain phone pillow pizza plate
plane rocket road robot sandwich shirt shoe sofa spoon star street suitcase table toy train tree
truck umbrella vase wall window airplane motorcycle helmet backpack surfboard skateboard frisbee
racket bat cat dog horse cow elephant bear zebra giraffe lion tiger monkey rabbit fox wolf duck
chicken owl shark whale dolphin frog snake turtle butterfly bee penguin panda squirrel pig goat
camel circle square triangle rectangle cube sphere cone cylinder line dot shape boy girl baby
player chef teacher doctor astronaut king queen friend painting photo drawing picture image scene
""".split()
_IRREGULAR_PLURALS = "men women children people mice sheep fish knives glasses".split()
_OTHER_WORDS = """
man woman child person family group pair couple crowd
zero one two three four five six seven eight nine ten eleven twelve hundred first second third
red green blue yellow orange purple pink brown black white gray grey golden silver colorful
left right above below next to behind front of on under over near beside between top bottom
inside outside around across along middle center corner side up down far close
photograph sketch illustration watercolor oil cartoon anime realistic abstract digital art style
portrait landscape render pixel vintage surreal minimalist detailed cinematic lighting high
quality sharp focus background foreground view closeup
is are was were be has have had sitting standing running walking eating drinking holding
playing flying swimming sleeping jumping riding reading looking wearing carrying smiling cooking
dancing singing driving sits stands runs holds looks made
a an the and or with in at by for from this that there it its their his her some many few
several all no not very small large big tiny huge tall short long old new young happy sad
beautiful bright dark wooden metal plastic shiny fluffy round empty full open closed sunny rainy
snowy night day morning evening water snow grass sand fire ice light shadow sky sun beach ocean
lake river city forest park kitchen room floor
""".split()


def _plural(noun: str) -> str:
    if noun.endswith(("s", "x", "ch", "sh")):
        return noun + "es"
    if noun.endswith("y") and noun[-2] not in "aeiou":
        return noun[:-1] + "ies"
    return noun + "s"


def corpus_words() -> list[str]:
    """The built-in word list, deduplicated, in a fixed order."""
    words = _SINGULAR_NOUNS + [_plural(noun) for noun in _SINGULAR_NOUNS] + _IRREGULAR_PLURALS + _OTHER_WORDS
    return list(dict.fromkeys(words))


# --------------------------------------------------------------------------- tokenizers


def bytes_to_unicode() -> dict[int, str]:
    """CLIP's / GPT-2's reversible map from bytes to printable unicode characters."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1)
    )
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def _train_merges(tokenizer, words: list[str], **trainer_options) -> list[tuple[str, str]]:
    """Train BPE on ``words`` (no vocab cap: every word ends up a single token); return the merges."""
    from tokenizers import pre_tokenizers, trainers

    trainer = trainers.BpeTrainer(
        vocab_size=100_000,
        min_frequency=1,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        **trainer_options,
    )
    tokenizer.train_from_iterator(words, trainer=trainer)
    merges = json.loads(tokenizer.to_str())["model"]["merges"]
    return [tuple(merge.split(" ")) if isinstance(merge, str) else tuple(merge) for merge in merges]


def train_clip_bpe(words: list[str] | None = None) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A CLIP-style BPE vocabulary and merges trained on ``words`` (default: the built-in list).

    The vocabulary is laid out like CLIP's: the 256 byte characters, the same with ``</w>``,
    one token per merge, then ``<|startoftext|>`` and ``<|endoftext|>``; so any text
    tokenizes without unknown tokens.
    """
    from tokenizers import Regex, Tokenizer, normalizers, pre_tokenizers
    from tokenizers.models import BPE

    # Same normalisation and pre-tokenisation as transformers' CLIPTokenizer.
    tokenizer = Tokenizer(BPE(continuing_subword_prefix="", end_of_word_suffix=END_OF_WORD))
    tokenizer.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(
            Regex(r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""),
            behavior="removed",
            invert=True,
        ),
        pre_tokenizers.ByteLevel(add_prefix_space=False),
    ])
    byte_chars = list(bytes_to_unicode().values())
    word_final_chars = [char + END_OF_WORD for char in byte_chars]
    # The trainer numbers "x</w>" symbols in hash-map order as it meets them, and breaks ties
    # between equally frequent pairs by those numbers: the merges then differ from process to
    # process. Declaring them up front (as special tokens) fixes their numbers.
    merges = _train_merges(
        tokenizer, words or corpus_words(), end_of_word_suffix=END_OF_WORD, special_tokens=word_final_chars
    )
    tokens = byte_chars + word_final_chars + ["".join(merge) for merge in merges]
    tokens += [CLIP_BOS, CLIP_EOS]
    vocab: dict[str, int] = {}
    for token in tokens:
        vocab.setdefault(token, len(vocab))
    return vocab, merges


def build_clip_tokenizer(words: list[str] | None = None, model_max_length: int = MAX_PROMPT_TOKENS):
    """A ``CLIPTokenizer`` over a BPE trained on ``words`` (each becomes a single token)."""
    from transformers import CLIPTokenizer

    vocab, merges = train_clip_bpe(words)
    # transformers 5 ignores vocab_file/merges_file here: pass the dict and the tuples.
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length)


def write_clip_vocab_files(tokenizer_dir: Path) -> None:
    """Add CLIP's ``vocab.json`` and ``merges.txt`` beside ``tokenizer.json``.

    transformers 5 saves only ``tokenizer.json``; the slow ``CLIPTokenizer`` of transformers 4
    and other CLIP tooling read the two classic files.
    """
    model = json.loads((tokenizer_dir / "tokenizer.json").read_text(encoding="utf-8"))["model"]
    merges = [merge.split(" ") if isinstance(merge, str) else merge for merge in model["merges"]]
    (tokenizer_dir / "vocab.json").write_text(json.dumps(model["vocab"], ensure_ascii=False), encoding="utf-8")
    lines = ["#version: 0.2"] + [" ".join(merge) for merge in merges]
    (tokenizer_dir / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")


def build_lm_tokenizer(words: list[str] | None = None):
    """A byte-level BPE ``PreTrainedTokenizerFast`` with bos/eos/pad/unk and a chat template."""
    from tokenizers import Tokenizer, decoders, pre_tokenizers, processors
    from tokenizers.models import BPE
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(BPE(unk_token=LM_UNK))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    words = words or corpus_words()
    # Words as they appear inside sentences (" red") and at the start of one ("red").
    text = words + [" " + word for word in words] + [".", ",", ":", "\n", "'s"]
    _train_merges(tokenizer, text, special_tokens=[LM_UNK, LM_BOS, LM_EOS, LM_PAD])
    bos_id = tokenizer.token_to_id(LM_BOS)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{LM_BOS} $A", pair=f"{LM_BOS} $A {LM_BOS} $B", special_tokens=[(LM_BOS, bos_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=LM_BOS,
        eos_token=LM_EOS,
        pad_token=LM_PAD,
        unk_token=LM_UNK,
        chat_template=LM_CHAT_TEMPLATE,
        model_max_length=2048,
    )


# --------------------------------------------------------------------------- diffusion pipelines


def _clip_text_config(tokenizer, *, hidden_size: int = 32, projection_dim: int = 32):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=MAX_PROMPT_TOKENS,
        projection_dim=projection_dim,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def _tiny_vae(resolution: int, seed: int):
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        latent_channels=4,
        sample_size=resolution,
    )


def _vae_scale_factor(vae) -> int:
    return 2 ** (len(vae.config.block_out_channels) - 1)


def _sd_like_scheduler_config() -> dict:
    return dict(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="epsilon",
        steps_offset=1,
        timestep_spacing="leading",
    )


TINY_UNET_BLOCKS = dict(
    in_channels=4,
    out_channels=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(32, 64),
    layers_per_block=1,
    attention_head_dim=(2, 4),
)


def _tiny_sd_pipeline(resolution: int, seed: int):
    import torch
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    tokenizer = build_clip_tokenizer()
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(_clip_text_config(tokenizer, hidden_size=32))
    vae = _tiny_vae(resolution, seed)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=resolution // _vae_scale_factor(vae),
        **TINY_UNET_BLOCKS,
        cross_attention_dim=text_encoder.config.hidden_size,
    )
    scheduler = DDIMScheduler(**_sd_like_scheduler_config(), clip_sample=False, set_alpha_to_one=False)
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def _tiny_sdxl_pipeline(resolution: int, seed: int):
    import torch
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    tokenizer = build_clip_tokenizer()
    tokenizer_2 = build_clip_tokenizer()
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(_clip_text_config(tokenizer, hidden_size=32))
    torch.manual_seed(seed)
    text_encoder_2 = CLIPTextModelWithProjection(_clip_text_config(tokenizer_2, hidden_size=32, projection_dim=32))
    vae = _tiny_vae(resolution, seed)
    addition_time_embed_dim = 8
    torch.manual_seed(seed)
    # SDXL conditions on the penultimate hidden states of both encoders, concatenated, and on
    # the pooled projection of the second plus six micro-conditioning numbers.
    unet = UNet2DConditionModel(
        sample_size=resolution // _vae_scale_factor(vae),
        **TINY_UNET_BLOCKS,
        use_linear_projection=True,
        transformer_layers_per_block=(1, 2),
        cross_attention_dim=text_encoder.config.hidden_size + text_encoder_2.config.hidden_size,
        addition_embed_type="text_time",
        addition_time_embed_dim=addition_time_embed_dim,
        projection_class_embeddings_input_dim=6 * addition_time_embed_dim + text_encoder_2.config.projection_dim,
    )
    scheduler = EulerDiscreteScheduler(**_sd_like_scheduler_config(), interpolation_type="linear")
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=scheduler,
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )


def build_tiny_pipeline(out_dir: str | Path, family: str = "sd", resolution: int = DEFAULT_RESOLUTION,
                        seed: int = 0) -> Path:
    """Save a tiny random ``family`` ("sd" or "sdxl") pipeline whose default output is ``resolution``²."""
    if family not in PIPELINE_FAMILIES:
        raise ValueError(f"unknown tiny pipeline family {family!r}; expected one of {PIPELINE_FAMILIES}")
    if resolution <= 0 or resolution % 8:
        raise ValueError(f"resolution must be a positive multiple of 8, got {resolution}")
    builder = _tiny_sd_pipeline if family == "sd" else _tiny_sdxl_pipeline
    pipe = builder(resolution, seed)
    out_dir = Path(out_dir)
    pipe.save_pretrained(out_dir, safe_serialization=True)
    for tokenizer_dir in (out_dir / "tokenizer", out_dir / "tokenizer_2"):
        if tokenizer_dir.is_dir():
            write_clip_vocab_files(tokenizer_dir)
    return out_dir


# --------------------------------------------------------------------------- language model


def tiny_llama_config(tokenizer, **extra):
    """A 2-layer ``LlamaConfig`` for ``tokenizer`` (head_dim 64, as vLLM on CPU needs)."""
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=2, head_dim=64, max_position_embeddings=2048,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id, **extra)


def build_tiny_lm(out_dir: str | Path, seed: int = 0) -> Path:
    """Save a tiny random ``LlamaForCausalLM`` (head_dim 64, as vLLM on CPU needs) and its tokenizer."""
    import torch
    from transformers import GenerationConfig, LlamaForCausalLM

    tokenizer = build_lm_tokenizer()
    config = tiny_llama_config(tokenizer, tie_word_embeddings=True)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    name_generic_tokenizer_class(out_dir / "tokenizer_config.json")
    return out_dir


def name_generic_tokenizer_class(config_file: Path) -> None:
    # transformers 5 records "TokenizersBackend", a class transformers 4 does not know;
    # "PreTrainedTokenizerFast" loads the same tokenizer.json in both.
    config = json.loads(config_file.read_text(encoding="utf-8"))
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_file.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


# --------------------------------------------------------------------------- specs and cache


def is_tiny_spec(spec: str) -> bool:
    return isinstance(spec, str) and spec.startswith(TINY_PREFIX)


def parse_tiny_spec(spec: str) -> tuple[str, int | None]:
    """``tiny:sd@128`` -> ("sd", 128); ``tiny:lm`` -> ("lm", None); pipelines default to 64."""
    if not is_tiny_spec(spec):
        raise ValueError(f"not a tiny model spec: {spec!r}")
    family, _, resolution_text = spec[len(TINY_PREFIX):].partition("@")
    if family in TINY_MODELS:
        if resolution_text:
            raise ValueError(f"tiny:{family} takes no resolution: {spec!r}")
        return family, None
    if family not in PIPELINE_FAMILIES:
        known = ", ".join(f"tiny:{f}" for f in (*PIPELINE_FAMILIES, *TINY_MODELS))
        raise ValueError(f"unknown tiny model {spec!r}; expected one of {known} (pipelines take a size: tiny:sd@128)")
    if not resolution_text:
        return family, DEFAULT_RESOLUTION
    if not resolution_text.isdigit():
        raise ValueError(f"bad resolution in {spec!r}")
    return family, int(resolution_text)


def tiny_model_name(spec: str) -> str:
    family, resolution = parse_tiny_spec(spec)
    size = "" if resolution is None else f"-{resolution}"
    return f"tiny-{family}{size}-{CACHE_VERSION}"


def _build_tiny(spec: str, out_dir: Path) -> None:
    family, resolution = parse_tiny_spec(spec)
    if family in TINY_MODELS:
        module, function = TINY_MODELS[family].split(":")
        getattr(importlib.import_module(module), function)(out_dir)
    else:
        build_tiny_pipeline(out_dir, family=family, resolution=resolution)


def resolve_tiny(spec: str) -> str:
    """The local folder of tiny model ``spec`` (``tiny:sd@128``, ``tiny:lm``, ...), built once into the
    cache (registered for the ``tiny:`` prefix of :func:`selma.core.models.resolve_model`).

    Safe when several processes resolve the same spec at once: each builds into its own
    temporary folder next to the target and renames it into place; losers discard theirs.
    """
    target = build_once(cache_dir() / "models" / tiny_model_name(spec), lambda folder: _build_tiny(spec, folder))
    return str(target)
