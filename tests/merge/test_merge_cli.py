"""selma.merge: the fused full pipeline, ``selma merge-adapters`` and the pipeline's merge stage."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from test_merge import Expert  # shared helper (pytest puts tests/merge on sys.path)

from selma.cli import main
from selma.merge.lora_io import read_lora
from selma.merge.methods import MergeError, merge_experts


@pytest.fixture(scope="module")
def tiny_sd():
    from selma.core.models import resolve_model

    return resolve_model("tiny:sd")


@pytest.fixture(scope="module")
def sd(tiny_sd, tmp_path_factory):
    """The tiny:sd UNet and two experts of different ranks trained (randomly) on it."""
    from diffusers import UNet2DConditionModel

    base = UNet2DConditionModel.from_pretrained(tiny_sd, subfolder="unet").eval()
    root = tmp_path_factory.mktemp("sd-experts")
    experts = {
        "coco": Expert(base, root / "coco", r=4, alpha=8, seed=1, base_model="tiny:sd"),
        "whoops": Expert(base, root / "whoops", r=2, alpha=2, seed=2, base_model="tiny:sd"),
    }
    return base, experts


def test_fused_pipeline_holds_w0_plus_the_merged_delta_and_nothing_else(tmp_path, sd):
    from diffusers import DiffusionPipeline

    base, experts = sd
    out = tmp_path / "merged"
    report = merge_experts({n: e.dir for n, e in experts.items()}, out, weights={"coco": 1, "whoops": 3},
                           fuse_into="tiny:sd")
    assert report["fused_pipeline"] == str(out / "fused")
    assert json.loads((out / "merge.json").read_text())["fused_pipeline"] == str(out / "fused")

    pipe = DiffusionPipeline.from_pretrained(out / "fused")
    assert not any("lora" in name for name, _ in pipe.unet.named_parameters())
    lora_layers = set(experts["coco"].factors)
    assert len(lora_layers) > 0
    for name in lora_layers:
        expected = base.get_submodule(name).weight + 0.25 * experts["coco"].delta(name) + 0.75 * experts["whoops"].delta(name)
        torch.testing.assert_close(pipe.unet.get_submodule(name).weight, expected.detach(), atol=1e-5, rtol=0)
    base_state = base.state_dict()
    for key, value in pipe.unet.state_dict().items():
        if key.rsplit(".", 1)[0] not in lora_layers:
            assert torch.equal(value, base_state[key]), key
    generator = torch.Generator().manual_seed(0)
    image = pipe("a red apple", num_inference_steps=2, generator=generator, output_type="pt").images
    assert image.shape[0] == 1 and torch.isfinite(image).all()


def test_fusing_into_another_base_model_names_the_layer(tmp_path, sd):
    from selma.merge.fuse import fuse_into_pipeline

    _, experts = sd
    with pytest.raises(MergeError, match="does not fit tiny:sdxl|which tiny:sdxl does not have"):
        fuse_into_pipeline("tiny:sdxl", experts["coco"].dir, tmp_path / "fused")
    assert not (tmp_path / "fused").exists()


def test_merge_adapters_merges_adapter_folders_like_the_library(tmp_path, sd, capsys):
    _, experts = sd
    coco, whoops = experts["coco"].dir, experts["whoops"].dir
    argv = [str(coco), f"w={whoops}", "--out", str(tmp_path / "cli"), "--method", "ties", "--weights", "1,3",
            "--option", "density=0.5", "--option", "majority_sign_method=frequency"]
    assert main(["merge-adapters", *argv]) == 0
    summary = json.loads(capsys.readouterr().out)
    report = json.loads((tmp_path / "cli" / "merge.json").read_text())
    assert summary["method"] == report["method"] == "ties"
    assert report["weights"] == {"coco": 0.25, "w": 0.75}
    assert report["options"] == {"density": 0.5, "majority_sign_method": "frequency", "rank": None}

    merge_experts({"coco": coco, "w": whoops}, tmp_path / "lib", method="ties", weights={"coco": 1, "w": 3},
                  options={"density": 0.5, "majority_sign_method": "frequency"})
    cli, lib = read_lora(tmp_path / "cli"), read_lora(tmp_path / "lib")
    for name in lib.layers:
        assert torch.equal(cli.delta(name), lib.delta(name))

    assert main(["merge-adapters", str(coco), str(whoops), "--out", str(tmp_path / "raw"),
                 "--weights", "coco=1,whoops=1", "--no-normalize"]) == 0
    assert json.loads((tmp_path / "raw" / "merge.json").read_text())["weights"] == {"coco": 1.0, "whoops": 1.0}


@pytest.mark.parametrize("case", ["weights", "missing", "ranks", "duplicate", "option", "density"])
def test_merge_adapters_bad_input_exits_2_naming_the_experts(tmp_path, sd, capsys, case):
    _, experts = sd
    coco, whoops = str(experts["coco"].dir), str(experts["whoops"].dir)
    out = ["--out", str(tmp_path / "out")]
    argv, message = {
        "weights": ([coco, whoops, *out, "--weights", "1,2,3"], "3 weights for 2 experts \\['coco', 'whoops'\\]"),
        "missing": ([coco, str(tmp_path / "gone"), *out], "gone"),
        "ranks": ([coco, whoops, *out, "--method", "ab_mean"], "coco r=4, whoops r=2"),
        "duplicate": ([coco, f"coco={whoops}", *out], "two experts are named 'coco'"),
        "option": ([coco, whoops, *out, "--method", "ties", "--option", "density"], "--option 'density': .*not of the form"),
        "density": ([coco, whoops, *out, "--method", "dare_ties", "--option", "density=2"], "density=2"),
    }[case]
    assert main(["merge-adapters", *argv]) == 2
    import re

    assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "out").exists()


def test_merge_stage_runs_the_configs_method_options_and_fusing(tmp_path, sd):
    from selma.config import load_config
    from selma.core.rundir import RunDir
    from selma.merge.stage import run_merge_stage

    _, experts = sd
    run = RunDir(str(tmp_path / "run"))
    for name, expert in experts.items():
        shutil.copytree(expert.dir, tmp_path / "run" / "experts" / name)
    config = load_config("tiny", [
        "skills.names=[coco, whoops]", "merge.method=dare_linear", "merge.options={density: 0.5, seed: 4}",
        "merge.weights={coco: 2, whoops: 1}", "merge.fused_pipeline=true",
    ])
    messages = []
    summary = run_merge_stage(config, run, progress=messages.append)
    assert summary["method"] == "dare_linear" and summary["exact"] is True and summary["fused_pipeline"] is True
    report = json.loads((tmp_path / "run" / "merged" / "merge.json").read_text())
    assert report["options"] == {"density": 0.5, "seed": 4, "rank": None}
    assert report["weights"] == pytest.approx({"coco": 2 / 3, "whoops": 1 / 3})
    assert (tmp_path / "run" / "merged" / "fused" / "model_index.json").is_file()
    assert "dare_linear" in messages[0]

    merge_experts({n: e.dir for n, e in experts.items()}, tmp_path / "lib", method="dare_linear",
                  weights={"coco": 2, "whoops": 1}, options={"density": 0.5, "seed": 4})
    stage, lib = read_lora(tmp_path / "run" / "merged"), read_lora(tmp_path / "lib")
    for name in lib.layers:
        assert torch.equal(stage.delta(name), lib.delta(name))
