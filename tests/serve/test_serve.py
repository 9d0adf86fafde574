"""The OpenAI Images API on Ray Serve, against a tiny random pipeline with two LoRA adapters
multiplexed beside the base model (one adapter loaded per replica at a time, so the LRU evicts).
Ray-free checks of the same module are in test_app_core.py."""

import asyncio
import base64
import io
import json
import socket
import time
from dataclasses import dataclass

import numpy as np
import pytest
from lora_helpers import write_random_lora

pytestmark = pytest.mark.slow  # one Serve instance for the module
API_KEY = "test-key-123"
API_KEY_ENV = "SELMA_TEST_SERVE_API_KEY"
MODEL_NAME = "selma-test"
OTHER_MODEL = "expert-other"
STEPS = 3
# Queues small enough that overload is reachable, with room for 16 concurrent clients: the
# model holds MAX_ONGOING + MAX_QUEUED requests.
MAX_ONGOING = 8
MAX_QUEUED = 16


@dataclass
class Server:
    url: str
    base_model: str
    lora_dir: str
    other_lora_dir: str
    metrics_port: int

    def post(self, body, *, key: str | None = API_KEY, **kwargs):
        import httpx

        headers = {"Authorization": f"Bearer {key}"} if key else {}
        options = {"content": body} if isinstance(body, (bytes, str)) else {"json": body}
        return httpx.post(f"{self.url}/v1/images/generations", headers=headers, timeout=120, **options, **kwargs)

    def get(self, path: str, *, key: str | None = API_KEY):
        import httpx

        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.get(f"{self.url}{path}", headers=headers, timeout=60)

    def images(self, **body) -> list[np.ndarray]:
        response = self.post({"prompt": "two red apples on a table", **body})
        assert response.status_code == 200, response.text
        return [decode_png(item["b64_json"]) for item in response.json()["data"]]


def decode_png(b64: str, *, size: int | None = None) -> np.ndarray:
    from PIL import Image

    image = Image.open(io.BytesIO(base64.b64decode(b64)))
    assert image.format == "PNG" and image.mode == "RGB"
    if size is not None:
        assert image.size == (size, size)
    return np.asarray(image, dtype=np.float32) / 255.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(ray_local, tmp_path_factory):
    from ray import serve

    from selma.core.config import ServeConfig
    from selma.core.models import resolve_model
    from selma.serve.app import build_app, serve_run

    base_model = resolve_model("tiny:sd")  # built here once, not by the replica
    lora_dir = write_random_lora(base_model, tmp_path_factory.mktemp("lora"))
    other_lora_dir = write_random_lora(base_model, tmp_path_factory.mktemp("other"), seed=1)
    config = ServeConfig(max_batch_size=4, batch_wait_timeout_s=0.2, max_ongoing_requests=MAX_ONGOING,
                         max_queued_requests=MAX_QUEUED, max_images_per_request=4, max_steps=20,
                         max_prompt_chars=200, api_key_env=API_KEY_ENV, max_loaded_adapters=1)
    with pytest.MonkeyPatch.context() as env:
        env.setenv(API_KEY_ENV, API_KEY)
        app = build_app(config, base_model=base_model, adapters={MODEL_NAME: lora_dir, OTHER_MODEL: other_lora_dir},
                        default_model=MODEL_NAME, default_steps=STEPS)
    port = _free_port()
    serve_run(app, "127.0.0.1", port, blocking=False)
    try:
        yield Server(url=f"http://127.0.0.1:{port}", base_model=base_model, lora_dir=lora_dir,
                     other_lora_dir=other_lora_dir, metrics_port=ray_local.nodes()[0]["MetricsExportPort"])
    finally:
        serve.shutdown()


def test_round_trip_returns_pngs_of_the_requested_size(server):
    before = time.time()
    response = server.post({"prompt": "a cat on a sofa", "size": "128x128", "n": 2, "seed": 1,
                            "quality": "hd", "style": "vivid", "user": "someone"})  # OpenAI fields we ignore
    assert response.status_code == 200, response.text
    body = response.json()
    assert before - 1 <= body["created"] <= time.time() + 1
    assert len(body["data"]) == 2
    first, second = (decode_png(item["b64_json"], size=128) for item in body["data"])
    assert np.abs(first - second).mean() > 0.01  # each image has its own seed

    [native] = server.images(seed=1)
    assert native.shape == (64, 64, 3)  # default: the tiny model's native size


def test_official_openai_client_works_unchanged(server):
    from openai import OpenAI

    client = OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0)
    result = client.images.generate(model=MODEL_NAME, prompt="a dog in a park", size="64x64",
                                    response_format="b64_json", n=2)
    assert len(result.data) == 2
    for image in result.data:
        decode_png(image.b64_json, size=64)
    assert [model.id for model in client.models.list()] == [MODEL_NAME, "base", OTHER_MODEL]


def test_same_seed_gives_identical_bytes_and_each_image_has_seed_plus_index(server):
    body = {"prompt": "three blue cups", "seed": 1234, "size": "64x64"}
    first, again = server.post(body), server.post(body)
    assert first.status_code == again.status_code == 200
    assert first.json()["data"] == again.json()["data"]

    pair = server.images(prompt="three blue cups", seed=1234, n=2)
    [alone] = server.images(prompt="three blue cups", seed=1235)
    # Batch shape can move pixels by float rounding only; a different seed moves them a lot.
    assert np.abs(pair[1] - alone).max() <= 2 / 255
    assert np.abs(pair[0] - alone).mean() > 0.01
    assert np.abs(pair[0] - decode_png(first.json()["data"][0]["b64_json"])).max() <= 2 / 255


def test_each_model_is_its_lora_and_the_lru_swaps_adapters(server):
    """base, the default adapter and a second one, alternated on one replica that holds one adapter."""
    from selma.core.config import ImagesConfig
    from selma.images.generator import ImageGenerator, load_adapter

    prompt = "a wooden boat on a lake"
    served = {}
    for model in (MODEL_NAME, "base", OTHER_MODEL, MODEL_NAME):
        [served[model]] = server.images(prompt=prompt, seed=42, size="64x64", model=model)
        assert server.get("/debug/batching").json()["loaded_adapters"] in ([], [MODEL_NAME], [OTHER_MODEL])
    [default] = server.images(prompt=prompt, seed=42, size="64x64")

    def local(lora_dir):
        generator = ImageGenerator(server.base_model, ImagesConfig(steps=STEPS), device="cpu")
        if lora_dir:
            load_adapter(generator.pipe, lora_dir, "reference")
        return generator.generate([prompt], [42])[0]

    expected = {MODEL_NAME: local(server.lora_dir), "base": local(None), OTHER_MODEL: local(server.other_lora_dir)}
    for model, image in served.items():
        assert np.abs(image - expected[model]).max() <= 2 / 255, model
    assert np.abs(default - expected[MODEL_NAME]).max() <= 2 / 255
    assert np.abs(expected[MODEL_NAME] - expected["base"]).mean() > 0.02
    assert np.abs(expected[MODEL_NAME] - expected[OTHER_MODEL]).mean() > 0.02


def test_a_lora_that_loads_nothing_is_refused(server, tmp_path):
    """Raw peft keys (no ``unet.`` prefix): diffusers only warns and loads nothing."""
    import torch
    from safetensors.torch import save_file

    from selma.images.generator import load_adapter, load_pipeline

    module = "base_model.model.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
    save_file({f"{module}.lora_A.weight": torch.ones(4, 64), f"{module}.lora_B.weight": torch.ones(64, 4)},
              str(tmp_path / "pytorch_lora_weights.safetensors"))
    pipe = load_pipeline(server.base_model, device="cpu")
    with pytest.raises(RuntimeError, match="no LoRA weights"):
        load_adapter(pipe, str(tmp_path), "raw-peft")


LONG_PROMPT = "a " * 150
TOKEN_LIMIT = 77  # the tiny CLIP tokenizer's, as SD's
OVER_TOKEN_LIMIT = "a " * 80  # 160 characters (under max_prompt_chars), 82 tokens
BAD_REQUESTS = [
    # (name, body, status, param, code)
    ("not json", b"prompt=cat", 400, None, "invalid_json"),
    ("empty body", b"", 400, None, "invalid_json"),
    ("not utf-8", b"\xff\xfe{}", 400, None, "invalid_json"),
    ("json array", b'["a cat"]', 400, None, "invalid_json"),
    ("missing prompt", {"n": 1}, 400, "prompt", "missing_required_parameter"),
    ("blank prompt", {"prompt": "   "}, 400, "prompt", "invalid_value"),
    ("prompt not a string", {"prompt": 7}, 400, "prompt", "invalid_value"),
    ("prompt too long", {"prompt": LONG_PROMPT}, 400, "prompt", "string_above_max_length"),
    ("negative prompt too long", {"prompt": "a cat", "negative_prompt": LONG_PROMPT}, 400, "negative_prompt",
     "string_above_max_length"),
    ("prompt over the token limit", {"prompt": OVER_TOKEN_LIMIT}, 400, "prompt", "string_above_max_length"),
    ("negative prompt over the token limit", {"prompt": "a cat", "negative_prompt": OVER_TOKEN_LIMIT}, 400,
     "negative_prompt", "string_above_max_length"),
    ("unknown model", {"prompt": "a cat", "model": "dall-e-3"}, 404, "model", "model_not_found"),
    ("n zero", {"prompt": "a cat", "n": 0}, 400, "n", "invalid_value"),
    ("n too large", {"prompt": "a cat", "n": 5}, 400, "n", "invalid_value"),
    ("n as string", {"prompt": "a cat", "n": "2"}, 400, "n", "invalid_value"),
    ("steps zero", {"prompt": "a cat", "steps": 0}, 400, "steps", "invalid_value"),
    ("steps too many", {"prompt": "a cat", "steps": 21}, 400, "steps", "invalid_value"),
    ("size not square", {"prompt": "a cat", "size": "64x128"}, 400, "size", "invalid_size"),
    ("size not multiple of 8", {"prompt": "a cat", "size": "68x68"}, 400, "size", "invalid_size"),
    ("size too small", {"prompt": "a cat", "size": "8x8"}, 400, "size", "invalid_size"),
    ("size too large", {"prompt": "a cat", "size": "4096x4096"}, 400, "size", "invalid_size"),
    ("size garbage", {"prompt": "a cat", "size": "big"}, 400, "size", "invalid_size"),
    ("url format", {"prompt": "a cat", "response_format": "url"}, 400, "response_format", "unsupported_value"),
    ("negative guidance", {"prompt": "a cat", "guidance_scale": -1}, 400, "guidance_scale", "invalid_value"),
    ("negative seed", {"prompt": "a cat", "seed": -1}, 400, "seed", "invalid_value"),
]


@pytest.mark.parametrize("name, body, status, param, code", BAD_REQUESTS, ids=[case[0] for case in BAD_REQUESTS])
def test_bad_request_gets_an_openai_error_and_the_server_keeps_serving(server, name, body, status, param, code):
    response = server.post(body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert (error["param"], error["code"]) == (param, code)
    assert isinstance(error["message"], str) and error["message"]
    if name == "url format":
        assert "b64_json" in error["message"]
    assert server.get("/v1/models").status_code == 200


def test_a_prompt_over_the_token_limit_gets_400_naming_the_limit(server):
    response = server.post({"prompt": OVER_TOKEN_LIMIT, "n": 2})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == "prompt"
    assert error["message"] == f"prompt is 82 tokens; this model takes at most {TOKEN_LIMIT}"


def test_api_key_is_required_except_for_health(server):
    for key in (None, "wrong-key", f"{API_KEY}x", API_KEY[:-1]):
        for response in (server.post({"prompt": "a cat"}, key=key), server.get("/v1/models", key=key),
                         server.get("/debug/batching", key=key)):
            assert response.status_code == 401, response.text
            assert response.json()["error"]["code"] == "invalid_api_key"
            assert response.headers["www-authenticate"] == "Bearer"
    assert server.get("/v1/models", key=API_KEY).status_code == 200
    health = server.get("/healthz", key=None)
    assert health.status_code == 200 and health.json()["models"] == [MODEL_NAME, "base", OTHER_MODEL]


def test_unknown_route_gets_an_openai_shaped_404_and_the_schema_is_published(server):
    response = server.get("/v1/chat/completions")
    assert response.status_code == 404
    assert "message" in response.json()["error"]
    schema = server.get("/openapi.json").json()
    assert "prompt" in json.dumps(schema["paths"]["/v1/images/generations"])


def test_app_builder_in_the_cluster_checks_where_the_running_proxy_listens(server, tmp_path):
    """As under `serve deploy` (and a RayService): app_builder runs in a Ray task while Serve runs,
    asks the controller where the proxy listens (127.0.0.1 here: no key needed), and refuses a
    named key variable that the cluster's processes do not have."""
    import ray

    from selma.config import load_config
    from selma.core.errors import ConfigError
    from selma.core.rundir import RunDir

    run_dir = tmp_path / "run"
    config = load_config("tiny", [f"run_dir={run_dir}"])
    RunDir(str(run_dir)).update_manifest(config=config.model_dump(mode="json"), stages={})

    @ray.remote(num_cpus=0)
    def build(args):
        from selma.serve.app import proxy_host
        from selma.serve.run import app_builder

        app_builder(args)
        return proxy_host()

    args = {"run_dir": str(run_dir), "serve.model": "base"}
    assert ray.get(build.remote(args)) == "127.0.0.1"
    with pytest.raises(ConfigError, match="serve.api_key_env: names the environment variable "
                                          "SELMA_TEST_UNSET_API_KEY, which is not set"):
        ray.get(build.remote({**args, "serve.api_key_env": "SELMA_TEST_UNSET_API_KEY"}))


async def _post_many(server: Server, bodies: list[dict], at_once: int | None = None):
    import httpx

    at_once = at_once or len(bodies)
    gate = asyncio.Semaphore(at_once)

    async def post(client, body):
        async with gate:
            return await client.post(f"{server.url}/v1/images/generations", json=body)

    async with httpx.AsyncClient(timeout=300, headers={"Authorization": f"Bearer {API_KEY}"},
                                 limits=httpx.Limits(max_connections=at_once)) as client:
        return await asyncio.gather(*(post(client, body) for body in bodies))


def test_concurrent_requests_succeed_and_are_batched(server):
    before = server.get("/debug/batching").json()
    responses = asyncio.run(_post_many(server, [
        {"prompt": f"{i} yellow ducks", "seed": i, "size": "64x64"} for i in range(8)]))
    assert [r.status_code for r in responses] == [200] * 8
    for response in responses:
        decode_png(response.json()["data"][0]["b64_json"], size=64)
    after = server.get("/debug/batching").json()

    new_batches = {int(size): count - before["requests_per_batch"].get(size, 0)
                   for size, count in after["requests_per_batch"].items()}
    assert sum(size * count for size, count in new_batches.items()) == 8
    assert max(size for size, count in new_batches.items() if count) > 1
    # One parameter set, so one pipeline call per batch.
    assert after["pipeline_calls"] - before["pipeline_calls"] == after["batches"] - before["batches"] < 8


def test_64_requests_16_at_a_time_all_succeed_with_pngs_of_the_requested_size(server):
    sizes = [64, 128]
    bodies = [{"prompt": f"{i} green bottles on a wall", "seed": i, "size": f"{sizes[i % 2]}x{sizes[i % 2]}",
               "model": [MODEL_NAME, "base"][i % 3 == 0]} for i in range(64)]
    responses = asyncio.run(_post_many(server, bodies, at_once=16))
    assert [r.status_code for r in responses] == [200] * 64
    for body, response in zip(bodies, responses):
        [item] = response.json()["data"]
        decode_png(item["b64_json"], size=int(body["size"].split("x")[0]))


def test_request_metrics_reach_rays_prometheus_endpoint(server):
    import httpx

    server.images(seed=3)
    server.post({"prompt": "a cat", "n": 0})
    deadline, text = time.time() + 60, ""
    while time.time() < deadline:
        text = httpx.get(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10).text
        if 'selma_image_requests_total{' in text and 'status="400"' in text and "selma_image_request_seconds" in text:
            break
        time.sleep(2)
    assert f'model="{MODEL_NAME}"' in text and 'status="200"' in text and 'status="400"' in text, text[-2000:]
    assert "selma_images_generated_total" in text


def test_overload_gets_503_and_the_server_recovers(server):
    # Twice what the model holds: the ingress admits them all, the model's handle refuses the rest
    # with an OpenAI-shaped 503 (a plain-text 503 from the proxy would fail the json() below).
    burst = 2 * (MAX_ONGOING + MAX_QUEUED)
    responses = asyncio.run(_post_many(server, [{"prompt": "a red kite", "seed": i} for i in range(burst)]))
    statuses = [r.status_code for r in responses]
    assert set(statuses) <= {200, 503}
    assert 1 <= statuses.count(200) < burst
    for response in responses:
        if response.status_code == 503:
            assert response.json()["error"]["code"] == "overloaded"
    assert server.images(seed=1)[0].shape == (64, 64, 3)


def test_a_killed_model_replica_is_replaced_and_later_requests_succeed(server):
    """Last in this module: it kills the only model replica while 16 requests are in flight."""
    import ray

    async def load_and_kill():
        bodies = [{"prompt": f"{i} orange cones", "seed": i} for i in range(16)]
        posting = asyncio.ensure_future(_post_many(server, bodies))
        await asyncio.sleep(1.0)
        [replica] = [a for a in ray.util.list_named_actors(all_namespaces=True)
                     if a["namespace"] == "serve" and "#ImageModel#" in a["name"]]
        ray.kill(ray.get_actor(replica["name"], namespace="serve"), no_restart=True)
        return await posting

    responses = asyncio.run(load_and_kill())
    statuses = [r.status_code for r in responses]
    assert set(statuses) <= {200, 503}, [r.text for r in responses if r.status_code not in (200, 503)]
    for response in responses:
        if response.status_code == 503:
            assert response.json()["error"]["code"] in ("replica_unavailable", "overloaded")
    deadline = time.time() + 180
    while True:
        response = server.post({"prompt": "a rebuilt replica", "seed": 1})
        if response.status_code == 200:
            break
        assert response.status_code == 503 and time.time() < deadline, response.text
        time.sleep(2)
    assert [r.status_code for r in asyncio.run(_post_many(server, [{"prompt": "after", "seed": i} for i in range(8)]))] == [200] * 8
