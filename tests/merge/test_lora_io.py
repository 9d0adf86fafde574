"""selma.merge.lora_io: what we write loads in plain diffusers with the right scaling, and reads back exactly."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from selma.merge.lora_io import (
    CONFIG_NAME,
    WEIGHT_NAME,
    LoraAdapter,
    LoraFormatError,
    LoraLayer,
    read_lora,
    save_unet_lora,
    write_lora,
)

TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def tiny_unet(seed: int = 0):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=32,
    ).eval()


def sd_pipeline(unet):
    """A StableDiffusionPipeline around ``unet``: LoRA loading only touches the UNet (and text encoder)."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    scheduler = DDIMScheduler(steps_offset=1, clip_sample=False)
    return StableDiffusionPipeline(
        vae=None, text_encoder=None, tokenizer=None, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def add_random_lora(unet, *, r: int, alpha: float, seed: int, targets=TARGETS, **config):
    """A LoRA with random non-zero A and B (a fresh adapter has B = 0, which would hide scaling bugs)."""
    from peft import LoraConfig

    unet.add_adapter(LoraConfig(r=r, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=targets, **config))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in unet.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
    return unet


def peft_factors(unet, adapter_name: str = "default") -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{module path: (A, B)} straight from the peft layers, independent of lora_io."""
    from peft.tuners.lora import LoraLayer as PeftLoraLayer

    return {
        name: (module.lora_A[adapter_name].weight.detach().clone(), module.lora_B[adapter_name].weight.detach().clone())
        for name, module in unet.named_modules()
        if isinstance(module, PeftLoraLayer) and adapter_name in module.lora_A
    }


def unet_output(unet) -> torch.Tensor:
    generator = torch.Generator().manual_seed(123)
    sample = torch.randn(2, 4, 16, 16, generator=generator)
    context = torch.randn(2, 5, 32, generator=generator)
    with torch.no_grad():
        return unet(sample, 10, encoder_hidden_states=context).sample


def fused_weight(unet, name: str) -> torch.Tensor:
    module = unet.get_submodule(name)
    return getattr(module, "base_layer", module).weight.detach()


@pytest.fixture(scope="module")
def base_unet():
    return tiny_unet()


@pytest.mark.parametrize("rank, alpha", [(4, 4), (4, 8), (4, 1.5)])
def test_saved_lora_loads_in_diffusers_with_its_scaling(tmp_path, base_unet, rank, alpha):
    trained = add_random_lora(copy.deepcopy(base_unet), r=rank, alpha=alpha, seed=1)
    factors = peft_factors(trained)
    save_unet_lora(trained, tmp_path, base_model="tiny/sd")

    pipe = sd_pipeline(copy.deepcopy(base_unet))
    before = unet_output(pipe.unet)
    pipe.load_lora_weights(tmp_path)
    after = unet_output(pipe.unet)
    assert (after - before).abs().max() > 1e-2, "loading the LoRA did not change the UNet output"
    torch.testing.assert_close(after, unet_output(trained), atol=1e-5, rtol=1e-5)

    pipe.fuse_lora()
    assert len(factors) == 32  # 4 transformer blocks × 2 attentions × 4 projections
    for name, (A, B) in factors.items():
        expected = base_unet.get_submodule(name).weight.detach() + (alpha / rank) * (B @ A)
        torch.testing.assert_close(fused_weight(pipe.unet, name), expected, atol=1e-5, rtol=0)


def test_read_lora_returns_exactly_the_peft_weights(tmp_path, base_unet):
    trained = add_random_lora(copy.deepcopy(base_unet), r=4, alpha=8, seed=2)
    path = save_unet_lora(trained, tmp_path, base_model="tiny/sd", extra_metadata={"skill": "coco", "steps": 5})
    assert path == tmp_path / WEIGHT_NAME

    adapter = read_lora(tmp_path)
    factors = peft_factors(trained)
    assert set(adapter.layers) == set(factors)
    for name, (A, B) in factors.items():
        layer = adapter.layers[name]
        assert torch.equal(layer.A, A) and torch.equal(layer.B, B)
        assert (layer.rank, layer.alpha) == (4, 8.0)
        torch.testing.assert_close(adapter.delta(name), 2.0 * B @ A)
    assert sorted(adapter.target_modules) == sorted(TARGETS)
    assert adapter.base_model == "tiny/sd"
    assert adapter.metadata == {"skill": "coco", "steps": 5}
    assert read_lora(path).layers.keys() == adapter.layers.keys()  # the file itself reads too

    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert (config["r"], config["lora_alpha"], config["base_model_name_or_path"]) == (4, 8, "tiny/sd")
    assert sorted(config["target_modules"]) == sorted(TARGETS)
    from peft import LoraConfig

    assert LoraConfig(**config).lora_alpha == 8  # a valid peft config


def test_fp32_lora_on_bf16_unet(tmp_path, base_unet):
    trained = add_random_lora(copy.deepcopy(base_unet).to(torch.bfloat16), r=4, alpha=8, seed=3)
    for name, param in trained.named_parameters():
        if "lora_" in name:  # what diffusers' cast_training_params does for mixed-precision training
            param.data = param.data.float()
    factors = peft_factors(trained)
    assert next(iter(factors.values()))[0].dtype == torch.float32
    save_unet_lora(trained, tmp_path)

    adapter = read_lora(tmp_path)
    for name, (A, B) in factors.items():
        assert adapter.layers[name].A.dtype == torch.float32
        assert torch.equal(adapter.layers[name].A, A) and torch.equal(adapter.layers[name].B, B)

    pipe = sd_pipeline(copy.deepcopy(base_unet))
    pipe.load_lora_weights(tmp_path)
    pipe.fuse_lora()
    name, (A, B) = next(iter(factors.items()))
    expected = base_unet.get_submodule(name).weight.detach() + 2.0 * B @ A
    torch.testing.assert_close(fused_weight(pipe.unet, name), expected, atol=1e-5, rtol=0)


def test_peft_wrapped_unet_saves_the_same_layers(tmp_path, base_unet):
    from peft import LoraConfig, get_peft_model

    wrapped = get_peft_model(copy.deepcopy(base_unet), LoraConfig(r=2, lora_alpha=2, target_modules=TARGETS))
    with torch.no_grad():
        for name, param in wrapped.named_parameters():
            if "lora_B" in name:
                param.fill_(0.05)
    save_unet_lora(wrapped, tmp_path)
    adapter = read_lora(tmp_path)
    factors = peft_factors(wrapped.base_model.model)
    assert set(adapter.layers) == set(factors)
    for name, (A, B) in factors.items():
        assert torch.equal(adapter.layers[name].A, A) and torch.equal(adapter.layers[name].B, B)

    pipe = sd_pipeline(copy.deepcopy(base_unet))
    before = unet_output(pipe.unet)
    pipe.load_lora_weights(tmp_path)
    assert (unet_output(pipe.unet) - before).abs().max() > 1e-3


def test_write_lora_with_per_layer_ranks_and_alphas(tmp_path, base_unet):
    names = sorted(peft_factors(add_random_lora(copy.deepcopy(base_unet), r=1, alpha=1, seed=0)))
    generator = torch.Generator().manual_seed(4)
    layers = {}
    for index, name in enumerate(names):
        weight = base_unet.get_submodule(name).weight
        rank = (2, 3, 5)[index % 3]
        alpha = (2.0, 7.0, 0.5, 3.0)[index % 4]
        layers[name] = LoraLayer(
            A=torch.randn(rank, weight.shape[1], generator=generator),
            B=torch.randn(weight.shape[0], rank, generator=generator),
            alpha=alpha,
        )
    write_lora(LoraAdapter(layers=layers), tmp_path, base_model="tiny/sd")

    back = read_lora(tmp_path)
    assert back.base_model == "tiny/sd"
    for name, layer in layers.items():
        assert torch.equal(back.layers[name].A, layer.A) and torch.equal(back.layers[name].B, layer.B)
        assert back.layers[name].alpha == layer.alpha

    pipe = sd_pipeline(copy.deepcopy(base_unet))
    pipe.load_lora_weights(tmp_path)
    pipe.fuse_lora()
    for name, layer in layers.items():
        expected = base_unet.get_submodule(name).weight.detach() + (layer.alpha / layer.rank) * layer.B @ layer.A
        torch.testing.assert_close(fused_weight(pipe.unet, name), expected, atol=1e-5, rtol=0)


def test_reads_a_file_written_by_diffusers_own_save_lora_weights(tmp_path, base_unet):
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    trained = add_random_lora(copy.deepcopy(base_unet), r=4, alpha=2, seed=5)
    StableDiffusionPipeline.save_lora_weights(
        tmp_path,
        unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(trained)),
        unet_lora_adapter_metadata=trained.peft_config["default"].to_dict(),
    )
    adapter = read_lora(tmp_path)
    for name, (A, B) in peft_factors(trained).items():
        assert torch.equal(adapter.layers[name].B, B)
        torch.testing.assert_close(adapter.delta(name), 0.5 * B @ A)

    # Without the metadata header diffusers applies alpha = rank (scaling 1), and read_lora agrees.
    no_header = tmp_path / "no_header"
    StableDiffusionPipeline.save_lora_weights(
        no_header, unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(trained))
    )
    adapter = read_lora(no_header)
    pipe = sd_pipeline(copy.deepcopy(base_unet))
    pipe.load_lora_weights(no_header)
    pipe.fuse_lora()
    for name, (A, B) in peft_factors(trained).items():
        assert adapter.layers[name].alpha == adapter.layers[name].rank == 4
        expected = base_unet.get_submodule(name).weight.detach() + adapter.delta(name)
        torch.testing.assert_close(fused_weight(pipe.unet, name), expected, atol=1e-5, rtol=0)


def test_rslora_scaling_is_read_as_an_equivalent_plain_alpha(tmp_path, base_unet):
    trained = add_random_lora(copy.deepcopy(base_unet), r=4, alpha=8, seed=7, use_rslora=True)
    save_unet_lora(trained, tmp_path / "rslora")
    adapter = read_lora(tmp_path / "rslora")
    write_lora(adapter, tmp_path / "plain")
    for directory in ("rslora", "plain"):
        pipe = sd_pipeline(copy.deepcopy(base_unet))
        pipe.load_lora_weights(tmp_path / directory)
        pipe.fuse_lora()
        for name, (A, B) in peft_factors(trained).items():
            torch.testing.assert_close(adapter.delta(name), 4.0 * B @ A)  # alpha / sqrt(r) = 8 / 2
            expected = base_unet.get_submodule(name).weight.detach() + 4.0 * B @ A
            torch.testing.assert_close(fused_weight(pipe.unet, name), expected, atol=1e-5, rtol=0)


def test_missing_or_truncated_files_raise_a_named_error(tmp_path, base_unet):
    missing = tmp_path / "nowhere"
    with pytest.raises(LoraFormatError, match="nowhere"):
        read_lora(missing)

    good = tmp_path / "good"
    path = save_unet_lora(add_random_lora(copy.deepcopy(base_unet), r=2, alpha=2, seed=6), good)
    data = path.read_bytes()
    for size in (len(data) // 2, len(data) - 1, 5, 0):
        broken = tmp_path / f"cut{size}"
        broken.mkdir()
        (broken / WEIGHT_NAME).write_bytes(data[:size])
        with pytest.raises(LoraFormatError, match=f"cut{size}"):
            read_lora(broken)

    pickled = tmp_path / "pickled.bin"
    torch.save({"x": torch.zeros(1)}, pickled)
    with pytest.raises(LoraFormatError, match="safetensors"):
        read_lora(pickled)


def test_unsupported_adapters_are_refused(tmp_path, base_unet):
    from peft import LoraConfig

    unet = copy.deepcopy(base_unet)
    unet.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=TARGETS, use_dora=True))
    with pytest.raises(LoraFormatError, match="use_dora"):
        save_unet_lora(unet, tmp_path)
    with pytest.raises(LoraFormatError, match="no peft LoRA adapter"):
        save_unet_lora(copy.deepcopy(base_unet), tmp_path)

    rank_two = add_random_lora(copy.deepcopy(base_unet), r=2, alpha=2, seed=8)
    with pytest.raises(LoraFormatError, match="has rank 2 but the LoraConfig says 4"):
        save_unet_lora(rank_two, tmp_path, lora_config=LoraConfig(r=4, lora_alpha=4, target_modules=TARGETS))
    assert not (tmp_path / WEIGHT_NAME).exists()
