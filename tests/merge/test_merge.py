"""selma.merge.methods: exact merge arithmetic, checked through plain diffusers loading and fusing."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

from selma.merge.lora_io import WEIGHT_NAME, LoraFormatError, read_lora, save_unet_lora
from selma.merge.methods import MERGE_METHODS, MergeError, merge_experts

TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
SD_UNET = dict(
    block_out_channels=(32, 64), layers_per_block=1, sample_size=16, in_channels=4, out_channels=4,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32, attention_head_dim=8, norm_num_groups=32,
)
SDXL_UNET = dict(
    block_out_channels=(32, 64), layers_per_block=1, sample_size=16, in_channels=4, out_channels=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
    transformer_layers_per_block=(1, 2), projection_class_embeddings_input_dim=80, cross_attention_dim=64,
    norm_num_groups=32,
)


def tiny_unet(config=SD_UNET, seed: int = 0):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(**config).eval()


def pipeline_around(unet):
    """A real SD / SDXL pipeline object around ``unet`` (LoRA loading only needs the UNet)."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

    scheduler = EulerDiscreteScheduler(steps_offset=1)
    if unet.config.addition_embed_type == "text_time":
        return StableDiffusionXLPipeline(
            vae=None, text_encoder=None, text_encoder_2=None, tokenizer=None, tokenizer_2=None,
            unet=unet, scheduler=scheduler,
        )
    return StableDiffusionPipeline(
        vae=None, text_encoder=None, tokenizer=None, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


class Expert:
    """A saved expert plus its peft factors, read from the peft layers (independent of lora_io)."""

    def __init__(self, base_unet, out_dir, *, r, alpha, seed, targets=TARGETS, base_model="tiny/base"):
        from peft import LoraConfig
        from peft.tuners.lora import LoraLayer as PeftLoraLayer

        unet = copy.deepcopy(base_unet)
        unet.add_adapter(LoraConfig(r=r, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=targets))
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, param in unet.named_parameters():
                if "lora_" in name:  # random non-zero A and B
                    param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
        self.factors = {
            name: (module.lora_A["default"].weight.detach().clone(), module.lora_B["default"].weight.detach().clone())
            for name, module in unet.named_modules()
            if isinstance(module, PeftLoraLayer)
        }
        self.scaling = alpha / r
        self.dir = out_dir
        save_unet_lora(unet, out_dir, base_model=base_model)

    def delta(self, name: str) -> torch.Tensor:
        A, B = self.factors[name]
        return self.scaling * B @ A


def fused_weights(base_unet, merged_dir) -> dict[str, torch.Tensor]:
    pipe = pipeline_around(copy.deepcopy(base_unet))
    pipe.load_lora_weights(merged_dir)
    pipe.fuse_lora()
    weights = {}
    for name, module in pipe.unet.named_modules():
        if hasattr(module, "base_layer"):
            weights[name] = module.base_layer.weight.detach()
    return weights


@pytest.fixture(scope="module")
def base_unet():
    return tiny_unet()


@pytest.fixture(scope="module")
def experts(base_unet, tmp_path_factory):
    """Three experts with different ranks and alphas (scalings 1, 2 and 0.5)."""
    root = tmp_path_factory.mktemp("experts")
    specs = {"coco": (4, 4), "whoops": (4, 8), "countbench": (2, 1)}
    return {
        name: Expert(base_unet, root / name, r=r, alpha=alpha, seed=index + 10)
        for index, (name, (r, alpha)) in enumerate(specs.items())
    }


def expert_dirs(experts) -> dict[str, object]:
    return {name: expert.dir for name, expert in experts.items()}


def test_registry_offers_the_exact_default_and_the_paper_equation():
    assert {"delta_mean", "ab_mean"} <= set(MERGE_METHODS)


def test_delta_mean_fuses_to_the_mean_of_expert_deltas(tmp_path, base_unet, experts):
    report = merge_experts(expert_dirs(experts), tmp_path)

    fused = fused_weights(base_unet, tmp_path)
    layer_names = experts["coco"].factors.keys()
    assert set(fused) == set(layer_names) and len(fused) == 32
    for name in layer_names:
        expected = base_unet.get_submodule(name).weight.detach() + sum(e.delta(name) for e in experts.values()) / 3
        torch.testing.assert_close(fused[name], expected, atol=1e-5, rtol=0)

    assert json.loads((tmp_path / "merge.json").read_text()) == report
    assert report["method"] == "delta_mean"
    assert report["weights"] == pytest.approx({name: 1 / 3 for name in experts})
    assert report["ranks"] == {"experts": {"coco": [4], "whoops": [4], "countbench": [2]}, "merged": [10]}
    assert report["num_layers"] == 32
    assert read_lora(tmp_path).base_model == "tiny/base"


def test_merge_report_norms_and_cosines_match_dense_deltas(tmp_path, experts):
    report = merge_experts(expert_dirs(experts), tmp_path)
    names = list(experts)
    layer_names = sorted(experts["coco"].factors)
    flat = {n: torch.cat([experts[n].delta(layer).flatten() for layer in layer_names]).double() for n in names}
    for first in names:
        for second in names:
            cosine = torch.nn.functional.cosine_similarity(flat[first], flat[second], dim=0).item()
            assert report["cosine_similarity"][first][second] == pytest.approx(cosine, abs=1e-6)
    assert report["cosine_similarity"]["coco"]["coco"] == pytest.approx(1.0)

    for name in names:  # scalings 1, 2 and 0.5
        norms = [experts[name].delta(layer).norm().item() for layer in layer_names]
        summary = report["delta_norms"]["experts"][name]
        assert summary["max"] == pytest.approx(max(norms), rel=1e-5)
        assert summary["min"] == pytest.approx(min(norms), rel=1e-5)
        assert summary["mean"] == pytest.approx(sum(norms) / len(norms), rel=1e-5)
        assert summary["total"] == pytest.approx(flat[name].norm().item(), rel=1e-5)
    merged_total = (sum(flat.values()) / 3).norm().item()
    assert report["delta_norms"]["merged"]["total"] == pytest.approx(merged_total, rel=1e-5)


def test_weights_are_validated_and_normalised(tmp_path, experts):
    report = merge_experts(expert_dirs(experts), tmp_path, weights={"coco": 1, "whoops": 3, "countbench": 0})
    assert report["weights"] == {"coco": 0.25, "whoops": 0.75, "countbench": 0.0}
    merged = read_lora(tmp_path)
    assert report["ranks"]["merged"] == [8]  # the zero-weight expert is left out of the concatenation
    for name in experts["coco"].factors:
        expected = 0.25 * experts["coco"].delta(name) + 0.75 * experts["whoops"].delta(name)
        torch.testing.assert_close(merged.delta(name), expected, atol=1e-6, rtol=0)

    summed = merge_experts(expert_dirs(experts), tmp_path / "sum", weights={n: 1 for n in experts}, normalize=False)
    assert summed["weights"] == {n: 1.0 for n in experts}
    name = next(iter(experts["coco"].factors))
    torch.testing.assert_close(
        read_lora(tmp_path / "sum").delta(name), sum(e.delta(name) for e in experts.values()), atol=1e-6, rtol=0
    )

    bad_weights = [
        ({"coco": -1, "whoops": 1, "countbench": 1}, "non-negative"),
        ({"coco": math.nan, "whoops": 1, "countbench": 1}, "finite"),
        ({"coco": math.inf, "whoops": 1, "countbench": 1}, "finite"),
        ({"coco": 0, "whoops": 0, "countbench": 0}, "all be zero"),
        ({"coco": 1, "whoops": 1}, "missing \\['countbench'\\]"),
        ({"coco": 1, "whoops": 1, "countbench": 1, "typo": 1}, "unknown \\['typo'\\]"),
    ]
    for weights, message in bad_weights:
        with pytest.raises(MergeError, match=message):
            merge_experts(expert_dirs(experts), tmp_path / "bad", weights=weights)
    with pytest.raises(MergeError, match="unknown merge method"):
        merge_experts(expert_dirs(experts), tmp_path / "bad", method="average")
    with pytest.raises(MergeError, match="does not take options"):
        merge_experts(expert_dirs(experts), tmp_path / "bad", options={"rank": 2})
    assert not (tmp_path / "bad").exists()


def test_one_expert_with_weight_one_is_the_identity(tmp_path, base_unet, experts):
    whoops = experts["whoops"]
    merge_experts({"whoops": whoops.dir}, tmp_path / "alone", weights={"whoops": 1.0})
    merge_experts(expert_dirs(experts), tmp_path / "only", weights={"coco": 0, "whoops": 1, "countbench": 0})
    for merged_dir in (tmp_path / "alone", tmp_path / "only"):
        merged = read_lora(merged_dir)
        for name in whoops.factors:
            torch.testing.assert_close(merged.delta(name), whoops.delta(name), atol=1e-6, rtol=0)
        assert fused_weights(base_unet, merged_dir).keys() == whoops.factors.keys()


def test_ab_mean_is_the_paper_equation_not_the_delta_mean(tmp_path, base_unet, experts):
    equal_rank = {name: experts[name] for name in ("coco", "whoops")}
    report = merge_experts(expert_dirs(equal_rank), tmp_path / "ab", method="ab_mean", weights={"coco": 1, "whoops": 3})
    assert report["ranks"]["merged"] == [4]
    merge_experts(expert_dirs(equal_rank), tmp_path / "delta", weights={"coco": 1, "whoops": 3})
    ab, exact = read_lora(tmp_path / "ab"), read_lora(tmp_path / "delta")
    fused = fused_weights(base_unet, tmp_path / "ab")
    coco, whoops = equal_rank["coco"], equal_rank["whoops"]
    for name in coco.factors:
        (A1, B1), (A2, B2) = coco.factors[name], whoops.factors[name]
        paper = (0.25 * coco.scaling * B1 + 0.75 * whoops.scaling * B2) @ (0.25 * A1 + 0.75 * A2)
        torch.testing.assert_close(ab.delta(name), paper, atol=1e-6, rtol=0)
        base_weight = base_unet.get_submodule(name).weight.detach()
        torch.testing.assert_close(fused[name], base_weight + paper, atol=1e-5, rtol=0)
        relative_gap = (ab.delta(name) - exact.delta(name)).norm() / exact.delta(name).norm()
        assert relative_gap > 0.1

    with pytest.raises(MergeError, match="equal rank.*countbench|countbench.*equal rank"):
        merge_experts(expert_dirs(experts), tmp_path / "unequal", method="ab_mean")


def test_svd_is_exact_at_full_rank_and_optimal_when_truncated(tmp_path, experts):
    merge_experts(expert_dirs(experts), tmp_path / "exact")
    merge_experts(expert_dirs(experts), tmp_path / "full", method="svd", options={"rank": 10})
    merge_experts(expert_dirs(experts), tmp_path / "low", method="svd", options={"rank": 3})
    exact, full, low = (read_lora(tmp_path / d) for d in ("exact", "full", "low"))
    assert set(low.ranks.values()) == {3}
    for name in exact.layers:
        target = exact.delta(name)
        torch.testing.assert_close(full.delta(name), target, atol=1e-5, rtol=0)
        discarded = torch.linalg.svdvals(target.double())[3:]
        error = (low.delta(name) - target).norm().item()
        assert error == pytest.approx(discarded.norm().item(), rel=1e-4, abs=1e-6)


def test_incompatible_experts_raise_a_named_error(tmp_path, base_unet, experts):
    narrow = Expert(base_unet, tmp_path / "narrow", r=4, alpha=4, seed=1, targets=["to_q", "to_k"])
    with pytest.raises(MergeError, match="'coco' and 'narrow'"):
        merge_experts({"coco": experts["coco"].dir, "narrow": narrow.dir}, tmp_path / "out")

    other_shape = tiny_unet({**SD_UNET, "cross_attention_dim": 48})
    wide = Expert(other_shape, tmp_path / "wide", r=4, alpha=4, seed=1)
    with pytest.raises(MergeError, match="'coco' and 'wide' differ in shape"):
        merge_experts({"coco": experts["coco"].dir, "wide": wide.dir}, tmp_path / "out")

    elsewhere = Expert(base_unet, tmp_path / "elsewhere", r=4, alpha=4, seed=1, base_model="tiny/other")
    with pytest.raises(MergeError, match="different base models.*elsewhere"):
        merge_experts({"coco": experts["coco"].dir, "elsewhere": elsewhere.dir}, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_truncated_expert_file_names_the_file(tmp_path, experts):
    broken = tmp_path / "broken"
    broken.mkdir()
    data = (experts["coco"].dir / WEIGHT_NAME).read_bytes()
    (broken / WEIGHT_NAME).write_bytes(data[: len(data) - 100])
    with pytest.raises(LoraFormatError, match=str(broken)):
        merge_experts({"coco": experts["coco"].dir, "broken": broken}, tmp_path / "out")
    with pytest.raises(LoraFormatError, match="missing_expert"):
        merge_experts({"coco": experts["coco"].dir, "gone": tmp_path / "missing_expert"}, tmp_path / "out")


def test_sdxl_unet_round_trips_through_save_read_merge_and_load(tmp_path):
    base = tiny_unet(SDXL_UNET)
    sdxl_experts = {
        "coco": Expert(base, tmp_path / "coco", r=4, alpha=8, seed=1, base_model="tiny/sdxl"),
        "whoops": Expert(base, tmp_path / "whoops", r=3, alpha=3, seed=2, base_model="tiny/sdxl"),
    }
    for expert in sdxl_experts.values():
        adapter = read_lora(expert.dir)
        assert adapter.layers.keys() == expert.factors.keys() and len(adapter.layers) == 64
        for name, (A, B) in expert.factors.items():
            assert torch.equal(adapter.layers[name].A, A) and torch.equal(adapter.layers[name].B, B)

    pipe = pipeline_around(copy.deepcopy(base))
    generator = torch.Generator().manual_seed(0)
    inputs = dict(
        sample=torch.randn(1, 4, 16, 16, generator=generator), timestep=10,
        encoder_hidden_states=torch.randn(1, 5, 64, generator=generator),
        added_cond_kwargs={
            "text_embeds": torch.randn(1, 32, generator=generator),
            "time_ids": torch.randn(1, 6, generator=generator),
        },
    )
    with torch.no_grad():
        before = pipe.unet(**inputs).sample
        pipe.load_lora_weights(sdxl_experts["coco"].dir)
        assert (pipe.unet(**inputs).sample - before).abs().max() > 1e-2

    report = merge_experts(expert_dirs(sdxl_experts), tmp_path / "merged", weights={"coco": 1, "whoops": 1})
    assert report["ranks"]["merged"] == [7] and report["base_model"] == "tiny/sdxl"
    fused = fused_weights(base, tmp_path / "merged")
    assert fused.keys() == sdxl_experts["coco"].factors.keys()
    for name, weight in fused.items():
        expected = base.get_submodule(name).weight.detach() + sum(e.delta(name) for e in sdxl_experts.values()) / 2
        torch.testing.assert_close(weight, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_merged_lora_loads_into_a_saved_tiny_pipeline(tmp_path, family):
    from diffusers import DiffusionPipeline

    from selma.models.tiny import build_tiny_pipeline

    model_dir = build_tiny_pipeline(tmp_path / "model", family=family, resolution=32)
    base = DiffusionPipeline.from_pretrained(model_dir).unet
    family_experts = {
        name: Expert(base, tmp_path / name, r=4, alpha=8, seed=seed, base_model=str(model_dir))
        for seed, name in enumerate(("coco", "whoops"))
    }
    merge_experts(expert_dirs(family_experts), tmp_path / "merged")

    def image(pipe):
        generator = torch.Generator().manual_seed(0)
        return pipe("a red apple", num_inference_steps=2, generator=generator, output_type="pt").images

    pipe = DiffusionPipeline.from_pretrained(model_dir)
    before = image(pipe)
    pipe.load_lora_weights(tmp_path / "merged")
    assert (image(pipe) - before).abs().max() > 1e-3, "the merged LoRA did not change the image"
    pipe.fuse_lora()
    for name in family_experts["coco"].factors:
        expected = base.get_submodule(name).weight.detach() + sum(e.delta(name) for e in family_experts.values()) / 2
        fused = pipe.unet.get_submodule(name).base_layer.weight.detach()
        torch.testing.assert_close(fused, expected, atol=1e-5, rtol=0)
