"""The train-step core without Ray: LoRA placement, losses for both prediction types, SDXL conditioning."""


import numpy as np
import pytest
import torch
from image_helpers import patterned_png

from selma.core.config import TrainConfig
from selma.train.data import PrepareTrainingBatch
from selma.train.step import (
    LoraTrainStep,
    check_lora_targets,
    diffusion_loss,
    init_single_process_group,
    load_training_components,
    lora_state_dict,
    peft_lora_config,
)


def _train_config(**fields) -> TrainConfig:
    """Rank-4 LoRA, one micro-batch of 2 per optimizer step, plain torch in fp32; ``fields`` change it."""
    return TrainConfig(**{"rank": 4, "alpha": 4, "batch_size": 2, "effective_batch_size": 2, "strategy": "ddp",
                          "mixed_precision": "no", **fields})


LORA = _train_config()


def _batch(model: str, count: int = 4) -> dict:
    colors = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (220, 220, 40)][:count]
    rows = {"image": np.array([patterned_png(c, i) for i, c in enumerate(colors)], dtype=object),
            "prompt": np.array([f"a {name} square on a plain background" for name in ("red", "green", "blue", "yellow")[:count]],
                               dtype=object)}
    prepared, skipped = PrepareTrainingBatch(model, 64, random_crop=False, random_flip=False)(rows)
    assert not skipped
    return {key: torch.from_numpy(value) for key, value in prepared.items()}


def test_lora_goes_on_the_attention_projections_only_and_starts_as_a_no_op():
    torch.manual_seed(0)
    components = load_training_components("tiny:sd", _train_config(init_lora_weights="default"))
    trainable = [name for name, p in components.unet.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name for name in trainable)
    assert {name.split(".lora_")[0].rsplit(".", 1)[-1] for name in trainable} >= {"to_q", "to_k", "to_v"}
    assert any(".to_out.0.lora_" in name for name in trainable)
    assert not any(p.requires_grad for p in components.vae.parameters())
    assert not any(p.requires_grad for e in components.text_encoders for p in e.parameters())
    assert all(float(v.abs().sum()) == 0 for k, v in lora_state_dict(components.unet).items() if "lora_B" in k)


def test_a_target_module_the_unet_lacks_is_a_named_error():
    with pytest.raises(ValueError, match=r"train.target_modules \['to_nothing'\] do not exist"):
        load_training_components("tiny:sd", _train_config(target_modules=["to_q", "to_nothing"]))


def test_v_prediction_uses_the_velocity_target():
    torch.manual_seed(0)
    components = load_training_components("tiny:sd", LORA)
    batch = _batch("tiny:sd", 2)
    epsilon = diffusion_loss(components, batch, torch.Generator().manual_seed(3)).item()
    components.noise_scheduler.register_to_config(prediction_type="v_prediction")
    velocity = diffusion_loss(components, batch, torch.Generator().manual_seed(3)).item()
    assert np.isfinite(velocity) and velocity != pytest.approx(epsilon)
    components.noise_scheduler.register_to_config(prediction_type="sample")
    with pytest.raises(ValueError, match="unsupported prediction_type 'sample'"):
        diffusion_loss(components, batch)


def test_sdxl_conditioning_two_encoders_pooled_embeds_and_time_ids():
    torch.manual_seed(0)
    components = load_training_components("tiny:sdxl", LORA)
    assert components.is_sdxl and len(components.text_encoders) == 2
    batch = _batch("tiny:sdxl", 2)
    assert batch["add_time_ids"].shape == (2, 6)
    assert batch["add_time_ids"][0].tolist() == [64, 64, 0, 0, 64, 64]
    loss = diffusion_loss(components, batch, torch.Generator().manual_seed(0))
    loss.backward()
    assert np.isfinite(loss.item())
    assert any(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in components.lora_parameters())


def _fixed_loss(components, batch, draws: int = 4) -> float:
    with torch.no_grad():
        return float(np.mean([diffusion_loss(components, batch, torch.Generator().manual_seed(100 + i)).item()
                              for i in range(draws)]))


def test_overfitting_four_images_for_30_steps_lowers_the_loss_by_30_percent():
    # A random 2-block UNet cannot become a denoiser through its attention layers alone (their LoRA
    # lowers this loss by ~7% at best: the output convolutions stay random), so this test also
    # targets the convolutions; peft trains them through the same step.
    torch.manual_seed(0)
    train = _train_config(rank=8, alpha=8, learning_rate=1e-3, batch_size=4, effective_batch_size=4,
                          target_modules=["to_q", "to_k", "to_v", "to_out.0", "conv_in", "conv1", "conv2",
                                          "conv_shortcut", "proj_in", "proj_out", "conv_out"])
    components = load_training_components("tiny:sd", train)
    batch = _batch("tiny:sd", 4)
    before = _fixed_loss(components, batch)
    trainer = LoraTrainStep(components, train, seed=1)
    for _ in range(30):
        trainer.train_micro_batch(batch)
    assert trainer.step == 30
    assert _fixed_loss(components, batch) <= 0.7 * before


def _lora_snapshot(components) -> dict:
    return {k: v.clone() for k, v in lora_state_dict(components.unet).items()}


def test_gradient_accumulation_steps_the_optimizer_once_per_effective_batch():
    torch.manual_seed(0)
    components = load_training_components("tiny:sd", LORA)
    batch = _batch("tiny:sd", 2)
    trainer = LoraTrainStep(components, _train_config(effective_batch_size=6), seed=0)
    start = _lora_snapshot(components)
    assert [trainer.train_micro_batch(batch)[1] for _ in range(3)] == [False, False, True]
    assert trainer.step == 1
    after = _lora_snapshot(components)
    assert any(not torch.equal(start[k], after[k]) for k in start)
    trainer.train_micro_batch(batch)
    assert all(torch.equal(after[k], v) for k, v in _lora_snapshot(components).items())


def _train(train: TrainConfig, steps: int, checkpoint_at: int | None, tmp_path) -> dict:
    torch.manual_seed(0)
    components = load_training_components("tiny:sd", train)
    batch = _batch("tiny:sd", 2)
    trainer = LoraTrainStep(components, train, seed=7)
    while trainer.step < (checkpoint_at or steps):
        trainer.train_micro_batch(batch)
    if checkpoint_at is not None:
        trainer.save_checkpoint(tmp_path, rank=0)
        torch.manual_seed(123)  # a fresh process: different init, restored from the checkpoint
        components = load_training_components("tiny:sd", train)
        trainer = LoraTrainStep(components, train, seed=999)
        trainer.load_checkpoint(tmp_path, rank=0)
        assert trainer.step == checkpoint_at
        while trainer.step < steps:
            trainer.train_micro_batch(batch)
    return {k: v.float() for k, v in trainer.lora_state_dict().items()}


def test_a_resumed_run_ends_where_an_uninterrupted_one_does(tmp_path):
    """LoRA, AdamW moments, step count and RNG state all come back from the checkpoint."""
    train = _train_config(learning_rate=1e-3, effective_batch_size=4)
    straight = _train(train, 4, None, tmp_path)
    resumed = _train(train, 4, 2, tmp_path)
    assert sorted(straight) == sorted(resumed)
    for key in straight:
        torch.testing.assert_close(resumed[key], straight[key], rtol=0, atol=0)


@pytest.mark.parametrize("zero_stage", [2, 3])
def test_deepspeed_in_a_plain_process_trains_and_resumes(tmp_path, zero_stage):
    """ZeRO-3 partitions the LoRA weights too: lora_state_dict must gather them whole."""
    init_single_process_group("cpu")
    train = _train_config(learning_rate=1e-3, strategy="deepspeed", zero_stage=zero_stage)
    straight = _train(train, 3, None, tmp_path / "a")
    resumed = _train(train, 3, 1, tmp_path / "b")
    assert (tmp_path / "b" / "deepspeed").is_dir() and (tmp_path / "b" / "step.json").exists()
    reference = _train(_train_config(learning_rate=1e-3), 3, None, tmp_path / "c")
    assert sorted(straight) == sorted(reference)
    for key in straight:
        assert straight[key].shape == reference[key].shape
        torch.testing.assert_close(resumed[key], straight[key])
    assert any(float(v.abs().sum()) > 0 for k, v in straight.items() if "lora_B" in k)


def test_preflight_names_a_missing_module_a_conv_target_and_a_rank_wider_than_a_layer():
    check_lora_targets("tiny:sd", _train_config())
    with pytest.raises(ValueError, match=r"train.target_modules \['to_nothing'\] do not exist"):
        check_lora_targets("tiny:sd", _train_config(target_modules=["to_q", "to_nothing"]))
    with pytest.raises(ValueError, match=r"conv_out \(Conv2d\)'\] are not Linear layers"):
        check_lora_targets("tiny:sd", _train_config(target_modules=["to_q", "conv_out"]))
    with pytest.raises(ValueError, match=r"train.rank=128 exceeds the narrowest targeted layer .* \(32 features\)"):
        check_lora_targets("tiny:sd", _train_config(rank=128, alpha=128))


def _lora_layers(unet, adapter: str = "default") -> dict:
    """{module path: (rank, alpha, scaling)} of every peft LoRA layer of adapter ``adapter``."""
    from peft.tuners.lora import LoraLayer

    return {name: (module.r[adapter], module.lora_alpha[adapter], module.scaling[adapter])
            for name, module in unet.named_modules() if isinstance(module, LoraLayer) and adapter in module.r}


def test_rank_alpha_and_target_modules_go_from_the_config_to_the_trained_and_saved_expert(tmp_path):
    """alpha ≠ rank and non-default targets, through what the train stage runs: ExpertJob.from_config →
    load_training_components → LoraTrainStep → _write_expert, then plain diffusers loads the file."""
    import json

    from selma.config import load_config
    from selma.core.rundir import RunDir
    from selma.images.generator import load_pipeline
    from selma.merge.lora_io import read_lora
    from selma.train.experts import ExpertJob, _write_expert

    config = load_config("tiny", ["train.rank=4", "train.alpha=12", "train.target_modules=[to_k, to_out.0]"])
    targets = {"to_k", "to_out.0"}
    job = ExpertJob.from_config(config, "coco", RunDir(str(tmp_path / "run")), resolution=64)
    assert job.train == config.train and job.skills == ("coco",)
    peft_config = peft_lora_config(job.train)
    assert (peft_config.r, peft_config.lora_alpha, set(peft_config.target_modules)) == (4, 12, targets)

    def suffix(name: str) -> str:
        return "to_out.0" if name.endswith(".to_out.0") else name.rsplit(".", 1)[-1]

    torch.manual_seed(0)
    components = load_training_components(job.model, job.train)
    layers = _lora_layers(components.unet)
    assert {suffix(name) for name in layers} == targets
    assert set(layers.values()) == {(4, 12, 3.0)}  # scaling = alpha / rank
    trainer = LoraTrainStep(components, job.train, seed=0)
    loss, stepped = trainer.train_micro_batch(_batch(job.model, job.train.batch_size))
    assert stepped
    _write_expert(job, trainer.lora_state_dict(), [{"step": 1, "loss": loss}])

    expert = tmp_path / "run" / "experts" / "coco"
    saved = json.loads((expert / "adapter_config.json").read_text())
    assert (saved["r"], saved["lora_alpha"], set(saved["target_modules"])) == (4, 12, targets)
    adapter = read_lora(expert)
    assert {suffix(name) for name in adapter.layers} == targets
    assert {(layer.rank, layer.alpha) for layer in adapter.layers.values()} == {(4, 12.0)}
    pipe = load_pipeline(job.model, dtype="float32", device="cpu")
    pipe.load_lora_weights(str(expert), adapter_name="expert")
    loaded = _lora_layers(pipe.unet, "expert")
    assert {suffix(name) for name in loaded} == targets and set(loaded.values()) == {(4, 12, 3.0)}


def test_fp16_under_ddp_scales_the_loss_and_resumes_the_scale(tmp_path):
    """fp16 gradients underflow without loss scaling: DDP uses torch's GradScaler (DeepSpeed has its
    own; bf16 and fp32 need none), and its scale travels with the checkpoint."""
    fp16 = _train_config(mixed_precision="fp16")
    trainer = LoraTrainStep(load_training_components("tiny:sd", fp16), fp16, seed=0)
    assert trainer.scaler.is_enabled() and trainer.scaler.get_scale() == 2.0**16
    for _ in range(3):
        trainer.train_micro_batch(_batch("tiny:sd", 2))
    assert trainer.step == 3 and trainer.grad_norm is not None
    trainer.scaler.update(1024.0)  # a scale a fresh trainer does not start from
    trainer.save_checkpoint(tmp_path, rank=0)
    resumed = LoraTrainStep(load_training_components("tiny:sd", fp16), fp16, seed=0)
    resumed.load_checkpoint(tmp_path, rank=0)
    assert resumed.scaler.get_scale() == 1024.0
    plain = _train_config(mixed_precision="bf16")
    assert not LoraTrainStep(load_training_components("tiny:sd", plain), plain, seed=0).scaler.is_enabled()
