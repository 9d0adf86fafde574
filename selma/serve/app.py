"""A Ray Serve application speaking the OpenAI Images API for a SELMA run: the base model, the
merged adapter and each expert, side by side on the same replicas.

Two deployments:

* ``ImagesAPI`` — the FastAPI ingress: authentication, validation (prompt lengths in tokens
  included: it holds copies of the pipeline's tokenizers), OpenAI-shaped errors, metrics. Cheap;
  it never touches the model.
* ``ImageModel`` — one diffusion pipeline per replica (``serve.resources`` per replica), with
  autoscaling when ``serve.autoscaling`` is set. The request's ``model`` picks a LoRA adapter through
  ``@serve.multiplexed``: each replica keeps the ``serve.max_loaded_adapters`` most recently used
  adapters loaded (LRU), and Serve routes a request to a replica that already holds its adapter.
  Requests are collected by ``@serve.batch``; inside a batch, requests that agree on adapter,
  steps, guidance, size and negative prompt are drawn by a single pipeline call. If that call fails,
  each of its requests is drawn alone, so a bad request fails by itself.

Endpoints: ``POST /v1/images/generations``, ``GET /v1/models``, ``GET /healthz`` (no auth, no
model call) and ``GET /debug/batching`` (one model replica's batching counters). Metrics go to
Ray's Prometheus endpoint (``selma_image_requests_total``, ``selma_image_request_seconds``,
``selma_images_generated_total``) beside Serve's own.

Images are reproducible: image ``i`` of a request with ``seed`` s is drawn from its own generator
seeded with ``s + i``. Bytes are identical for identical requests drawn in the same batch shape; a
different batch composition can change pixels by float rounding.

    from selma.serve.app import build_app, serve_run
    serve_run(build_app(config.serve, base_model="tiny:sd", adapters={"merged": "runs/x/merged"},
                        default_model="merged", default_steps=50), "127.0.0.1", 8000)

For ``serve run`` / ``serve deploy``: ``selma.serve.run:app_builder`` with ``run_dir`` (and optional
config overrides) as arguments; ``cluster/serve.yaml`` is a Serve config that uses it.

Authentication fails closed (:func:`resolve_api_key`): an app whose ``serve.api_key_env`` names an
unset or empty variable, or that would listen beyond loopback without a key (unless
``serve.allow_unauthenticated``), is refused when it is built.
"""

# No ``from __future__ import annotations``: FastAPI must see the real ``Request`` class on the
# ingress methods, which serve.ingress re-wraps outside this module's namespace.
import asyncio
import base64
import hmac
import ipaddress
import logging
import os
import secrets
import time
from collections import Counter
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from selma.core.config import ImagesConfig
from selma.core.errors import ConfigError
from selma.core.rundir import local_folder
from selma.images.generator import ImageGenerator, default_device, load_adapter, png_bytes

# torch and Ray's metrics/exceptions are imported where used, in the replica and the ingress.

APP_NAME = "selma"
BASE_MODEL_NAME = "base"
MAX_SEED = 2**32 - 1
MAX_GUIDANCE_SCALE = 100.0
MIN_SIZE = 64  # or the native size, if smaller
MAX_SIZE_FACTOR = 2  # largest side: this many times the native size
MAX_BODY_BYTES = 1 << 20
INGRESS_CPUS = 0.1

logger = logging.getLogger("ray.serve")


# --------------------------------------------------------------------------- request and errors


class ImageGenerationRequest(BaseModel):
    """Body of ``POST /v1/images/generations``. Unknown OpenAI fields (quality, style, user, ...)
    are ignored; ``null`` means the default. ``seed``, ``steps``, ``guidance_scale`` and
    ``negative_prompt`` are extensions."""

    model_config = ConfigDict(strict=True, extra="ignore")

    prompt: str
    model: str | None = None
    n: int | None = Field(None, ge=1)
    size: str | None = Field(None, description='"WxH", square only, or "auto" for the native size')
    response_format: str | None = Field(None, description='only "b64_json"')
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    steps: int | None = Field(None, ge=1)
    guidance_scale: float | None = Field(None, ge=0, le=MAX_GUIDANCE_SCALE, allow_inf_nan=False)
    negative_prompt: str | None = None


class ApiError(Exception):
    """An error answered with OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else None
        return JSONResponse(body, status_code=self.status, headers=headers)


def parse_request(raw: bytes) -> ImageGenerationRequest:
    if len(raw) > MAX_BODY_BYTES:
        raise ApiError(413, f"request body larger than {MAX_BODY_BYTES} bytes", code="body_too_large")
    try:
        return ImageGenerationRequest.model_validate_json(raw)
    except ValidationError as err:
        problem = err.errors()[0]
        if problem["type"] == "json_invalid":
            raise ApiError(400, "the request body is not valid JSON", code="invalid_json") from None
        if not problem["loc"]:
            raise ApiError(400, "the request body must be a JSON object", code="invalid_json") from None
        param = ".".join(str(part) for part in problem["loc"])
        code = "missing_required_parameter" if problem["type"] == "missing" else "invalid_value"
        raise ApiError(400, f"{param}: {problem['msg']}", param=param, code=code) from None


@dataclass(frozen=True)
class Limits:
    models: tuple[str, ...]  # what ``model`` may name; the first is the default
    max_prompt_chars: int
    max_images: int
    max_steps: int
    default_steps: int
    guidance_scale: float


@dataclass(frozen=True)
class ImageJob:
    """One request, fully resolved: what the model deployment draws."""

    model: str
    prompt: str
    seeds: tuple[int, ...]
    steps: int
    guidance_scale: float
    size: int
    negative_prompt: str | None

    @property
    def call_key(self) -> tuple:
        """Jobs with equal keys can share one pipeline call."""
        return (self.model, self.steps, self.guidance_scale, self.size, self.negative_prompt)


def parse_size(text: str | None, native: int) -> int:
    if text is None or text == "auto":
        return native
    width, sep, height = text.partition("x")
    if not (sep and width.isdigit() and height.isdigit()):
        raise ApiError(400, f"size must look like '{native}x{native}', got {text!r}", param="size", code="invalid_size")
    if width != height:
        raise ApiError(400, f"only square sizes are supported, got {text!r}", param="size", code="invalid_size")
    side, smallest, largest = int(width), min(MIN_SIZE, native), MAX_SIZE_FACTOR * native
    if side % 8 or not smallest <= side <= largest:
        raise ApiError(400, f"size must be a multiple of 8 between {smallest} and {largest} (native {native}), "
                       f"got {text!r}", param="size", code="invalid_size")
    return side


def resolve_job(request: ImageGenerationRequest, limits: Limits, native: int) -> ImageJob:
    """Check a parsed request against the server's limits and fill in every default."""
    if request.model is not None and request.model not in limits.models:
        raise ApiError(404, f"model {request.model!r} does not exist; this server serves {list(limits.models)}",
                       param="model", code="model_not_found")
    if not request.prompt.strip():
        raise ApiError(400, "prompt must not be empty", param="prompt", code="invalid_value")
    for param, text in (("prompt", request.prompt), ("negative_prompt", request.negative_prompt or "")):
        if len(text) > limits.max_prompt_chars:
            raise ApiError(400, f"{param} is longer than {limits.max_prompt_chars} characters", param=param,
                           code="string_above_max_length")
    if request.response_format not in (None, "b64_json"):
        hint = " (this server does not host image files)" if request.response_format == "url" else ""
        raise ApiError(400, f"response_format {request.response_format!r} is not supported; use 'b64_json'{hint}",
                       param="response_format", code="unsupported_value")
    n = 1 if request.n is None else request.n
    if n > limits.max_images:
        raise ApiError(400, f"n must be between 1 and {limits.max_images}", param="n", code="invalid_value")
    steps = request.steps or limits.default_steps
    if steps > limits.max_steps:
        raise ApiError(400, f"steps must be between 1 and {limits.max_steps}", param="steps", code="invalid_value")
    seed = secrets.randbelow(MAX_SEED + 1) if request.seed is None else request.seed
    return ImageJob(
        model=request.model or limits.models[0],
        prompt=request.prompt,
        seeds=tuple(seed + i for i in range(n)),
        steps=steps,
        guidance_scale=limits.guidance_scale if request.guidance_scale is None else request.guidance_scale,
        size=parse_size(request.size, native),
        negative_prompt=request.negative_prompt or None,
    )


def check_prompt_tokens(job: ImageJob, tokenizers) -> None:
    """Refuse a prompt or negative prompt longer, in tokens, than a text encoder of the pipeline takes.

    The model deployment refuses such prompts too (``ImageGenerator.check_prompt_lengths``, the same
    count with the same tokenizer), but only inside a batch; diffusers silently truncates negative
    prompts. ``tokenizers``: the pipeline's (``tokenizer``, and ``tokenizer_2`` for SDXL).
    """
    for param, text in (("prompt", job.prompt), ("negative_prompt", job.negative_prompt)):
        if not text:
            continue
        for tokenizer in tokenizers:
            limit = tokenizer.model_max_length
            length = len(tokenizer(text, truncation=False, verbose=False).input_ids)
            if length > limit:
                raise ApiError(400, f"{param} is {length} tokens; this model takes at most {limit}", param=param,
                               code="string_above_max_length")


def group_jobs(jobs: list[ImageJob]) -> list[list[int]]:
    """Indices of ``jobs`` grouped by what can share one pipeline call, in first-seen order."""
    groups: dict[tuple, list[int]] = {}
    for index, job in enumerate(jobs):
        groups.setdefault(job.call_key, []).append(index)
    return list(groups.values())


# --------------------------------------------------------------------------- model deployment


class LoadedAdapter:
    """What ``@serve.multiplexed`` caches per model id; evicting it unloads the adapter."""

    def __init__(self, owner: "ImageModel", name: str):
        self.owner, self.name = owner, name

    def __del__(self):
        self.owner.unload_adapter(self.name)


class ImageModel:
    """The model deployment's class; :func:`image_model_deployment` adds the ``@serve.multiplexed``
    adapter cache, whose size is fixed when it is decorated."""

    def __init__(self, *, base_model: str, adapters: dict[str, str], default_steps: int, guidance_scale: float,
                 max_batch_size: int, batch_wait_timeout_s: float, cpus: float, vae: str | None = None):
        import threading

        import torch

        device = default_device()
        if device == "cpu":
            torch.set_num_threads(max(1, int(cpus)))
        settings = ImagesConfig().model_copy(update={"steps": default_steps, "guidance_scale": guidance_scale})
        self.generator = ImageGenerator(base_model, settings, device=device, vae=vae)
        self.adapters = dict(adapters)
        self.loaded: set[str] = set()
        self.active: str | None = None
        # Loading, evicting and drawing all touch the pipeline's adapter layers: one at a time.
        self.pipe_lock = threading.Lock()
        self._generate_batch.set_max_batch_size(max_batch_size)
        self._generate_batch.set_batch_wait_timeout_s(batch_wait_timeout_s)
        self.requests_per_batch: Counter[int] = Counter()
        self.pipeline_calls = 0

    def describe(self) -> dict:
        """What the ingress checks requests against: the native size, and the tokenizers whose
        limits the pipeline enforces (none when the generator truncates long prompts)."""
        pipe = self.generator.pipe
        tokenizers = [] if self.generator.settings.truncate_prompts else [
            tokenizer for tokenizer in (getattr(pipe, "tokenizer", None), getattr(pipe, "tokenizer_2", None))
            if tokenizer is not None]
        return {"native_size": self.generator.resolution, "tokenizers": tokenizers}

    def batching_stats(self) -> dict:
        return {"requests_per_batch": dict(self.requests_per_batch), "batches": sum(self.requests_per_batch.values()),
                "pipeline_calls": self.pipeline_calls, "loaded_adapters": sorted(self.loaded)}

    async def get_adapter(self, model: str) -> LoadedAdapter:
        raise NotImplementedError("image_model_deployment() supplies the multiplexed get_adapter")

    async def open_adapter(self, model: str) -> LoadedAdapter:
        if model != BASE_MODEL_NAME:
            await asyncio.to_thread(self._load_adapter, model)
        return LoadedAdapter(self, model)

    def _load_adapter(self, name: str) -> None:
        with self.pipe_lock:
            self._ensure_loaded(name)

    def _ensure_loaded(self, name: str) -> None:
        """Under pipe_lock."""
        if name not in self.loaded:
            load_adapter(self.generator.pipe, local_folder(self.adapters[name]), name)
            self.loaded.add(name)
            self.active = None

    def unload_adapter(self, name: str) -> None:
        with self.pipe_lock:
            if name in self.loaded:
                self.generator.pipe.delete_adapters([name])
                self.loaded.discard(name)
                self.active = None

    def _activate(self, name: str) -> None:
        """Make ``name`` the pipeline's only active adapter (none for the base model); under pipe_lock."""
        if name == self.active:
            return
        pipe = self.generator.pipe
        if name == BASE_MODEL_NAME:
            if self.loaded:
                pipe.disable_lora()
        else:
            self._ensure_loaded(name)  # it may have been evicted between routing and drawing
            pipe.enable_lora()
            pipe.set_adapters([name])
        self.active = name

    async def generate(self, job: ImageJob) -> list[bytes]:
        """PNG bytes of ``job``'s images."""
        await self.get_adapter(job.model)
        result = await self._generate_batch(job)
        if isinstance(result, Exception):
            raise result
        return result

    # max_batch_size and batch_wait_timeout_s come from the ServeConfig, set in __init__.
    @serve.batch
    async def _generate_batch(self, jobs: list[ImageJob]) -> list[list[bytes] | Exception]:
        self.requests_per_batch[len(jobs)] += 1
        # Off the event loop, so the next batch keeps filling while this one is drawn.
        return await asyncio.to_thread(self._draw, jobs)

    def _draw(self, jobs: list[ImageJob]) -> list[list[bytes] | Exception]:
        """Each job's PNGs, or the exception that job alone failed with."""
        results: list[list[bytes] | Exception] = [None] * len(jobs)
        for indices in group_jobs(jobs):
            for i, outcome in zip(indices, self._draw_group([jobs[i] for i in indices])):
                results[i] = outcome
        return results

    def _draw_group(self, group: list[ImageJob]) -> list[list[bytes] | Exception]:
        """Jobs sharing a ``call_key`` in one pipeline call. If the call fails, each job is drawn
        alone, so one bad request (a prompt the pipeline refuses, an image that is not finite)
        fails by itself and the others get their images."""
        first = group[0]
        self.pipeline_calls += 1
        try:
            with self.pipe_lock:
                try:
                    self._activate(first.model)
                except Exception as err:  # the adapter, not any request, is at fault: no retry
                    return [err] * len(group)
                images = self.generator.generate(
                    [job.prompt for job in group for _ in job.seeds], [seed for job in group for seed in job.seeds],
                    steps=first.steps, guidance_scale=first.guidance_scale, size=first.size,
                    negative_prompt=first.negative_prompt)
            pngs = iter(images)
            return [[png_bytes(next(pngs)) for _ in job.seeds] for job in group]
        except Exception as err:
            if len(group) == 1:
                return [err]
            logger.warning("a pipeline call for %d requests failed (%s: %s); drawing each alone",
                           len(group), type(err).__name__, err)
            return [self._draw_group([job])[0] for job in group]


def image_model_deployment(max_loaded_adapters: int):
    """The ``ImageModel`` deployment keeping ``max_loaded_adapters`` LoRA adapters per replica (LRU)."""
    class MultiplexedImageModel(ImageModel):
        @serve.multiplexed(max_num_models_per_replica=max_loaded_adapters)
        async def get_adapter(self, model: str) -> LoadedAdapter:
            return await self.open_adapter(model)

    return serve.deployment(name="ImageModel")(MultiplexedImageModel)


# --------------------------------------------------------------------------- ingress


api = FastAPI(title="selma", description="OpenAI Images API for a SELMA model")


@api.exception_handler(ApiError)
async def _api_error(_request: Request, err: ApiError) -> JSONResponse:
    return err.response()


@api.exception_handler(RequestValidationError)
async def _validation_error(_request: Request, err: RequestValidationError) -> JSONResponse:
    return ApiError(400, str(err.errors()[:1])).response()


@api.exception_handler(StarletteHTTPException)
async def _http_error(_request: Request, err: StarletteHTTPException) -> JSONResponse:
    return ApiError(err.status_code, str(err.detail)).response()


class RequestMetrics:
    """Counters and a latency histogram, exported through Ray's Prometheus endpoint."""

    def __init__(self):
        from ray.util.metrics import Counter as RayCounter
        from ray.util.metrics import Histogram

        self.requests = RayCounter("selma_image_requests_total", "Image generation requests by model and HTTP status.",
                                   tag_keys=("model", "status"))
        self.images = RayCounter("selma_images_generated_total", "Images returned, by model.", tag_keys=("model",))
        self.latency = Histogram("selma_image_request_seconds", "Latency of successful image requests.",
                                 boundaries=[0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 60, 120], tag_keys=("model",))

    def record(self, model: str, status: int, images: int = 0, seconds: float | None = None) -> None:
        self.requests.inc(tags={"model": model, "status": str(status)})
        if images:
            self.images.inc(images, tags={"model": model})
        if seconds is not None:
            self.latency.observe(seconds, tags={"model": model})


@serve.deployment
@serve.ingress(api)
class ImagesAPI:
    def __init__(self, model, *, limits: Limits, api_key: str | None):
        self.model = model
        self.limits = limits
        self.api_key = api_key
        self.model_info: dict | None = None  # ImageModel.describe(), asked once
        self.model_info_lock = asyncio.Lock()
        self.metrics = RequestMetrics()

    def _authorize(self, request: Request) -> None:
        if self.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
            raise ApiError(401, "missing or invalid API key; send 'Authorization: Bearer <key>'",
                           code="invalid_api_key")

    async def _model_info(self) -> dict:
        async with self.model_info_lock:
            if self.model_info is None:
                self.model_info = await self.model.describe.remote()
        return self.model_info

    @api.post("/v1/images/generations", openapi_extra={"requestBody": {"required": True, "content": {
        "application/json": {"schema": ImageGenerationRequest.model_json_schema()}}}})
    async def generate_images(self, request: Request) -> dict:
        started, model = time.perf_counter(), "unknown"
        try:
            self._authorize(request)
            parsed = parse_request(await request.body())
            info = await self._model_info()
            job = resolve_job(parsed, self.limits, info["native_size"])
            model = job.model
            check_prompt_tokens(job, info["tokenizers"])
            images = await self._generate(job)
        except ApiError as err:
            self.metrics.record(model, err.status)
            raise
        self.metrics.record(model, 200, len(images), time.perf_counter() - started)
        return {"created": int(time.time()),
                "data": [{"b64_json": base64.b64encode(png).decode("ascii")} for png in images]}

    async def _generate(self, job: ImageJob) -> list[bytes]:
        from ray.exceptions import ActorDiedError, ActorUnavailableError
        from ray.serve.exceptions import BackPressureError

        try:
            return await self.model.options(multiplexed_model_id=job.model).generate.remote(job)
        except BackPressureError:
            raise ApiError(503, "the server is overloaded; retry later", type="server_error",
                           code="overloaded") from None
        except (ActorDiedError, ActorUnavailableError):
            raise ApiError(503, "the model replica serving this request stopped; retry", type="server_error",
                           code="replica_unavailable") from None
        except Exception as err:
            logger.exception("image generation failed")
            raise ApiError(500, f"image generation failed: {type(err).__name__}", type="server_error",
                           code="generation_failed") from None

    @api.get("/v1/models")
    async def list_models(self, request: Request) -> dict:
        self._authorize(request)
        return {"object": "list", "data": [
            {"id": name, "object": "model", "created": 0, "owned_by": "selma"} for name in self.limits.models]}

    @api.get("/healthz")
    async def healthz(self) -> dict:
        return {"status": "ok", "models": list(self.limits.models)}

    @api.get("/debug/batching")
    async def batching(self, request: Request) -> dict:
        """Batching counters of whichever model replica answers."""
        self._authorize(request)
        return await self.model.batching_stats.remote()


# --------------------------------------------------------------------------- building and running


def is_loopback(host: str) -> bool:
    """``localhost``, 127.0.0.0/8 or ::1: reachable from this machine only."""
    name = host.strip().strip("[]").lower()
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False  # another host name, "0.0.0.0", "::": reachable from elsewhere


def resolve_api_key(serve_config, host: str | None) -> str | None:
    """The bearer token the app requires (None: none), read here, in the process that builds the app.

    Fails closed (:class:`~selma.config.ConfigError`):

    * ``serve.api_key_env`` names a variable that is unset, empty or blank;
    * no key is configured and ``host`` — where Serve's HTTP proxy listens, ``None`` if that is not
      known here — is not a loopback address, unless ``serve.allow_unauthenticated``.
    """
    name = serve_config.api_key_env
    if name:
        value = os.environ.get(name)
        if value is None or not value.strip():
            state = "not set" if value is None else "empty"
            raise ConfigError(
                f"serve.api_key_env: names the environment variable {name}, which is {state} in the process that "
                f"builds the Serve app; set {name} to the API key clients must send (on Kubernetes: from a Secret), "
                "or drop serve.api_key_env")
        return value.strip()  # a key read from a file often ends in a newline; tokens are compared stripped
    if host is not None and is_loopback(host):
        return None
    if serve_config.allow_unauthenticated:
        logger.warning("serving without an API key on %s (serve.allow_unauthenticated): anyone who can reach it "
                       "can generate images", "an unknown host" if host is None else repr(host))
        return None
    fix = ("set serve.api_key_env to an environment variable holding the key (e.g. serve.api_key_env=SELMA_API_KEY), "
           "or set serve.allow_unauthenticated=true to serve without authentication on purpose")
    if host is None:
        raise ConfigError(
            "serve.api_key_env: not set, and where Serve's HTTP proxy listens is not known where the app is built "
            f"(serve run / serve deploy take it from their own http_options), so it may be reachable by anyone; {fix}")
    raise ConfigError(
        f"serve.host: {host!r} is reachable from other machines (for serve run / serve deploy: their "
        f"http_options.host) and no API key is configured; {fix}, or listen on a loopback address (127.0.0.1)")


_CONFIG_HOST = object()  # build_app's default: serve_config.host


def build_app(serve_config, *, base_model: str, adapters: dict[str, str] | None = None,
              default_model: str = BASE_MODEL_NAME, default_steps: int, guidance_scale: float = 7.5,
              host=_CONFIG_HOST, vae: str | None = None) -> serve.Application:
    """The Serve application for ``base_model`` (with the VAE ``vae`` in place of its own when given)
    and its LoRA ``adapters`` (API name → diffusers-format folder); requests without ``model`` get
    ``default_model``.

    With ``serve_config.api_key_env`` naming an environment variable, every endpoint but
    ``/healthz`` requires ``Bearer <its value>``, read *here* (in the process that builds the app).
    ``host`` is where Serve's HTTP proxy will listen (default ``serve_config.host``; ``None``: not
    known here); see :func:`resolve_api_key` for what is refused (ConfigError).
    """
    adapters = {name: str(path) for name, path in (adapters or {}).items()}
    if BASE_MODEL_NAME in adapters:
        raise ValueError(f"an adapter may not be called {BASE_MODEL_NAME!r}: that names the base model")
    models = [BASE_MODEL_NAME, *adapters]
    if default_model not in models:
        raise ValueError(f"serve.model {default_model!r} is not among the models served: {models}")
    if default_steps > serve_config.max_steps:
        raise ValueError(f"default_steps ({default_steps}) exceeds serve.max_steps ({serve_config.max_steps})")
    api_key = resolve_api_key(serve_config, serve_config.host if host is _CONFIG_HOST else host)
    scaling = serve_config.autoscaling
    replica_options = ({"autoscaling_config": scaling.model_dump()} if scaling is not None
                       else {"num_replicas": serve_config.resources.workers})
    model = image_model_deployment(serve_config.max_loaded_adapters).options(
        **replica_options,
        ray_actor_options=serve_config.resources.ray_options(),
        max_ongoing_requests=serve_config.max_ongoing_requests,
        max_queued_requests=serve_config.max_queued_requests,
    ).bind(
        base_model=base_model,
        adapters=adapters,
        default_steps=default_steps,
        guidance_scale=guidance_scale,
        max_batch_size=serve_config.max_batch_size,
        batch_wait_timeout_s=serve_config.batch_wait_timeout_s,
        cpus=serve_config.resources.cpus,
        vae=vae,
    )
    limits = Limits(
        models=tuple([default_model, *(m for m in models if m != default_model)]),
        max_prompt_chars=serve_config.max_prompt_chars,
        max_images=serve_config.max_images_per_request,
        max_steps=serve_config.max_steps,
        default_steps=default_steps,
        guidance_scale=guidance_scale,
    )
    # The ingress only awaits the model, so it admits more than the model can hold: overload then
    # shows at the model's handle (max_queued_requests → an OpenAI-shaped 503). The proxy's own
    # queue (whose 503 is plain text) only fills beyond twice that; it also counts requests still
    # being assigned, so a burst overflows a queue as small as the model's.
    replicas = scaling.max_replicas if scaling is not None else serve_config.resources.workers
    model_capacity = replicas * serve_config.max_ongoing_requests + serve_config.max_queued_requests
    return ImagesAPI.options(
        ray_actor_options={"num_cpus": INGRESS_CPUS},
        max_ongoing_requests=2 * model_capacity,
        max_queued_requests=2 * model_capacity,
    ).bind(model, limits=limits, api_key=api_key)


def proxy_host() -> str | None:
    """Where Serve's HTTP proxy listens in the Ray cluster this process is connected to; None when
    that is not known here (Ray not initialized, Serve not running, the controller not answering).
    Never starts or connects to Ray."""
    import ray

    if not ray.is_initialized():
        return None
    from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

    try:
        controller = ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
        return ray.get(controller.get_http_config.remote(), timeout=30).host
    except Exception:  # no controller, a dying one, a timeout: unknown, which fails closed
        return None


def _serve_running() -> bool:
    import ray
    from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

    try:
        ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
    except ValueError:
        return False
    return True


def _ensure_port_free(host: str, port: int) -> None:
    """Serve's proxy retries a taken port forever and ``serve.run`` never returns: fail fast instead."""
    import socket

    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            probe.bind((host, port))
        except OSError as err:
            raise RuntimeError(f"cannot serve on {host}:{port}: {err.strerror}") from None


def serve_run(app: serve.Application, host: str, port: int, blocking: bool = True):
    """Start Serve's HTTP proxy on ``host:port`` and deploy ``app`` at ``/``.

    Blocking: serve until interrupted (Ctrl-C / SIGINT), then shut Serve down and return None.
    Otherwise return the ingress handle and leave ``serve.shutdown()`` to the caller.
    """
    if not _serve_running():
        _ensure_port_free(host, port)
    # If Serve already runs in this cluster, its proxy keeps its own host and port (Serve only warns).
    serve.start(http_options={"host": host, "port": port})
    if not blocking:
        return serve.run(app, name=APP_NAME, route_prefix="/")
    try:
        # serve.run may still be waiting for the app to report RUNNING while the proxy already
        # answers, so an interrupt can land inside it too.
        serve.run(app, name=APP_NAME, route_prefix="/")
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()
    return None
