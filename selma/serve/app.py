"""A Ray Serve application speaking the OpenAI Images API for the base or the merged SELMA model.

Two deployments:

* ``ImagesAPI`` — the FastAPI ingress: authentication, validation, OpenAI-shaped errors. Cheap;
  it never touches the model.
* ``ImageModel`` — one diffusion pipeline per replica (``num_gpus=gpus_per_replica``). Requests
  are collected by ``@serve.batch``; inside a batch, requests that agree on steps, guidance, size
  and negative prompt are drawn by a single pipeline call.

Endpoints: ``POST /v1/images/generations``, ``GET /v1/models``, ``GET /healthz`` (no auth, no
model call) and ``GET /debug/batching`` (one model replica's batching counters).

The LoRA is fused into the UNet weights at start-up and then unloaded, so serving costs exactly
what the base model costs. Images are reproducible: image ``i`` of a request with ``seed`` s is
drawn from its own generator seeded with ``s + i``. Bytes are identical for identical requests
drawn in the same batch shape; a different batch composition can change pixels by float rounding.

    from selma.serve.app import build_app, serve_run
    serve_run(build_app(config.serve, base_model="tiny:sd", lora_dir="runs/x/merged",
                        default_steps=50), "127.0.0.1", 8000)
"""

# No ``from __future__ import annotations``: FastAPI must see the real ``Request`` class on the
# ingress methods, which serve.ingress re-wraps outside this module's namespace.
import asyncio
import base64
import hmac
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

APP_NAME = "selma"
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
    model_name: str
    max_prompt_chars: int
    max_images: int
    max_steps: int
    default_steps: int
    guidance_scale: float


@dataclass(frozen=True)
class ImageJob:
    """One request, fully resolved: what the model deployment draws."""

    prompt: str
    seeds: tuple[int, ...]
    steps: int
    guidance_scale: float
    size: int
    negative_prompt: str | None

    @property
    def call_key(self) -> tuple:
        """Jobs with equal keys can share one pipeline call."""
        return (self.steps, self.guidance_scale, self.size, self.negative_prompt)


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
    if request.model not in (None, limits.model_name):
        raise ApiError(404, f"model {request.model!r} does not exist; this server serves {limits.model_name!r}",
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
        prompt=request.prompt,
        seeds=tuple(seed + i for i in range(n)),
        steps=steps,
        guidance_scale=limits.guidance_scale if request.guidance_scale is None else request.guidance_scale,
        size=parse_size(request.size, native),
        negative_prompt=request.negative_prompt or None,
    )


def group_jobs(jobs: list[ImageJob]) -> list[list[int]]:
    """Indices of ``jobs`` grouped by what can share one pipeline call, in first-seen order."""
    groups: dict[tuple, list[int]] = {}
    for index, job in enumerate(jobs):
        groups.setdefault(job.call_key, []).append(index)
    return list(groups.values())


# --------------------------------------------------------------------------- model deployment


def load_lora_fused(pipe, lora_dir: str) -> None:
    """Load a diffusers-format LoRA, fuse it into the weights and drop the adapter layers."""
    pipe.load_lora_weights(lora_dir)
    # load_lora_weights only warns when no key matches (e.g. a raw peft folder): refuse instead.
    if not any(pipe.get_list_adapters().values()):
        raise RuntimeError(f"no LoRA weights in {lora_dir} match the pipeline's modules")
    pipe.fuse_lora()
    pipe.unload_lora_weights()


@serve.deployment
class ImageModel:
    def __init__(self, *, base_model: str, lora_dir: str | None, default_steps: int, guidance_scale: float,
                 max_batch_size: int, batch_wait_timeout_s: float, cpus: float):
        import torch

        from selma.images.generator import GenerationSettings, ImageGenerator, default_device

        device = default_device()
        if device == "cpu":
            torch.set_num_threads(max(1, int(cpus)))
        settings = GenerationSettings(steps=default_steps, guidance_scale=guidance_scale)
        self.generator = ImageGenerator(base_model, settings, device=device)
        if lora_dir:
            load_lora_fused(self.generator.pipe, lora_dir)
        self._generate_batch.set_max_batch_size(max_batch_size)
        self._generate_batch.set_batch_wait_timeout_s(batch_wait_timeout_s)
        self.requests_per_batch: Counter[int] = Counter()
        self.pipeline_calls = 0

    def describe(self) -> dict:
        return {"native_size": self.generator.resolution}

    def batching_stats(self) -> dict:
        return {"requests_per_batch": dict(self.requests_per_batch), "batches": sum(self.requests_per_batch.values()),
                "pipeline_calls": self.pipeline_calls}

    async def generate(self, job: ImageJob) -> list[bytes]:
        """PNG bytes of ``job``'s images."""
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
        from selma.images.generator import png_bytes

        results: list[list[bytes] | Exception] = [None] * len(jobs)
        for indices in group_jobs(jobs):
            first = jobs[indices[0]]
            prompts = [jobs[i].prompt for i in indices for _ in jobs[i].seeds]
            seeds = [seed for i in indices for seed in jobs[i].seeds]
            self.pipeline_calls += 1
            try:
                images = iter(self.generator.generate(
                    prompts, seeds, steps=first.steps, guidance_scale=first.guidance_scale, size=first.size,
                    negative_prompt=first.negative_prompt))
                for i in indices:
                    results[i] = [png_bytes(next(images)) for _ in jobs[i].seeds]
            except Exception as err:  # fails this group's requests only
                for i in indices:
                    results[i] = err
        return results


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


@serve.deployment
@serve.ingress(api)
class ImagesAPI:
    def __init__(self, model, *, limits: Limits, api_key: str | None):
        self.model = model
        self.limits = limits
        self.api_key = api_key
        self.native_size: int | None = None

    def _authorize(self, request: Request) -> None:
        if self.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
            raise ApiError(401, "missing or invalid API key; send 'Authorization: Bearer <key>'",
                           code="invalid_api_key")

    async def _native_size(self) -> int:
        if self.native_size is None:
            self.native_size = (await self.model.describe.remote())["native_size"]
        return self.native_size

    @api.post("/v1/images/generations", openapi_extra={"requestBody": {"required": True, "content": {
        "application/json": {"schema": ImageGenerationRequest.model_json_schema()}}}})
    async def generate_images(self, request: Request) -> dict:
        from ray.serve.exceptions import BackPressureError

        self._authorize(request)
        parsed = parse_request(await request.body())
        job = resolve_job(parsed, self.limits, await self._native_size())
        try:
            images = await self.model.generate.remote(job)
        except BackPressureError:
            raise ApiError(503, "the server is overloaded; retry later", type="server_error",
                           code="overloaded") from None
        except Exception as err:
            logger.exception("image generation failed")
            raise ApiError(500, f"image generation failed: {type(err).__name__}", type="server_error",
                           code="generation_failed") from None
        return {"created": int(time.time()),
                "data": [{"b64_json": base64.b64encode(png).decode("ascii")} for png in images]}

    @api.get("/v1/models")
    async def list_models(self, request: Request) -> dict:
        self._authorize(request)
        return {"object": "list", "data": [
            {"id": self.limits.model_name, "object": "model", "created": 0, "owned_by": "selma"}]}

    @api.get("/healthz")
    async def healthz(self) -> dict:
        return {"status": "ok", "model": self.limits.model_name}

    @api.get("/debug/batching")
    async def batching(self, request: Request) -> dict:
        """Batching counters of whichever model replica answers."""
        self._authorize(request)
        return await self.model.batching_stats.remote()


# --------------------------------------------------------------------------- building and running


def build_app(serve_config, *, base_model: str, lora_dir: str | None, model_name: str = "merged",
              default_steps: int, guidance_scale: float = 7.5) -> serve.Application:
    """The Serve application for ``base_model`` (+ ``lora_dir``, fused), named ``model_name`` in the API.

    With ``serve_config.api_key_env`` naming an environment variable that is set *here* (in the
    process that builds the app), every endpoint but ``/healthz`` requires ``Bearer <its value>``.
    """
    if default_steps > serve_config.max_steps:
        raise ValueError(f"default_steps ({default_steps}) exceeds serve.max_steps ({serve_config.max_steps})")
    api_key = os.environ.get(serve_config.api_key_env) if serve_config.api_key_env else None
    model = ImageModel.options(
        num_replicas=serve_config.num_replicas,
        ray_actor_options={"num_gpus": serve_config.gpus_per_replica, "num_cpus": serve_config.cpus_per_replica},
        max_ongoing_requests=serve_config.max_ongoing_requests,
        max_queued_requests=serve_config.max_queued_requests,
    ).bind(
        base_model=base_model,
        lora_dir=str(lora_dir) if lora_dir else None,
        default_steps=default_steps,
        guidance_scale=guidance_scale,
        max_batch_size=serve_config.max_batch_size,
        batch_wait_timeout_s=serve_config.batch_wait_timeout_s,
        cpus=serve_config.cpus_per_replica,
    )
    limits = Limits(
        model_name=model_name,
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
    model_capacity = serve_config.num_replicas * serve_config.max_ongoing_requests + serve_config.max_queued_requests
    return ImagesAPI.options(
        ray_actor_options={"num_cpus": INGRESS_CPUS},
        max_ongoing_requests=2 * model_capacity,
        max_queued_requests=2 * model_capacity,
    ).bind(model, limits=limits, api_key=api_key or None)


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
