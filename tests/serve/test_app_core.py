"""selma.serve.app without Ray: the API key the app requires (or refuses to start without), the
ingress's request checks, and the model deployment's batch drawing on a tiny pipeline (the class,
not a Serve deployment)."""

import io
import os
import pickle
import signal
import socket
import subprocess
import sys

import pytest

from selma.core.config import ServeConfig
from selma.core.errors import ConfigError

KEY_ENV = "SELMA_TEST_CORE_API_KEY"


# --------------------------------------------------------------------------- the API key


def test_a_named_key_variable_that_is_unset_refuses_to_start(monkeypatch):
    from selma.serve.app import resolve_api_key

    monkeypatch.delenv(KEY_ENV, raising=False)
    for host in ("127.0.0.1", "0.0.0.0", None):
        with pytest.raises(ConfigError, match=rf"^serve\.api_key_env: names the environment variable {KEY_ENV}, "
                                              r"which is not set"):
            resolve_api_key(ServeConfig(api_key_env=KEY_ENV, allow_unauthenticated=True), host)


@pytest.mark.parametrize("value", ["", "   ", "\n"])
def test_an_empty_key_refuses_to_start(monkeypatch, value):
    from selma.serve.app import resolve_api_key

    monkeypatch.setenv(KEY_ENV, value)
    with pytest.raises(ConfigError, match=rf"^serve\.api_key_env: .*{KEY_ENV}, which is empty"):
        resolve_api_key(ServeConfig(api_key_env=KEY_ENV, allow_unauthenticated=True), "127.0.0.1")


def test_the_key_is_read_where_the_app_is_built_and_stripped(monkeypatch):
    from selma.serve.app import resolve_api_key

    monkeypatch.setenv(KEY_ENV, " s3cret\n")  # as `kubectl create secret --from-file` often leaves it
    for host in ("0.0.0.0", "127.0.0.1", None):
        assert resolve_api_key(ServeConfig(api_key_env=KEY_ENV), host) == "s3cret"


@pytest.mark.parametrize("host", ["127.0.0.1", "127.1.2.3", "::1", "[::1]", "localhost", "LocalHost"])
def test_loopback_needs_no_key(host):
    from selma.serve.app import resolve_api_key

    assert resolve_api_key(ServeConfig(), host) is None


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.0.0.5", "selma.example.com", ""])
def test_a_reachable_host_without_a_key_is_refused_unless_allowed(host):
    from selma.serve.app import resolve_api_key

    with pytest.raises(ConfigError, match=r"^serve\.host: .* no API key is configured; set serve\.api_key_env .*"
                                          r"serve\.allow_unauthenticated=true"):
        resolve_api_key(ServeConfig(), host)
    assert resolve_api_key(ServeConfig(allow_unauthenticated=True), host) is None


def test_an_unknown_host_without_a_key_is_refused_unless_allowed():
    """app_builder where no Serve runs yet (``serve run IMPORT_PATH``): the proxy's host is unknown."""
    from selma.serve.app import resolve_api_key

    with pytest.raises(ConfigError, match=r"^serve\.api_key_env: not set, .*not known.*serve\.allow_unauthenticated"):
        resolve_api_key(ServeConfig(), None)
    assert resolve_api_key(ServeConfig(allow_unauthenticated=True), None) is None


def test_build_app_checks_the_host_it_will_serve_on(monkeypatch):
    from ray.serve import Application

    from selma.serve.app import build_app

    def build(config, **host):
        return build_app(config, base_model="tiny:sd", default_steps=2, **host)

    assert isinstance(build(ServeConfig()), Application)  # serve.host defaults to 127.0.0.1
    with pytest.raises(ConfigError, match=r"^serve\.host: '0\.0\.0\.0'"):
        build(ServeConfig(host="0.0.0.0"))
    with pytest.raises(ConfigError, match=r"^serve\.host: '0\.0\.0\.0'"):
        build(ServeConfig(), host="0.0.0.0")  # where the proxy really listens wins over serve.host
    with pytest.raises(ConfigError, match=r"^serve\.api_key_env: not set"):
        build(ServeConfig(), host=None)
    assert isinstance(build(ServeConfig(host="0.0.0.0", allow_unauthenticated=True)), Application)
    monkeypatch.setenv(KEY_ENV, "k")
    assert isinstance(build(ServeConfig(host="0.0.0.0", api_key_env=KEY_ENV)), Application)
    monkeypatch.setenv(KEY_ENV, "")
    with pytest.raises(ConfigError, match=r"^serve\.api_key_env: "):
        build(ServeConfig(api_key_env=KEY_ENV))


def test_proxy_host_never_starts_ray():
    # In a fresh interpreter: slow tests earlier in the session leave this one's Ray running.
    code = ("import ray; from selma.serve.app import proxy_host; "
            "print(proxy_host(), ray.is_initialized())")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.split() == ["None", "False"], result.stderr[-2000:]


def test_selma_serve_on_a_reachable_host_without_a_key_exits_2_before_ray_starts(tmp_path):
    """Not marked slow: the command must refuse before it starts Ray (the test guard would stop it)."""
    from selma.config import load_config
    from selma.core.rundir import RunDir

    run_dir = tmp_path / "run"
    config = load_config("tiny", [f"run_dir={run_dir}"])
    RunDir(str(run_dir)).update_manifest(config=config.model_dump(mode="json"), stages={})
    process = subprocess.Popen([sys.executable, "-m", "selma", "serve", str(run_dir), "--model", "base",
                                "--host", "0.0.0.0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    try:
        out, err = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 2, out + err
    assert err.strip().startswith("selma: serve.host: '0.0.0.0' is reachable from other machines"), err
    assert "serve.allow_unauthenticated" in err


# --------------------------------------------------------------------------- requests


def _job(prompt="a red cube on a table", **changes):
    from selma.serve.app import ImageJob

    fields = dict(model="base", prompt=prompt, seeds=(1,), steps=2, guidance_scale=7.5, size=64, negative_prompt=None)
    return ImageJob(**{**fields, **changes})


def test_group_jobs_shares_a_call_only_when_every_parameter_agrees():
    from selma.serve.app import group_jobs

    jobs = [_job(), _job(prompt="other", seeds=(5, 6)), _job(steps=5), _job(guidance_scale=1.0), _job(size=128),
            _job(negative_prompt="blurry"), _job(seeds=(9,)), _job(model="merged")]
    assert group_jobs(jobs) == [[0, 1, 6], [2], [3], [4], [5], [7]]


def test_a_taken_port_fails_fast():
    from selma.serve.app import _ensure_port_free

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(RuntimeError, match="cannot serve on"):
            _ensure_port_free("127.0.0.1", taken.getsockname()[1])
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    _ensure_port_free("127.0.0.1", port)


@pytest.fixture(scope="module")
def tiny_model(one_torch_thread):
    """The model deployment's class on a tiny random SD pipeline, outside Serve."""
    from selma.serve.app import ImageModel

    return ImageModel(base_model="tiny:sd", adapters={}, default_steps=2, guidance_scale=7.5, max_batch_size=4,
                      batch_wait_timeout_s=0.1, cpus=1)


def test_the_ingress_refuses_exactly_the_prompts_the_model_would(tiny_model):
    from selma.serve.app import ApiError, check_prompt_tokens

    # What the ingress holds: the model replica's tokenizers, sent through Ray (pickled).
    tokenizers = pickle.loads(pickle.dumps(tiny_model.describe()["tokenizers"]))
    limit = tiny_model.generator.pipe.tokenizer.model_max_length
    at_limit, over = "a " * (limit - 2), "a " * (limit - 1)  # words plus the start and end tokens
    check_prompt_tokens(_job(at_limit, negative_prompt=at_limit), tokenizers)
    tiny_model.generator.check_prompt_lengths([at_limit])
    with pytest.raises(ValueError):
        tiny_model.generator.check_prompt_lengths([over])
    for param, job in (("prompt", _job(over)), ("negative_prompt", _job(negative_prompt=over))):
        with pytest.raises(ApiError) as caught:
            check_prompt_tokens(job, tokenizers)
        error = caught.value
        assert (error.status, error.param, error.code) == (400, param, "string_above_max_length")
        assert error.message == f"{param} is {limit + 1} tokens; this model takes at most {limit}"


def _png_size(data: bytes) -> tuple[int, int]:
    from PIL import Image

    image = Image.open(io.BytesIO(data))
    assert image.format == "PNG"
    return image.size


def test_a_request_that_fails_inside_a_batch_fails_alone(tiny_model):
    """An 80-token prompt (past the ingress, which would refuse it) batched with a good request
    sharing its pipeline call: the good one gets its PNGs, the bad one its own error."""
    good, other = _job(seeds=(2, 3)), _job("a blue ball", seeds=(4,))
    bad = _job("a " * 80, seeds=(1,))
    assert bad.call_key == good.call_key == other.call_key

    calls = tiny_model.pipeline_calls
    together = tiny_model._draw([good, other])
    assert tiny_model.pipeline_calls - calls == 1  # a batch that succeeds: one call

    calls = tiny_model.pipeline_calls
    failed, drawn = tiny_model._draw([bad, good])
    assert isinstance(failed, ValueError) and "82 tokens" in str(failed)
    assert [_png_size(png) for png in drawn] == [(64, 64)] * 2
    assert tiny_model.pipeline_calls - calls == 3  # the shared call, then each request alone
    assert drawn == tiny_model._draw([good])[0]  # what the good request gets alone
    assert [_png_size(png) for png in together[0]] == [(64, 64)] * 2


def test_an_adapter_that_fails_to_load_fails_its_group_without_retries(tiny_model, tmp_path):
    tiny_model.adapters["broken"] = str(tmp_path)  # no LoRA file in it
    try:
        calls = tiny_model.pipeline_calls
        results = tiny_model._draw([_job(model="broken"), _job(model="broken", seeds=(2,)), _job()])
    finally:
        del tiny_model.adapters["broken"]
    assert isinstance(results[0], Exception) and results[1] is results[0]
    assert _png_size(results[2][0]) == (64, 64)  # another group, drawn as usual
    assert tiny_model.pipeline_calls - calls == 2
