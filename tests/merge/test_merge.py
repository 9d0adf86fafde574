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


def _three_experts(unet, root, first_seed: int) -> dict:
    """coco (r 4, alpha 4), whoops (r 4, alpha 8), countbench (r 2, alpha 1): scalings 1, 2 and 0.5."""
    specs = {"coco": (4, 4), "whoops": (4, 8), "countbench": (2, 1)}
    return {
        name: Expert(unet, root / name, r=r, alpha=alpha, seed=index + first_seed)
        for index, (name, (r, alpha)) in enumerate(specs.items())
    }


@pytest.fixture(scope="module")
def experts(base_unet, tmp_path_factory):
    """Three experts with different ranks and alphas (scalings 1, 2 and 0.5)."""
    return _three_experts(base_unet, tmp_path_factory.mktemp("experts"), first_seed=10)


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


# ----------------------------------------------------------------------------------------- every method

ALL_METHODS = ["delta_mean", "cat", "ab_mean", "svd", "ties", "dare_linear", "dare_ties", "magnitude_prune"]
DENSE_METHODS = ["ties", "dare_linear", "dare_ties", "magnitude_prune"]
WIDE_UNET = {**SD_UNET, "cross_attention_dim": 48}  # to_k/to_v: 32×48 (in > out) and, in the mid block, 64×48


@pytest.fixture(scope="module")
def wide_unet():
    return tiny_unet(WIDE_UNET, seed=3)


@pytest.fixture(scope="module")
def wide_experts(wide_unet, tmp_path_factory):
    """Three experts of different ranks and scalings on a UNet with non-square attention projections."""
    return _three_experts(wide_unet, tmp_path_factory.mktemp("wide"), first_seed=20)


def top_magnitude_mask(delta: torch.Tensor, density: float) -> torch.Tensor:
    k = int(density * delta.numel())
    threshold = delta.abs().flatten().sort(descending=True).values[k - 1]
    return delta.abs() >= threshold


def dare_mask(shape, density: float, seed: int, layer: str, index: int) -> torch.Tensor:
    from selma.merge.methods import dare_seed

    state = torch.get_rng_state()
    torch.manual_seed(dare_seed(seed, layer, index))
    mask = torch.bernoulli(torch.full(shape, density, dtype=torch.float32)).bool()
    torch.set_rng_state(state)
    return mask


def sign_elected_mean(pruned: list[torch.Tensor], w: torch.Tensor) -> torch.Tensor:
    """The weighted disjoint mean written out: elect sign(Σ w_i Δ_i), average the agreeing entries by weight."""
    stacked = torch.stack(pruned)
    elected = torch.where((w[:, None, None] * stacked).sum(0) >= 0, 1.0, -1.0).double()
    agree = (torch.sign(stacked) == elected).double()
    numerator = (w[:, None, None] * agree * stacked).sum(0)
    denominator = (w[:, None, None] * agree).sum(0)
    safe = torch.where(denominator > 0, denominator, torch.ones_like(denominator))
    return torch.where(denominator > 0, numerator / safe, torch.zeros_like(numerator)) * w.sum()


def reference_delta(method: str, deltas: list[torch.Tensor], weights: list[float], layer: str, options) -> torch.Tensor:
    """Each method's merged delta for one layer, computed from the dense expert deltas in float64."""
    D = [delta.double() for delta in deltas]
    w = torch.tensor(weights, dtype=torch.float64)
    density = options.get("density")
    if method in ("delta_mean", "cat", "svd"):
        return sum(wi * d for wi, d in zip(w, D))
    if method == "magnitude_prune":
        return sum(wi * d * top_magnitude_mask(d, density) for wi, d in zip(w, D))
    if method == "ties":
        return sign_elected_mean([d * top_magnitude_mask(d, density) for d in D], w)
    masks = [dare_mask(d.shape, density, options["seed"], layer, i) for i, d in enumerate(D)]
    dropped = [d * m / density for d, m in zip(D, masks)]
    if method == "dare_linear":
        return sum(wi * d for wi, d in zip(w, dropped))
    assert method == "dare_ties"
    return sign_elected_mean(dropped, w)


def test_registry_offers_every_method_of_the_issue():
    assert set(ALL_METHODS) == set(MERGE_METHODS)


EXACT_CASES = {
    "cat": {},
    "svd": {"rank": 10},  # ≥ Σ r_i = 10: exact
    "ties": {"density": 0.4},
    "dare_linear": {"density": 0.6, "seed": 7},
    "dare_ties": {"density": 0.6, "seed": 7},
    "magnitude_prune": {"density": 0.3},
}


@pytest.mark.parametrize("method", sorted(EXACT_CASES))
def test_every_exact_method_fuses_to_its_explicit_formula(tmp_path, wide_unet, wide_experts, method):
    options = EXACT_CASES[method]
    weights = {"coco": 1.0, "whoops": 3.0, "countbench": 2.0}
    report = merge_experts(expert_dirs(wide_experts), tmp_path, method=method, weights=weights, options=options)
    assert report["exact"] is True and report["options"].items() >= options.items()

    fused = fused_weights(wide_unet, tmp_path)
    assert fused.keys() == wide_experts["coco"].factors.keys()
    shapes = set()
    applied = [w / 6 for w in weights.values()]
    for name, weight in fused.items():
        expected_delta = reference_delta(method, [e.delta(name) for e in wide_experts.values()], applied, name, options)
        expected = wide_unet.get_submodule(name).weight.detach().double() + expected_delta
        torch.testing.assert_close(weight.double(), expected, atol=1e-5, rtol=0)
        shapes.add(tuple(weight.shape))
        layer = report["layers"][name]
        assert layer["norm"] == pytest.approx(expected_delta.norm().item(), rel=1e-5)
        if method in DENSE_METHODS:  # stored exactly at full rank
            assert layer["rank"] == min(weight.shape) and layer["retained_energy"] == 1.0
    assert {(32, 48), (64, 48), (32, 32)} <= shapes  # in > out, out > in and square layers all covered
    if method in DENSE_METHODS:  # a real difference from the plain delta average
        name = "mid_block.attentions.0.transformer_blocks.0.attn2.to_k"
        exact = sum(w * e.delta(name) for w, e in zip(applied, wide_experts.values()))
        assert (fused[name] - wide_unet.get_submodule(name).weight - exact).norm() > 0.05 * exact.norm()


def test_ties_equals_peft_ties_on_the_deltas_when_weights_are_equal(wide_experts):
    from peft.utils.merge_utils import ties as peft_ties

    from selma.merge.methods import merge_adapters

    adapters = {name: read_lora(e.dir) for name, e in wide_experts.items()}
    merged = merge_adapters(adapters, method="ties", options={"density": 0.5})  # weights 1/3 each
    for name in list(wide_experts["coco"].factors)[:8]:
        deltas = [e.delta(name) for e in wide_experts.values()]
        expected = peft_ties(deltas, torch.ones(3), density=0.5)
        torch.testing.assert_close(merged.delta(name), expected, atol=1e-6, rtol=0)


def test_cat_writes_the_factors_of_peft_add_weighted_adapter_cat(tmp_path, base_unet, experts):
    from peft import LoraConfig, LoraModel

    specs = {"coco": (4, 4), "whoops": (4, 8), "countbench": (2, 1)}
    configs = {name: LoraConfig(r=r, lora_alpha=alpha, target_modules=TARGETS) for name, (r, alpha) in specs.items()}
    model = LoraModel(copy.deepcopy(base_unet), configs["coco"], "coco")
    for name in ("whoops", "countbench"):
        model.peft_config[name] = configs[name]
        model.inject_adapter(model.model, name)
    with torch.no_grad():
        for module_name, module in model.model.named_modules():
            if "coco" in getattr(module, "lora_A", {}):
                for name, expert in experts.items():
                    module.lora_A[name].weight.copy_(expert.factors[module_name][0])
                    module.lora_B[name].weight.copy_(expert.factors[module_name][1])
    weights = {"coco": 1 / 6, "whoops": 3 / 6, "countbench": 2 / 6}
    model.add_weighted_adapter(list(weights), list(weights.values()), "merged", combination_type="cat")
    merge_experts(expert_dirs(experts), tmp_path, method="cat", weights=weights)

    ours = read_lora(tmp_path)
    compared = 0
    for module_name, module in model.model.named_modules():
        if "merged" in getattr(module, "lora_A", {}):
            layer = ours.layers[module_name]
            assert torch.equal(module.lora_A["merged"].weight, layer.A)
            assert torch.equal(module.lora_B["merged"].weight, layer.B)
            assert module.scaling["merged"] == layer.scaling == 1.0
            compared += 1
    assert compared == len(ours.layers) == 32


@pytest.mark.parametrize("method", ALL_METHODS)
def test_one_expert_with_weight_one_is_the_identity_for_every_method(tmp_path, base_unet, experts, method):
    whoops = experts["whoops"]
    options = {"density": 1.0} if method in DENSE_METHODS else {}
    merge_experts({"whoops": whoops.dir}, tmp_path, method=method, weights={"whoops": 1.0}, options=options)
    fused = fused_weights(base_unet, tmp_path)
    assert fused.keys() == whoops.factors.keys()
    for name, weight in fused.items():
        expected = base_unet.get_submodule(name).weight.detach() + whoops.delta(name)
        torch.testing.assert_close(weight, expected, atol=1e-5, rtol=0)


def test_dare_masks_are_seeded_keep_about_density_and_leave_the_global_rng_alone(tmp_path, experts):
    coco = experts["coco"]
    state = torch.get_rng_state()
    for seed in (1, 1, 2):
        merge_experts({"coco": coco.dir}, tmp_path / f"seed{seed}", method="dare_linear",
                      weights={"coco": 1.0}, options={"density": 0.3, "seed": seed})
    assert torch.equal(torch.get_rng_state(), state)
    first, again, other = (read_lora(tmp_path / f"seed{seed}") for seed in (1, 1, 2))
    kept = total = 0
    for name in coco.factors:
        delta, merged = coco.delta(name), first.delta(name)
        assert torch.equal(merged, again.delta(name))
        survivors = merged != 0
        torch.testing.assert_close(merged[survivors], delta[survivors] / 0.3, atol=1e-5, rtol=1e-5)
        kept, total = kept + int(survivors.sum()), total + merged.numel()
    assert kept / total == pytest.approx(0.3, abs=0.02)
    assert not all(torch.equal(first.delta(n), other.delta(n)) for n in coco.factors)


def test_truncated_dense_merges_report_the_retained_energy(tmp_path, experts):
    options = {"density": 0.5, "rank": 3}
    truncated = merge_experts(expert_dirs(experts), tmp_path / "low", method="ties", options=options)
    full = merge_experts(expert_dirs(experts), tmp_path / "full", method="ties", options={"density": 0.5})
    low, exact = read_lora(tmp_path / "low"), read_lora(tmp_path / "full")
    assert truncated["exact"] is False and full["exact"] is True and full["retained_energy"] == 1.0
    assert truncated["ranks"]["merged"] == [3]
    kept_total = all_total = 0.0
    for name in exact.layers:
        singular = torch.linalg.svdvals(exact.delta(name).double())
        energy = singular.square()
        error = (low.delta(name) - exact.delta(name)).norm().item()
        assert error == pytest.approx(energy[3:].sum().sqrt().item(), rel=1e-4, abs=1e-6)
        retained = truncated["layers"][name]["retained_energy"]
        assert retained == pytest.approx((energy[:3].sum() / energy.sum()).item(), rel=1e-5)
        kept_total, all_total = kept_total + energy[:3].sum().item(), all_total + energy.sum().item()
    assert truncated["retained_energy"] == pytest.approx(kept_total / all_total, rel=1e-5)
    assert truncated["retained_energy"] < 0.99


def test_svd_reports_its_retained_energy(tmp_path, experts):
    exact_report = merge_experts(expert_dirs(experts), tmp_path / "exact")
    low_report = merge_experts(expert_dirs(experts), tmp_path / "low", method="svd", options={"rank": 3})
    full_report = merge_experts(expert_dirs(experts), tmp_path / "full", method="svd", options={"rank": 10})
    assert exact_report["retained_energy"] is None and exact_report["exact"] is True
    assert full_report["exact"] is True and full_report["retained_energy"] == pytest.approx(1.0)
    assert low_report["exact"] is False
    exact = read_lora(tmp_path / "exact")
    for name, layer in low_report["layers"].items():
        energy = torch.linalg.svdvals(exact.delta(name).double()).square()
        assert layer["retained_energy"] == pytest.approx((energy[:3].sum() / energy.sum()).item(), rel=1e-5)
        assert layer["norm"] == pytest.approx(energy[:3].sum().sqrt().item(), rel=1e-5)


def test_report_has_per_layer_norms_ranks_and_resolved_options(tmp_path, experts):
    report = merge_experts(expert_dirs(experts), tmp_path, method="dare_ties", options={"density": 0.5})
    assert report["options"] == {"density": 0.5, "seed": 0, "majority_sign_method": "total", "rank": None}
    merged = read_lora(tmp_path)
    assert report["layers"].keys() == merged.layers.keys()
    for name, layer in report["layers"].items():
        assert layer["rank"] == merged.layers[name].rank and tuple(layer["shape"]) == merged.layers[name].shape
        assert layer["norm"] == pytest.approx(merged.delta(name).norm().item(), rel=1e-5)
        for expert_name, expert in experts.items():
            assert layer["expert_norms"][expert_name] == pytest.approx(expert.delta(name).norm().item(), rel=1e-5)
    assert read_lora(tmp_path).metadata["merge"]["options"] == report["options"]


def test_options_and_weights_that_do_not_fit_the_method_are_refused_before_writing(tmp_path, experts):
    bad_options = [
        ("ties", {"density": 0}, "density=0"),
        ("ties", {"density": 1.5}, "density=1.5"),
        ("dare_linear", {"seed": 1.5}, "seed=1.5"),
        ("magnitude_prune", {"rank": 0}, "rank=0"),
        ("ties", {"majority_sign_method": "vote"}, "majority_sign_method"),
        ("ties", {"sead": 1}, "does not take options.*accepted"),
        ("dare_ties", {"layer_name": "x"}, "set by the merge itself"),
        ("delta_mean", {"density": 0.5}, "does not take options"),
    ]
    for method, options, message in bad_options:
        with pytest.raises(MergeError, match=message):
            merge_experts(expert_dirs(experts), tmp_path / "bad", method=method, options=options)
    equal_rank = {name: experts[name] for name in ("coco", "whoops")}
    with pytest.raises(MergeError, match="sum to 1.*coco"):
        merge_experts(expert_dirs(equal_rank), tmp_path / "bad", method="ab_mean",
                      weights={"coco": 1, "whoops": 1}, normalize=False)
    with pytest.raises(MergeError, match="coco r=4, whoops r=4, countbench r=2"):
        merge_experts(expert_dirs(experts), tmp_path / "bad", method="ab_mean")
    assert not (tmp_path / "bad").exists()


def test_sdxl_experts_merge_with_a_dense_method(tmp_path):
    base = tiny_unet(SDXL_UNET, seed=5)
    sdxl = {
        "coco": Expert(base, tmp_path / "coco", r=4, alpha=8, seed=1, base_model="tiny/sdxl"),
        "whoops": Expert(base, tmp_path / "whoops", r=3, alpha=3, seed=2, base_model="tiny/sdxl"),
    }
    options = {"density": 0.5}
    merge_experts(expert_dirs(sdxl), tmp_path / "ties", method="ties", options=options)
    fused = fused_weights(base, tmp_path / "ties")
    assert len(fused) == 64
    for name, weight in fused.items():
        expected = base.get_submodule(name).weight.detach().double() + reference_delta(
            "ties", [e.delta(name) for e in sdxl.values()], [0.5, 0.5], name, options)
        torch.testing.assert_close(weight.double(), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("method", ALL_METHODS)
def test_identical_experts_merge_to_the_total_weight_times_their_delta(experts, method):
    """The documented scale convention: N copies of one expert give (Σ w_i)·ΔW (density 1 for pruning methods)."""
    from selma.merge.methods import merge_adapters

    whoops = read_lora(experts["whoops"].dir)
    options = {"density": 1.0} if method in DENSE_METHODS else {}
    normalize = method == "ab_mean"  # an average of factors: its weights must sum to 1
    merged = merge_adapters({"a": whoops, "b": whoops}, method=method, weights={"a": 1.0, "b": 2.0},
                            normalize=normalize, options=options)
    scale = 1.0 if normalize else 3.0
    for name in whoops.layers:
        torch.testing.assert_close(merged.delta(name), scale * whoops.delta(name), atol=1e-5, rtol=1e-5)


def test_dare_seeds_are_a_stable_function_of_seed_layer_and_expert(tmp_path, experts):
    from selma.merge.methods import dare_seed

    assert dare_seed(0, "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", 0) == 3934553510710391681
    seeds = {dare_seed(s, layer, i) for s in (0, 1) for layer in ("x.to_q", "x.to_k") for i in (0, 1)}
    assert len(seeds) == 8
    # two layers of the same shape get different masks
    merge_experts({"coco": experts["coco"].dir}, tmp_path, method="dare_linear", weights={"coco": 1.0},
                  options={"density": 0.5})
    merged = read_lora(tmp_path)
    q, k = (merged.delta(f"down_blocks.0.attentions.0.transformer_blocks.0.attn1.{p}") != 0 for p in ("to_q", "to_k"))
    assert q.shape == k.shape and not torch.equal(q, k)
