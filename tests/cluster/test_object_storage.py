"""A run directory in object storage, end to end: ``s3://selma/run`` on a local S3-compatible server
(moto in server mode, started here). The pipeline, a rerun, ``selma eval`` and ``selma serve`` all
work on it through the CLI, each in its own process with its own local Ray."""

import base64
import io
import os
import subprocess
import sys

import pytest
from shared_data import BENCHMARKS, needs_benchmarks

pytestmark = [pytest.mark.slow, needs_benchmarks]
DSG = BENCHMARKS / "dsg-1k-anns.csv"
RUN = "s3://selma/run"


@pytest.fixture
def s3(monkeypatch):
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    settings = {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "test",
                "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}
    for key, value in settings.items():
        monkeypatch.setenv(key, value)
    import boto3

    boto3.client("s3").create_bucket(Bucket="selma")
    yield {**os.environ, **settings}
    server.stop()


def selma(env, *args, timeout=600) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "selma", *args], env=env, capture_output=True, text=True,
                            timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result


def bucket_keys(prefix: str) -> list[str]:
    import boto3

    pages = boto3.client("s3").get_paginator("list_objects_v2").paginate(Bucket="selma", Prefix=prefix)
    return [item["Key"] for page in pages for item in page.get("Contents", [])]


def test_a_run_directory_in_s3_works_end_to_end(s3, selma_server):
    import httpx
    from PIL import Image

    from selma.core.rundir import RunDir

    run_args = ["run", "--config", "tiny", "--run-dir", RUN, "skills.names=[coco, whoops]", "prompts.per_skill=4",
                "images.steps=2", "train.max_steps=4", "train.checkpoint_every=2"]
    selma(s3, *run_args)
    run = RunDir(RUN)
    stages = run.manifest()["stages"]
    assert all(stages[name]["status"] == "committed" for name in ("prompts", "images", "train", "merge"))
    assert {"run/merged/pytorch_lora_weights.safetensors", "run/experts/coco/pytorch_lora_weights.safetensors",
            "run/experts/whoops/adapter_config.json"} <= set(bucket_keys("run/"))
    assert any(key.startswith("run/_work/train/expert-coco/checkpoint_") for key in bucket_keys("run/_work/"))
    assert run.read_table("images").num_rows == 8
    assert not [key for key in bucket_keys("run/") if "/.tmp-" in key]

    again = selma(s3, *run_args)
    assert again.stdout.count("already committed") == 4
    assert run.read_table("images").num_rows == 8

    selma(s3, "eval", RUN, "--models", "merged", "--limit", "3", f"eval.dsg_annotations={DSG}")
    assert {"run/eval/report.md", "run/eval/report.png", "run/eval/merged/dsg-questions.parquet"} <= set(bucket_keys("run/eval/"))
    assert run.read_json("eval/merged/summary.json")["benchmarks"]["dsg"]["overall"]["items"] == 3

    url = selma_server(RUN, env=s3)
    for model in ("merged", "expert-coco"):
        response = httpx.post(f"{url}/v1/images/generations",
                              json={"prompt": "two red apples", "size": "64x64", "model": model}, timeout=120)
        assert response.status_code == 200, response.text
        assert Image.open(io.BytesIO(base64.b64decode(response.json()["data"][0]["b64_json"]))).format == "PNG"
