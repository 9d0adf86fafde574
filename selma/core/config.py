"""The schema of a selma run's config: one pydantic model per section, field checks, presets,
``key.sub=value`` overrides and ``extends:``.

:mod:`selma.config` builds on it (``load_config``), adding the checks that need the registries of
skills, merge methods and reward scorers. An invalid value raises :class:`ConfigError` naming the
field.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any, ClassVar, Iterator, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError, to_jsonable_python

from selma.core.errors import ConfigError
from selma.core.expert_steps import parse_select

PRESETS_DIR = Path(__file__).parent.parent / "configs"
DEFAULT_SKILLS = ["coco", "localized_narratives", "countbench", "whoops", "diffusiondb"]
LORA_TARGET_MODULES = ["to_q", "to_k", "to_v", "to_out.0"]


REPLACED_KEY_ERROR = "replaced_key"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)
    # Fields added after runs were recorded: left out of the stage hash while they hold their
    # default, so those runs' committed stages stay current.
    hash_omits_default: ClassVar[frozenset[str]] = frozenset()
    # Fields that never change what a stage writes (tracking, logging, pacing): left out of every
    # hash. In a nested section (prompts.openai) such a field is hashed at its default instead, so
    # the hashes recorded while it was still hashed stay valid for runs that left it at its default;
    # one that is also in hash_omits_default is left out.
    unhashed: ClassVar[frozenset[str]] = frozenset()
    # Fields renamed, old name → new: refused in a config naming the new one, read in the run.json
    # of runs made before, and hashed under the old name so those runs stay committed.
    renamed_keys: ClassVar[dict[str, str]] = {}

    # The compute keys the section had before ``resources``, old key → field of Resources: refused
    # in a config, read in the run.json of runs made before.
    replaced_keys: ClassVar[dict[str, str]] = {}
    # The fields of ``resources`` that change what the stage writes, so stay in its hash.
    hashed_resources: ClassVar[frozenset[str]] = frozenset()

    @model_validator(mode="before")
    @classmethod
    def _refuse_replaced_keys(cls, data: Any) -> Any:
        if isinstance(data, dict):
            replaced = {old: f"resources.{new}" for old, new in cls.replaced_keys.items() if old in data}
            replaced.update({old: new for old, new in cls.renamed_keys.items() if old in data})
            if replaced:
                raise PydanticCustomError(REPLACED_KEY_ERROR, "keys replaced: {replaced}",
                                          {"replaced": replaced})
        return data


class Resources(_Section):
    """What a stage runs on: how many workers, and what each one asks Ray for."""

    workers: int = Field(1, ge=1, description="actors, LLM engines or clients, trainer workers, or model replicas")
    cpus: float = Field(1, gt=0, description="CPUs per worker; a CPU worker also runs this many torch threads")
    gpus: float = Field(0, ge=0, description="GPUs per worker; 0 runs on CPUs")
    custom: dict[str, float] = Field(
        default_factory=dict, description="custom Ray resources per worker, e.g. {gpu_node: 1} to pin it to a node type")
    accelerator_type: str | None = Field(None, description="Ray accelerator type each worker needs, e.g. A100 or H100")

    @property
    def cpu_threads(self) -> int | None:
        """torch threads of a CPU worker (its whole CPUs, at least one); None for a GPU worker."""
        return None if self.gpus else max(1, int(self.cpus))

    def describe(self) -> str:
        """e.g. ``2 workers × (1 CPU, 1 GPU A100, gpu_node 1)``."""
        each = [f"{self.cpus:g} CPU"] + ([f"{self.gpus:g} GPU"] if self.gpus else [])
        if self.accelerator_type:
            each[-1] += f" {self.accelerator_type}"
        each += [f"{name} {amount:g}" for name, amount in sorted(self.custom.items())]
        return f"{self.workers} worker{'s' if self.workers != 1 else ''} × ({', '.join(each)})"

    def ray_options(self) -> dict[str, Any]:
        """One worker's options for ``ray.remote``, Ray Data's ``map_batches`` and Serve's
        ``ray_actor_options``."""
        options: dict[str, Any] = {"num_cpus": self.cpus}
        if self.gpus:
            options["num_gpus"] = self.gpus
        if self.custom:
            options["resources"] = dict(self.custom)
        if self.accelerator_type:
            options["accelerator_type"] = self.accelerator_type
        return options

    def per_worker(self) -> dict[str, float]:
        """One worker's resources as Ray names them (``CPU``, ``GPU``, custom): Ray Train's
        ``resources_per_worker``, a placement group bundle."""
        return {"CPU": self.cpus, **({"GPU": self.gpus} if self.gpus else {}), **self.custom}

    def scaling_config(self):
        """Ray Train's ``ScalingConfig`` for these workers."""
        from ray.train import ScalingConfig

        return ScalingConfig(num_workers=self.workers, use_gpu=bool(self.gpus),
                             resources_per_worker=self.per_worker(), accelerator_type=self.accelerator_type)

    def total(self) -> dict[str, float]:
        """What all the workers hold together."""
        return {"CPU": self.workers * self.cpus, "GPU": self.workers * self.gpus,
                **{name: self.workers * amount for name, amount in self.custom.items()}}


_ACTOR_KEYS = {"num_actors": "workers", "gpus_per_actor": "gpus", "cpus_per_actor": "cpus"}


class SkillsConfig(_Section):
    names: list[str] = Field(default_factory=lambda: list(DEFAULT_SKILLS), min_length=1)
    seeds_per_skill: int = Field(3, ge=1, description="seed prompts that start each skill's pool")
    files: list[str] = Field(default_factory=list, description="YAML files defining extra skills")

    @field_validator("names")
    @classmethod
    def _unique(cls, names: list[str]) -> list[str]:
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"skill names repeat: {duplicates}")
        return names


class OpenAIEndpointConfig(_Section):
    """An OpenAI-compatible server (OpenAI, vLLM's ``vllm serve``, TGI, llama.cpp, ...)."""

    base_url: str | None = Field(None, description="e.g. http://llm:8000/v1 (the /completions path is added)")
    api: Literal["completions", "chat"] = Field(
        "completions", description="completions continues the numbered list as-is; chat asks for the numbered list in "
                                   "a user message and reads the answer's numbered lines")
    api_key_env: str = Field("OPENAI_API_KEY", description="environment variable holding the key (sent if set)")
    qps: int | None = Field(None, ge=1, description="requests per second per worker; None: no limit")
    tpm: int | None = Field(
        None, ge=1, description="tokens per minute per worker (prompt + completion): each request is charged its "
                                "prompt estimate + max_tokens before it is sent, corrected by the usage it reports; "
                                "None: no limit")
    max_retries: int = Field(3, ge=0, description="retries with exponential back-off on 429/5xx/timeouts")
    retry_wait_s: float = Field(1.0, gt=0, description="first back-off wait; doubles per retry")

    # Pacing only: the completions do not depend on it.
    unhashed = frozenset({"qps", "tpm"})
    hash_omits_default = frozenset({"tpm"})

    @field_validator("base_url")
    @classmethod
    def _http(cls, url: str | None) -> str | None:
        if url is not None and not url.startswith(("http://", "https://")):
            raise ValueError(f"must start with http:// or https:// (got {url!r})")
        return url.rstrip("/") if url else url


class LLMConfig(_Section):
    """An LLM backend: what the prompt stage and DSG question generation run on."""

    replaced_keys = {"concurrency": "workers", "gpus_per_worker": "gpus", "cpus_per_worker": "cpus"}

    backend: Literal["template", "transformers", "vllm", "openai"] = Field(
        "template", description="template: offline phrase generator for demos and tests, not an LLM")
    model: str | None = Field(None, description="LLM path or hub id (the model name sent to an openai endpoint)")
    temperature: float = Field(1.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    max_tokens: int = Field(1024, ge=16)
    seed: int = 0
    sampling_params: dict[str, Any] = Field(
        default_factory=dict, description="vllm/openai: extra sampling parameters (stop, repetition_penalty, ...)")
    batch_size: int = Field(16, ge=1, description="requests per LLM batch")
    resources: Resources = Field(
        default_factory=Resources, description="workers: vLLM engines, transformers model actors or HTTP clients")
    engine_kwargs: dict[str, Any] = Field(default_factory=dict, description="vllm: extra vllm.LLM engine arguments")
    openai: OpenAIEndpointConfig = Field(default_factory=OpenAIEndpointConfig)

    @model_validator(mode="after")
    def _backend_settings(self) -> "LLMConfig":
        if self.backend in ("transformers", "vllm", "openai") and not self.model:
            raise ValueError(f"backend {self.backend!r} needs model (an LLM path or hub id)")
        if self.backend == "openai" and not self.openai.base_url:
            raise ValueError("backend 'openai' needs openai.base_url (e.g. http://host:8000/v1)")
        return self


class PricingConfig(_Section):
    """What the LLM costs per token, to report each skill's cost (prompts.pricing)."""

    prompt_per_1m: float = Field(..., ge=0, description="price of a million prompt (input) tokens")
    completion_per_1m: float = Field(..., ge=0, description="price of a million completion (output) tokens")
    currency: str = Field("USD", min_length=1)


class PromptsConfig(LLMConfig):
    # chat was added after runs were recorded: hashed only when set off its default (auto).
    hash_omits_default = frozenset({"chat"})
    unhashed = frozenset({"pricing"})

    chat: Literal["auto", True, False] = Field(
        "auto", description="vllm/transformers: send each request through the model's chat template as a user "
                            "message asking for the numbered list; auto: when the model has one; true: require one; "
                            "false: a plain continuation prompt (openai: set openai.api)")
    pricing: PricingConfig | None = Field(
        None, description="e.g. {prompt_per_1m: 0.15, completion_per_1m: 0.6, currency: USD}: report each skill's "
                          "cost beside its token usage; None: no cost")
    per_skill: int = Field(1000, ge=1, description="accepted LLM prompts per skill")
    examples_per_request: int = Field(3, ge=1)
    candidates_per_request: int = Field(20, ge=1)
    requests_per_round: int = Field(8, ge=1, description="LLM requests per skill per round")
    rounds_in_flight: int = Field(
        1, ge=1, description="rounds per skill sent before the previous ones are filtered; 1 is the paper's loop")
    max_rounds: int = Field(1000, ge=1, description="give up on a skill after this many rounds")
    rouge_threshold: float = Field(0.8, gt=0, le=1)

    @model_validator(mode="after")
    def _chat_fits_the_backend(self) -> "PromptsConfig":
        if self.backend == "template" and self.chat is True:
            raise ValueError("chat: true needs an LLM with a chat template; the template backend has none")
        if self.backend == "openai" and self.chat is not (self.openai.api == "chat") and self.chat != "auto":
            raise ValueError(f"chat: {str(self.chat).lower()} contradicts openai.api: {self.openai.api} (the openai "
                             "backend sends chat messages exactly when openai.api is chat; leave chat at auto)")
        return self

    @model_validator(mode="after")
    def _cap_batch_size(self) -> "PromptsConfig":
        if self.batch_size > self.requests_per_round:
            # A batch waits until it is full, and a skill's next round waits for this one.
            self.batch_size = self.requests_per_round
        return self


class ImagesConfig(_Section):
    replaced_keys = {**_ACTOR_KEYS, "resources_per_actor": "custom"}

    model: str | None = Field(None, description="generating model; defaults to the top-level model")
    steps: int = Field(50, ge=1, le=1000)
    guidance_scale: float = Field(7.5, ge=0)
    resolution: int | None = Field(None, ge=8, description="None: the pipeline's native size")
    images_per_prompt: int = Field(1, ge=1)
    negative_prompt: str | None = None
    batch_size: int = Field(4, ge=1)
    resources: Resources = Field(default_factory=Resources, description="workers: generator actors")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    channels_last: bool = False
    compile: bool = Field(False, description="torch.compile the UNet (pays off on GPUs for long runs)")
    vae_slicing: bool = False
    vae_tiling: bool = False
    max_error_rate: float = Field(0.05, ge=0, le=1)
    seed: int = 0
    truncate_prompts: bool = Field(
        False, description="let the text encoder cut prompts longer than it takes, marking their rows "
                           "prompt_truncated; false: such a prompt's images fail (recorded in errors/images)")

    hash_omits_default = frozenset({"truncate_prompts"})
    renamed_keys = {"truncate_long_prompts": "truncate_prompts"}

    @field_validator("resolution")
    @classmethod
    def _multiple_of_8(cls, value: int | None) -> int | None:
        if value is not None and value % 8:
            raise ValueError(f"must be a multiple of 8, got {value}")
        return value


JOINT_EXPERT = "joint"

TRACKING_SETTINGS = {"mlflow": ("tracking_uri", "experiment_name"), "tensorboard": ("log_dir",),
                     "wandb": ("project", "entity", "mode")}


class TrackingConfig(_Section):
    """Where the train stage logs each expert's metrics (and validation images): one tracking run
    per expert, named ``<run name>/<expert>``."""

    backend: Literal["mlflow", "tensorboard", "wandb"]
    tracking_uri: str | None = Field(
        None, description="mlflow: a server (http://host:5000), sqlite:///mlflow.db or a folder; None: RUN/_work/mlflow")
    experiment_name: str | None = Field(None, description="mlflow: None: the run's name")
    log_dir: str | None = Field(None, description="tensorboard: None: RUN/_work/tensorboard")
    project: str | None = Field(None, description="wandb: None: the run's name")
    entity: str | None = Field(None, description="wandb: team or user; None: the API key's default")
    mode: Literal["online", "offline"] = Field("online", description="wandb: offline writes locally for `wandb sync`")

    @field_validator("tracking_uri", "log_dir")
    @classmethod
    def _absolute_folder(cls, value: str | None) -> str | None:
        # The workers run in Ray's session folders: a relative folder means one relative to here.
        if value is None or re.match(r"^[A-Za-z][\w+.-]*:", value):
            return value
        return str(Path(value).expanduser().resolve())

    @model_validator(mode="before")
    @classmethod
    def _backend_name_alone(cls, data: Any) -> Any:
        return {"backend": data} if isinstance(data, str) else data

    @model_validator(mode="after")
    def _own_settings_only(self) -> "TrackingConfig":
        foreign = sorted(name for backend, names in TRACKING_SETTINGS.items() if backend != self.backend
                         for name in names if not _is_default(self, name))
        if foreign:
            raise ValueError(f"{foreign} are not settings of backend {self.backend!r} "
                             f"(its settings: {list(TRACKING_SETTINGS[self.backend])})")
        return self


class TrainConfig(_Section):
    replaced_keys = {"num_workers": "workers", "use_gpu": "gpus", "cpus_per_worker": "cpus",
                     "resources_per_worker": "custom"}
    # Each worker trains on its own shard, and the gradient accumulation follows the worker count.
    hashed_resources = frozenset({"workers"})
    # Training ignores ``select`` (the merge stage hashes it: MergeStage.sections); tracking and
    # validation images read the training state and never change it; gradient checkpointing
    # recomputes the same activations (so it can be switched on to resume a run that ran out of memory).
    unhashed = frozenset({"select", "tracking", "validate_every", "validation_prompts", "validation_steps",
                          "gradient_checkpointing"})

    mode: Literal["experts", "joint"] = Field(
        "experts", description="experts: one LoRA per skill (SELMA); joint: one LoRA on all skills' data (the paper's baseline)")
    rank: int = Field(128, ge=1)
    alpha: float = Field(128, gt=0)
    init_lora_weights: Literal["gaussian", "default"] = "gaussian"
    target_modules: list[str] = Field(default_factory=lambda: list(LORA_TARGET_MODULES), min_length=1)
    learning_rate: float = Field(3e-4, gt=0)
    adam_beta1: float = Field(0.9, ge=0, lt=1)
    adam_beta2: float = Field(0.999, ge=0, lt=1)
    adam_epsilon: float = Field(1e-8, gt=0)
    weight_decay: float = Field(1e-2, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    batch_size: int = Field(16, ge=1, description="micro-batch per worker")
    effective_batch_size: int = Field(64, ge=1)
    max_steps: int = Field(5000, ge=1)
    resolution: int | None = Field(None, ge=8, description="None: the model's native size")
    random_flip: bool = True
    random_crop: bool = True
    mixed_precision: Literal["no", "fp16", "bf16"] = "bf16"
    strategy: Literal["deepspeed", "ddp"] = "deepspeed"
    zero_stage: int = Field(2, ge=0, le=3)
    resources: Resources = Field(default_factory=lambda: Resources(gpus=1),
                                 description="each expert's Ray Train workers (data parallel)")
    data_cpus: float = Field(1, gt=0, description="CPUs per Ray Data task that decodes and tokenises")
    data_workers: int = Field(4, ge=1, description="concurrent Ray Data preprocessing tasks per expert")
    checkpoint_every: int = Field(
        500, ge=1, description="steps between checkpoints: Ray Train's (for resuming) and the expert's LoRA at "
                               "that step, in experts/<name>/checkpoints/step-<N>/")
    select: str = Field(
        "last", description="which step of each expert the merge stage merges: last (the final experts) or step:N "
                            "(the checkpoint at step N: a multiple of checkpoint_every, or max_steps)")
    max_concurrent_experts: int | None = Field(
        None, ge=1, description="experts training at once; None: as many as the cluster's resources hold, the rest queue")
    max_failures: int = Field(2, ge=0)
    seed: int = 0
    tracking: TrackingConfig | None = Field(
        None, description="log each expert's loss, lr, samples/s and grad norm (and validation images) to "
                          "mlflow, tensorboard or wandb; None: off")
    validate_every: int | None = Field(
        None, ge=1, description="draw validation images with the LoRA being trained every this many steps and "
                                "at the last, into experts/<name>/validation/; None: off")
    validation_prompts: int = Field(4, ge=1, description="validation images: the expert's skill's first prompts by prompt_id")
    validation_steps: int | None = Field(None, ge=1, description="validation images' denoising steps; None: images.steps")
    cache_latents: bool = Field(
        False, description="encode each image once through the frozen VAE and text encoder(s), before the experts "
                           "train, into RUN/cache/<key>/ (key: model, resolution, precision and the images; reused "
                           "by every expert, by joint mode and across --restart train), and train from that: the VAE "
                           "latent distribution is stored and sampled every step as without the cache; a flip is "
                           "picked per sample from both cached variants (random_flip); the crop is the centre crop, "
                           "fixed at cache time (random_crop is not applied; a no-op for square images of the "
                           "training size, such as the images stage draws)")

    @field_validator("select", mode="before")
    @classmethod
    def _select(cls, value: Any) -> str:
        parse_select(value)
        return value
    optimizer: Literal["adamw", "adamw_8bit"] = Field(
        "adamw", description="adamw: torch AdamW (the paper); adamw_8bit: bitsandbytes' 8-bit AdamW (pip install 'selma[bnb]')")
    lr_scheduler: Literal["constant", "constant_with_warmup", "linear", "cosine"] = Field(
        "constant", description="diffusers' get_scheduler schedule, counted in optimizer steps up to max_steps "
                                "(the paper: constant)")
    lr_warmup_steps: int = Field(0, ge=0, description="optimizer steps of linear warm-up from 0 (not with constant)")
    snr_gamma: float | None = Field(
        None, gt=0, description="Min-SNR-γ loss weighting (Hang et al. 2023; 5.0 is usual); None: plain MSE (the paper)")
    noise_offset: float = Field(0.0, ge=0, description="adds offset × one normal draw per sample and channel to the "
                                                       "noise (e.g. 0.05-0.1); 0: plain noise (the paper)")
    gradient_checkpointing: bool = Field(
        False, description="recompute the UNet's activations in the backward pass: less memory, more time per step")

    # Recipe options added after runs were recorded: at their defaults (the paper's recipe) they
    # leave the hash of those runs unchanged.
    hash_omits_default = frozenset({"optimizer", "lr_scheduler", "lr_warmup_steps", "snr_gamma", "noise_offset",
                                    "cache_latents"})

    @model_validator(mode="after")
    def _batch_fits(self) -> "TrainConfig":
        per_step = self.batch_size * self.resources.workers
        if self.effective_batch_size % per_step:
            raise ValueError(
                f"effective_batch_size ({self.effective_batch_size}) must be a multiple of "
                f"batch_size × resources.workers ({per_step})"
            )
        if self.strategy == "deepspeed" and self.mixed_precision == "fp16" and not self.resources.gpus:
            raise ValueError("mixed_precision fp16 needs a GPU (resources.gpus); use bf16 or no on CPU")
        if self.validate_every and self.strategy == "deepspeed" and self.zero_stage == 3:
            raise ValueError("validate_every: validation images are not drawn under zero_stage 3 (the LoRA "
                             "weights are partitioned across workers); use zero_stage 2 or strategy ddp")
        if self.lr_warmup_steps and self.lr_scheduler == "constant":
            raise ValueError("lr_warmup_steps: the constant schedule has no warm-up; use lr_scheduler constant_with_warmup")
        if self.lr_warmup_steps >= self.max_steps:
            raise ValueError(f"lr_warmup_steps ({self.lr_warmup_steps}) must be less than max_steps ({self.max_steps})")
        return self

    @property
    def gradient_accumulation_steps(self) -> int:
        return self.effective_batch_size // (self.batch_size * self.resources.workers)


class MergeConfig(_Section):
    method: str = "delta_mean"
    weights: dict[str, float] | None = Field(None, description="per-expert weights; default 1/N")
    normalize: bool = Field(True, description="normalise the weights to sum 1 (a mean); false: use them as given")
    options: dict[str, Any] = Field(default_factory=dict,
                                    description="method options, e.g. {density: 0.5, seed: 0, rank: 64}")
    fused_pipeline: bool = Field(False, description="also save the base pipeline with the merge fused in (merged/fused)")


class ServeAutoscalingConfig(_Section):
    """Ray Serve's ``autoscaling_config`` for the model deployment."""

    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(2, ge=1)
    target_ongoing_requests: float = Field(4, gt=0)
    upscale_delay_s: float = Field(30, ge=0)
    downscale_delay_s: float = Field(600, ge=0)

    @model_validator(mode="after")
    def _ordered(self) -> "ServeAutoscalingConfig":
        if self.min_replicas > self.max_replicas:
            raise ValueError("min_replicas must not exceed max_replicas")
        return self


class ServeConfig(_Section):
    replaced_keys = {"num_replicas": "workers", "gpus_per_replica": "gpus", "cpus_per_replica": "cpus"}

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    model: str = Field("merged", description="default model of requests without one: base, merged or expert-<name>")
    max_batch_size: int = Field(4, ge=1)
    batch_wait_timeout_s: float = Field(0.05, ge=0)
    resources: Resources = Field(
        default_factory=Resources, description="workers: model replicas when autoscaling is not set")
    autoscaling: ServeAutoscalingConfig | None = None
    max_loaded_adapters: int = Field(4, ge=1, description="LoRA adapters kept loaded per replica (LRU)")
    max_ongoing_requests: int = Field(8, ge=1)
    max_queued_requests: int = Field(64, ge=1)
    default_steps: int | None = Field(None, ge=1, description="None: images.steps")
    max_steps: int = Field(100, ge=1)
    max_images_per_request: int = Field(4, ge=1)
    max_prompt_chars: int = Field(2000, ge=1)
    api_key_env: str | None = Field(
        None, description="env var holding the bearer token every endpoint but /healthz requires; "
                          "named but unset or empty: the app refuses to start")
    allow_unauthenticated: bool = Field(
        False, description="serve without an API key on a non-loopback host (else refused: set api_key_env)")

    @model_validator(mode="after")
    def _batching_possible(self) -> "ServeConfig":
        if self.max_ongoing_requests < self.max_batch_size:
            raise ValueError("max_ongoing_requests must be at least max_batch_size, else batches stay small")
        return self


class QuestionLLMConfig(LLMConfig):
    """The LLM that writes DSG questions (tuples, dependencies, questions) for prompts without them."""

    backend: Literal["transformers", "vllm", "openai"] = "transformers"
    temperature: float = Field(0.0, ge=0)
    max_tokens: int = Field(512, ge=16)


class VQAConfig(_Section):
    replaced_keys = _ACTOR_KEYS

    backend: Literal["transformers", "vqascore", "vllm", "world"] = Field(
        "transformers", description="transformers: free-form answers; vqascore: P(yes); vllm: vLLM multimodal; "
                                    "world: the shapes world's exact evaluator (no model)")
    model: str | None = Field(None, description="a local image-text-to-text checkpoint folder, e.g. InstructBLIP or "
                                                "Llava (tiny:vlm: a random stand-in)")
    batch_size: int = Field(8, ge=1, description="(image, question) pairs per forward pass")
    max_new_tokens: int = Field(16, ge=1)
    prompt_template: str | None = Field(None, description="e.g. 'Question: {question} Answer:'; None: the model's chat template")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    resources: Resources = Field(default_factory=Resources, description="workers: VQA actors the questions are sharded across")
    engine_kwargs: dict[str, Any] = Field(default_factory=dict, description="vllm: extra vllm.LLM engine arguments")


class EvalConfig(_Section):
    replaced_keys = _ACTOR_KEYS

    models: list[str] = Field(
        default_factory=lambda: ["base", "merged"],
        description="base, merged, expert-<name>, experts (every expert), or a LoRA folder: PATH or NAME=PATH")
    benchmarks: list[Literal["dsg", "tifa", "prompts", "world"]] = Field(
        default_factory=lambda: ["dsg"], min_length=1,
        description="prompts: your own prompt file, questions written by eval.questions; world: held-out shapes-world captions")
    world_kinds: list[Literal["single", "counting", "binding", "spatial", "multi"]] = Field(
        default_factory=lambda: ["counting", "binding", "spatial"], min_length=1)
    world_prompts_per_kind: int = Field(100, ge=1, description="held-out captions per kind (the test split)")
    dsg_annotations: str | None = Field(None, description="DSG-1K's dsg-1k-anns.csv (github.com/j-min/DSG)")
    tifa_prompts: str | None = Field(None, description="TIFA v1.0's tifa_v1.0_text_inputs.json (github.com/Yushi-Hu/tifa)")
    tifa_questions: str | None = Field(
        None, description="tifa_v1.0_question_answers.json (TIFA release format); None: DSG questions written by eval.questions")
    prompts_file: str | None = Field(None, description="benchmark 'prompts': a .txt (one per line), .jsonl or .csv with a prompt column")
    answer_encoder: str | None = Field(
        None, description="sentence-embedding model folder that maps free-form answers to the nearest TIFA choice")
    questions: QuestionLLMConfig | None = Field(None, description="the LLM that writes DSG questions for new prompts")
    vqa: VQAConfig = Field(default_factory=VQAConfig)
    rewards: dict[str, str] = Field(
        default_factory=dict, description="reward scorer -> local weights (clipscore, pickscore, hpsv2, hpsv2.1, imagereward)")
    limit: int | None = Field(None, ge=1, description="evaluate a seeded random sample of this many prompts per benchmark")
    sample_seed: int = 0
    images_per_prompt: int = Field(1, ge=1)
    seed: int = Field(0, description="image seeds derive from it and the prompt, identical for every model")
    steps: int | None = Field(None, ge=1, description="None: images.steps")
    batch_size: int = Field(4, ge=1, description="images per generation batch")
    resources: Resources = Field(default_factory=Resources, description="workers: image generation actors per model")

    @field_validator("models")
    @classmethod
    def _models(cls, models: list[str]) -> list[str]:
        if not models:
            raise ValueError("name at least one model")
        if len(set(models)) != len(models):
            raise ValueError(f"models repeat: {models}")
        return models


class RayConfig(_Section):
    address: str | None = Field(None, description="None: join RAY_ADDRESS if set, else start a local Ray")
    num_cpus: int | None = Field(None, ge=1, description="for a local Ray only")
    runtime_env: dict[str, Any] = Field(default_factory=dict)


class SelmaConfig(_Section):
    name: str = Field("selma", min_length=1)
    model: str = Field(..., description="the text-to-image model to improve (path, hub id or tiny:sd)")
    vae: str | None = Field(
        None, description="an AutoencoderKL (folder or hub id, safetensors weights) to use in place of the model's own "
                          "VAE wherever `model` is loaded (images, train, eval, serve, fused pipeline), e.g. "
                          "madebyollin/sdxl-vae-fp16-fix; not for images.model when that is another model")
    run_dir: str | None = Field(None, description="local path or URI; default runs/<name>")
    skills: SkillsConfig = Field(default_factory=SkillsConfig)
    prompts: PromptsConfig = Field(default_factory=PromptsConfig)
    images: ImagesConfig = Field(default_factory=ImagesConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    merge: MergeConfig = Field(default_factory=MergeConfig)
    serve: ServeConfig = Field(default_factory=ServeConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    ray: RayConfig = Field(default_factory=RayConfig)

    hash_omits_default = frozenset({"vae"})

    @property
    def expert_names(self) -> list[str]:
        """The adapters the train stage writes under ``experts/``: one per skill, or ``joint``."""
        return [JOINT_EXPERT] if self.train.mode == "joint" else list(self.skills.names)

    @property
    def image_model(self) -> str:
        """The model that draws the training images (weak-to-strong: may differ from ``model``)."""
        return self.images.model or self.model

    @property
    def image_vae(self) -> str | None:
        """The VAE override for :attr:`image_model`: ``vae``, unless the images come from another
        model (a VAE fits one model family's latents)."""
        return self.vae if self.image_model == self.model else None

    def resolved_run_dir(self) -> str:
        return self.run_dir or str(Path("runs") / self.name)

    def section_hash(self, *sections: str, pin_unhashed: bool = True) -> str:
        """A stable hash of the named sections, used to tell whether a committed stage is stale.
        Resources are left out (they change where a stage runs, not what it writes) but for the
        fields a section names in ``hashed_resources``. ``pin_unhashed=False``: the ``unhashed``
        fields of nested sections as set, as selma hashed them before they were unhashed."""
        data = self.model_dump(mode="json")
        for path, section in resource_sections(SelmaConfig):
            node = _node(data, path)
            if node is not None:
                hashed = {k: v for k, v in node.pop("resources").items() if k in section.hashed_resources}
                if hashed:
                    node["resources"] = hashed
        return _hash(self._without_new_defaults(data, sections, pin_unhashed))

    def legacy_section_hash(self, *sections: str) -> str:
        """:meth:`section_hash` as it was before ``resources`` replaced each section's compute keys,
        which it hashed with the rest: what run directories written then recorded."""
        return _hash(self._without_new_defaults(legacy_layout(self.model_dump(mode="json")), sections, False))

    def _without_new_defaults(self, data: dict, sections: tuple[str, ...], pin_unhashed: bool = True) -> dict:
        """``sections`` of ``data`` less the ``unhashed`` fields and the fields added after runs
        were recorded while they hold their default (``hash_omits_default``, also on the top level
        and in nested sections); renamed fields under their old names.

        A dotted name (``train.select``) hashes that one field, and only when it is not its
        default: a stage that depends on one field of another section names it that way."""
        hashed = {}
        for name in sections:
            owner_path, _, field = name.rpartition(".")
            owner = self
            for part in filter(None, owner_path.split(".")):
                owner = getattr(owner, part)
            value = getattr(owner, field)
            if (owner_path or field in type(self).hash_omits_default) and _is_default(owner, field):
                continue
            node = _node(data, tuple(name.split(".")[:-1])) if owner_path else data
            hashed[name] = node[field]
            if isinstance(value, _Section):
                _strip_unhashed(value, hashed[name], nested=bool(owner_path), pin_unhashed=pin_unhashed)
        return hashed

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def _strip_unhashed(section: _Section, data: dict, *, nested: bool, pin_unhashed: bool) -> None:
    """``data`` (``section`` dumped, changed in place) as its stage hash takes it, nested sections too:
    see ``_Section.unhashed``, ``hash_omits_default`` and ``renamed_keys``."""
    for name in section.unhashed:
        if not nested or name in section.hash_omits_default:
            data.pop(name, None)
        elif pin_unhashed:
            default = type(section).model_fields[name].get_default(call_default_factory=True)
            data[name] = to_jsonable_python(default)
    for name in section.hash_omits_default - section.unhashed:
        if _is_default(section, name):
            data.pop(name, None)
    for old, new in section.renamed_keys.items():
        if new in data:
            data[old] = data.pop(new)
    for name in type(section).model_fields:
        inner = getattr(section, name)
        if isinstance(inner, _Section) and isinstance(data.get(name), dict):
            _strip_unhashed(inner, data[name], nested=True, pin_unhashed=pin_unhashed)


def _is_default(owner: BaseModel, field: str) -> bool:
    return getattr(owner, field) == type(owner).model_fields[field].get_default(call_default_factory=True)


def _hash(data: dict) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def resource_sections(model: type[BaseModel], path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], type[_Section]]]:
    """(path, class) of every section under ``model`` with a ``resources`` field, e.g.
    (("eval", "vqa"), VQAConfig)."""
    for name, field in model.model_fields.items():
        for member in (field.annotation, *get_args(field.annotation)):
            if isinstance(member, type) and issubclass(member, _Section) and member is not Resources:
                if "resources" in member.model_fields:
                    yield (*path, name), member
                yield from resource_sections(member, (*path, name))


def _node(data: dict, path: tuple[str, ...]) -> dict | None:
    for part in path:
        data = data.get(part) if isinstance(data, dict) else None
    return data if isinstance(data, dict) else None


def legacy_layout(data: dict) -> dict:
    """``data`` (a config as a dict, changed in place) as it was laid out before ``resources``: each
    section's resources moved back into the keys they replaced."""
    for path, section in resource_sections(SelmaConfig):
        node = _node(data, path)
        if node is not None:
            legacy_section(node, section)
    return data


def legacy_section(node: dict, section: type[_Section]) -> dict:
    """One section's dict (changed in place) in the layout before ``resources``. What the old keys
    could not say (``accelerator_type``; ``custom`` where there was no such key) is dropped."""
    resources = node.pop("resources")
    for old, new in section.replaced_keys.items():
        # train.use_gpu meant one GPU per worker.
        node[old] = resources[new] > 0 if old == "use_gpu" else resources[new]
    return node


def sections_under(model: type[BaseModel], path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], type[_Section]]]:
    """(path, class) of every section under ``model``, e.g. (("prompts", "openai"), OpenAIEndpointConfig)."""
    for name, field in model.model_fields.items():
        for member in (field.annotation, *get_args(field.annotation)):
            if isinstance(member, type) and issubclass(member, _Section):
                yield (*path, name), member
                yield from sections_under(member, (*path, name))


def upgrade_recorded_config(data: dict) -> dict:
    """A config recorded in run.json before ``resources`` or a rename (changed in place) in today's
    layout; a config the user writes is refused with the old keys instead."""
    for path, section in sections_under(SelmaConfig):
        node = _node(data, path) or {}
        for old in [key for key in section.renamed_keys if key in node]:
            node.setdefault(section.renamed_keys[old], node.pop(old))
    for path, section in resource_sections(SelmaConfig):
        node = _node(data, path) or {}
        for old in [key for key in section.replaced_keys if key in node]:
            value = node.pop(old)
            # train.use_gpu meant one GPU per worker.
            node.setdefault("resources", {})[section.replaced_keys[old]] = int(bool(value)) if old == "use_gpu" else value
    return data


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))


def parse_override(text: str) -> tuple[list[str], Any]:
    """``images.steps=20`` → (["images", "steps"], 20); the value is parsed as YAML."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {text!r} is not of the form key.sub=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as err:
        raise ConfigError(f"override {key}: value {raw!r} is not valid YAML: {err}") from None
    return key.strip().split("."), value


def apply_override(data: dict, path: list[str], value: Any) -> None:
    node = data
    for depth, part in enumerate(path[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {'.'.join(path)}: {'.'.join(path[: depth + 1])} is not a section")
        node = child
    node[path[-1]] = value


def _read_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    return data


def _deep_merge(base: dict, update: dict) -> dict:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def load_raw(source: str, _seen: tuple[str, ...] = ()) -> dict:
    """Read a preset name or YAML path into a dict, following ``extends: <preset or path>``."""
    path = Path(source)
    if not path.suffix and (PRESETS_DIR / f"{source}.yaml").exists():
        path = PRESETS_DIR / f"{source}.yaml"
    if not path.exists():
        raise ConfigError(f"config {source!r} is neither a file nor a preset (presets: {', '.join(preset_names())})")
    if str(path.resolve()) in _seen:
        raise ConfigError(f"config {source!r} extends itself")
    data = _read_yaml(path)
    parent = data.pop("extends", None)
    if parent:
        data = _deep_merge(load_raw(str(parent), _seen + (str(path.resolve()),)), data)
    return data


def format_validation_error(err: ValidationError) -> str:
    lines = []
    for problem in err.errors():
        field = ".".join(str(p) for p in problem["loc"]) or "(top level)"
        if problem["type"] == REPLACED_KEY_ERROR:
            lines += [f"{field}.{old}: replaced by {field}.{new}" for old, new in problem["ctx"]["replaced"].items()]
            continue
        message = problem["msg"]
        if problem["type"] == "extra_forbidden":
            message = "unknown field"
        shown = problem.get("input")
        suffix = f" (got {shown!r})" if shown is not None and problem["type"] != "missing" and not isinstance(shown, dict) else ""
        lines.append(f"{field}: {message}{suffix}")
    if len(lines) == 1:
        return lines[0]
    return f"invalid config, {len(lines)} problems:\n" + "\n".join(f"  {line}" for line in lines)


def validate_schema(data: dict) -> SelmaConfig:
    """``data`` as a :class:`SelmaConfig`, checked field by field (``selma.config.build_config``
    adds the checks against the skill, merge-method and reward registries)."""
    try:
        return SelmaConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err)) from None
