"""The training recipe's options, Ray-free on the tiny model: gradient checkpointing, learning-rate
schedules, Min-SNR-γ weighting, noise offset and the optimizer. Each changes what it should and, at
its default, nothing at all."""

import importlib.util
import math

import pytest
import torch
import torch.nn.functional as F

from selma.config import load_config
from selma.core.errors import ConfigError
from selma.train.experts import preflight_train
from selma.train.recipe import min_snr_weights, sample_noise
from selma.train.step import LoraTrainStep, diffusion_loss, init_single_process_group, load_training_components
from tests.train.test_step import _batch, _train_config

HAS_BITSANDBYTES = importlib.util.find_spec("bitsandbytes") is not None


# --------------------------------------------------------------------------- the train hash


def test_each_option_enters_the_train_hash_only_once_set():
    """At their defaults the options leave the hash as runs recorded it (tests/core/test_config_resources.py
    holds those hashes); set, each makes the train stage stale, but gradient checkpointing, which
    recomputes the same activations (so it can be switched on to resume a run that ran out of memory)."""
    base = load_config("tiny").section_hash("model", "train")
    assert load_config("tiny", ["train.optimizer=adamw", "train.lr_scheduler=constant", "train.lr_warmup_steps=0",
                                "train.snr_gamma=null", "train.noise_offset=0", "train.gradient_checkpointing=false"]
                       ).section_hash("model", "train") == base
    changed = [["train.optimizer=adamw_8bit"], ["train.lr_scheduler=cosine"],
               ["train.lr_scheduler=constant_with_warmup", "train.lr_warmup_steps=2"], ["train.snr_gamma=5"],
               ["train.noise_offset=0.05"]]
    hashes = {load_config("tiny", overrides).section_hash("model", "train") for overrides in changed}
    assert base not in hashes and len(hashes) == len(changed)
    assert load_config("tiny", ["train.gradient_checkpointing=true"]).section_hash("model", "train") == base


# --------------------------------------------------------------------------- gradient checkpointing


def _lora_gradients_and_block_calls(checkpointing: bool, batch: dict) -> tuple[dict, tuple[int, int]]:
    """The LoRA gradients of one loss, and how often a LoRA-carrying transformer block of the UNet
    started a forward pass (during the forward pass, and in all including the backward pass)."""
    torch.manual_seed(0)
    components = load_training_components("tiny:sd", _train_config(gradient_checkpointing=checkpointing))
    assert components.unet.is_gradient_checkpointing == checkpointing
    block = components.unet.down_blocks[1].attentions[0].transformer_blocks[0]
    calls = []
    block.register_forward_pre_hook(lambda module, args: calls.append(1))
    loss = diffusion_loss(components, batch, torch.Generator().manual_seed(3))
    in_forward = len(calls)
    loss.backward()
    gradients = {name: p.grad.clone() for name, p in components.unet.named_parameters() if p.requires_grad}
    return gradients, (in_forward, len(calls))


def test_gradient_checkpointing_recomputes_in_backward_and_keeps_the_lora_gradients():
    batch = _batch("tiny:sd", 2)
    plain, plain_calls = _lora_gradients_and_block_calls(False, batch)
    checkpointed, checkpointed_calls = _lora_gradients_and_block_calls(True, batch)
    assert plain_calls == (1, 1)
    assert checkpointed_calls[0] == 1 and checkpointed_calls[1] > 1  # the block ran again during the backward pass
    assert sorted(plain) == sorted(checkpointed)
    assert any(float(g.abs().sum()) > 0 for g in plain.values())
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-5, atol=1e-7)


# --------------------------------------------------------------------------- learning-rate schedules


def _expected_lr(schedule: str, step: int, *, lr: float, warmup: int, total: int) -> float:
    """The learning rate optimizer step ``step`` (1-based) uses, by the schedules' formulas."""
    done = step - 1  # scheduler steps taken before this optimizer step
    if schedule == "constant":
        return lr
    if done < warmup:
        return lr * done / warmup
    progress = (done - warmup) / max(1, total - warmup)
    return lr * {"constant_with_warmup": 1.0, "linear": max(0.0, 1.0 - progress),
                 "cosine": 0.5 * (1.0 + math.cos(math.pi * progress))}[schedule]


def _run_schedule(train, steps: int, checkpoint_dir=None, resume_at: int | None = None) -> tuple[list[float], dict]:
    """The learning rate of each of ``steps`` optimizer steps, and the final LoRA weights; with
    ``resume_at``, the run stops there, saves a checkpoint and goes on in a fresh trainer."""
    batch = _batch("tiny:sd", 2)  # first: building the tiny model, once per session, draws from torch's RNG
    torch.manual_seed(0)
    components = load_training_components("tiny:sd", train)
    trainer = LoraTrainStep(components, train, seed=5)
    rates = []
    while trainer.step < steps:
        _, stepped = trainer.train_micro_batch(batch)
        if stepped:
            rates.append(trainer.current_lr)
        if resume_at is not None and trainer.step == resume_at and stepped:
            trainer.save_checkpoint(checkpoint_dir, rank=0)
            torch.manual_seed(1)
            components = load_training_components("tiny:sd", train)
            trainer = LoraTrainStep(components, train, seed=99)
            trainer.load_checkpoint(checkpoint_dir, rank=0)
    return rates, {k: v.float() for k, v in trainer.lora_state_dict().items()}


@pytest.mark.parametrize("schedule", ["constant", "constant_with_warmup", "linear", "cosine"])
def test_the_learning_rate_follows_the_schedule_once_per_optimizer_step(schedule):
    """Two micro-batches per optimizer step: the schedule counts optimizer steps, not micro-batches."""
    warmup = 0 if schedule == "constant" else 3
    train = _train_config(learning_rate=1e-3, effective_batch_size=4, max_steps=8, lr_scheduler=schedule,
                          lr_warmup_steps=warmup)
    rates, _ = _run_schedule(train, 8)
    expected = [_expected_lr(schedule, step, lr=1e-3, warmup=warmup, total=8) for step in range(1, 9)]
    assert rates == pytest.approx(expected, rel=1e-6, abs=1e-12)


def test_a_warmup_step_at_learning_rate_zero_leaves_the_lora_weights_unchanged():
    """The scheduled rate is the one the optimizer applies: diffusers' warm-up starts at 0."""
    torch.manual_seed(0)
    train = _train_config(max_steps=10, lr_scheduler="constant_with_warmup", lr_warmup_steps=4)
    components = load_training_components("tiny:sd", train)
    trainer = LoraTrainStep(components, train, seed=0)
    before = {k: v.clone() for k, v in trainer.lora_state_dict().items()}
    trainer.train_micro_batch(_batch("tiny:sd", 2))
    assert trainer.current_lr == 0.0
    assert all(torch.equal(before[k], v) for k, v in trainer.lora_state_dict().items())
    trainer.train_micro_batch(_batch("tiny:sd", 2))
    assert trainer.current_lr == pytest.approx(train.learning_rate / 4)
    assert any(not torch.equal(before[k], v) for k, v in trainer.lora_state_dict().items())


@pytest.mark.parametrize("strategy", ["ddp", "deepspeed"])
def test_a_resumed_run_continues_the_schedule(tmp_path, strategy):
    if strategy == "deepspeed":
        init_single_process_group("cpu")
    train = _train_config(learning_rate=1e-3, max_steps=6, lr_scheduler="cosine", lr_warmup_steps=2, strategy=strategy)
    straight_rates, straight = _run_schedule(train, 6)
    resumed_rates, resumed = _run_schedule(train, 6, tmp_path / "ckpt", resume_at=3)
    expected = [_expected_lr("cosine", step, lr=1e-3, warmup=2, total=6) for step in range(1, 7)]
    assert straight_rates == pytest.approx(expected, rel=1e-6, abs=1e-12)
    assert resumed_rates == pytest.approx(expected, rel=1e-6, abs=1e-12)
    for key in straight:
        torch.testing.assert_close(resumed[key], straight[key])


def test_deepspeed_uses_the_optimizer_and_schedule_it_is_given():
    init_single_process_group("cpu")
    torch.manual_seed(0)
    train = _train_config(strategy="deepspeed", max_steps=4, lr_scheduler="linear", lr_warmup_steps=1)
    trainer = LoraTrainStep(load_training_components("tiny:sd", train), train, seed=0)
    assert trainer.engine.basic_optimizer is trainer.base_optimizer
    assert trainer.engine.optimizer.optimizer is trainer.base_optimizer  # inside the ZeRO wrapper
    assert trainer.engine.lr_scheduler is trainer.lr_scheduler
    assert trainer.lr_scheduler.optimizer is trainer.base_optimizer


def test_warmup_is_checked_against_max_steps_and_the_schedule():
    with pytest.raises(ConfigError, match=r"lr_warmup_steps \(10\) must be less than max_steps \(10\)"):
        load_config("tiny", ["train.max_steps=10", "train.lr_scheduler=linear", "train.lr_warmup_steps=10"])
    with pytest.raises(ConfigError, match="lr_warmup_steps: the constant schedule has no warm-up"):
        load_config("tiny", ["train.lr_warmup_steps=5"])
    with pytest.raises(ConfigError, match="train.lr_scheduler"):
        load_config("tiny", ["train.lr_scheduler=exponential"])
    assert load_config("tiny", ["train.max_steps=10", "train.lr_scheduler=cosine",
                                "train.lr_warmup_steps=9"]).train.lr_warmup_steps == 9


# --------------------------------------------------------------------------- the loss: Min-SNR-γ and noise offset


def _reference_loss(components, batch: dict, seed: int, *, noise_offset: float = 0.0, snr_gamma: float | None = None):
    """The loss written out independently of selma.train: the same draws in the same order
    (latents, noise, the offset, timesteps); Min-SNR weights from alphas_cumprod directly.
    Returns the loss and the SNR of each sample's timestep."""
    generator = torch.Generator().manual_seed(seed)
    scheduler, vae = components.noise_scheduler, components.vae
    with torch.no_grad():
        latents = vae.encode(batch["pixel_values"]).latent_dist.sample(generator) * vae.config.scaling_factor
        noise = torch.randn(latents.shape, generator=generator)
        if noise_offset:
            noise = noise + noise_offset * torch.randn((latents.shape[0], latents.shape[1], 1, 1), generator=generator)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],), generator=generator)
        noisy = scheduler.add_noise(latents, noise, timesteps)
        hidden = components.text_encoders[0](batch["input_ids"])[0]
        output = components.unet(noisy, timesteps, hidden).sample
    velocity = scheduler.config.prediction_type == "v_prediction"
    target = scheduler.get_velocity(latents, noise, timesteps) if velocity else noise
    alpha_bar = scheduler.alphas_cumprod[timesteps].double()
    snr = alpha_bar / (1 - alpha_bar)
    if snr_gamma is None:
        return F.mse_loss(output.float(), target.float()), snr
    weights = torch.clamp(snr, max=snr_gamma) / (snr + 1 if velocity else snr)
    per_sample = ((output.double() - target.double()) ** 2).mean(dim=(1, 2, 3))
    return (per_sample * weights).mean(), snr


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_min_snr_weighting_and_its_default_plain_mse(prediction_type):
    torch.manual_seed(0)
    components = load_training_components("tiny:sd", _train_config())
    components.noise_scheduler.register_to_config(prediction_type=prediction_type)
    batch = _batch("tiny:sd", 4)
    with torch.no_grad():
        for seed in (1, 2):
            plain = diffusion_loss(components, batch, torch.Generator().manual_seed(seed))
            expected_plain, snr = _reference_loss(components, batch, seed)
            assert torch.equal(plain, expected_plain)  # bit for bit
            assert torch.equal(diffusion_loss(components, batch, torch.Generator().manual_seed(seed), snr_gamma=None),
                               plain)
            gamma = float(snr.median())  # γ between the drawn timesteps' SNRs: some samples are clipped, some not
            weighted = diffusion_loss(components, batch, torch.Generator().manual_seed(seed), snr_gamma=gamma)
            expected, _ = _reference_loss(components, batch, seed, snr_gamma=gamma)
            assert weighted.item() == pytest.approx(expected.item(), rel=1e-5)
            assert weighted.item() != pytest.approx(plain.item(), rel=1e-3)


def test_min_snr_weights_at_known_timesteps():
    torch.manual_seed(0)
    scheduler = load_training_components("tiny:sd", _train_config()).noise_scheduler
    timesteps = torch.tensor([0, 100, 500, 999])
    alpha_bar = scheduler.alphas_cumprod[timesteps].double()
    snr = alpha_bar / (1 - alpha_bar)
    assert snr[0] > 5 > snr[-1]  # both sides of γ
    epsilon = min_snr_weights(scheduler, timesteps, 5.0).double()
    torch.testing.assert_close(epsilon, torch.clamp(snr, max=5.0) / snr, rtol=1e-5, atol=0)
    scheduler.register_to_config(prediction_type="v_prediction")
    velocity = min_snr_weights(scheduler, timesteps, 5.0).double()
    torch.testing.assert_close(velocity, torch.clamp(snr, max=5.0) / (snr + 1), rtol=1e-5, atol=0)


def test_noise_offset_adds_one_constant_per_sample_and_channel_and_zero_draws_nothing_more():
    latents = torch.zeros(3, 4, 8, 8)
    plain_generator, offset_generator = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    plain = sample_noise(latents, plain_generator, 0.0)
    assert torch.equal(plain, torch.randn(latents.shape, generator=torch.Generator().manual_seed(0)))
    assert torch.equal(plain_generator.get_state(), _generator_after_one_draw(latents.shape).get_state())
    offset = sample_noise(latents, offset_generator, 0.1) - plain
    per_channel = offset[:, :, :1, :1]
    torch.testing.assert_close(offset, per_channel.expand_as(offset), rtol=0, atol=1e-6)  # constant over the image
    assert float(per_channel.abs().min()) > 0 and per_channel.flatten().unique().numel() == 12
    expected = 0.1 * torch.randn((3, 4, 1, 1), generator=_generator_after_one_draw(latents.shape))
    torch.testing.assert_close(per_channel, expected, rtol=1e-5, atol=1e-7)


def _generator_after_one_draw(shape) -> torch.Generator:
    generator = torch.Generator().manual_seed(0)
    torch.randn(shape, generator=generator)
    return generator


def test_noise_offset_reaches_the_loss_and_zero_leaves_it_identical():
    torch.manual_seed(0)
    components = load_training_components("tiny:sd", _train_config())
    batch = _batch("tiny:sd", 2)
    with torch.no_grad():
        zero = diffusion_loss(components, batch, torch.Generator().manual_seed(4), noise_offset=0.0)
        assert torch.equal(zero, _reference_loss(components, batch, 4)[0])
        offset = diffusion_loss(components, batch, torch.Generator().manual_seed(4), noise_offset=0.1)
        assert torch.equal(offset, _reference_loss(components, batch, 4, noise_offset=0.1)[0])
        assert offset.item() != zero.item()


def test_the_train_step_passes_its_loss_options():
    """LoraTrainStep's loss is the config's: the same micro-batch loss as diffusion_loss with those options."""
    batch = _batch("tiny:sd", 2)
    losses = {}
    for options in ({}, {"snr_gamma": 0.01}, {"noise_offset": 0.1}):  # γ 0.01: nearly every timestep is clipped
        torch.manual_seed(0)
        train = _train_config(**options)
        components = load_training_components("tiny:sd", train)
        with torch.no_grad():
            expected = diffusion_loss(components, batch, torch.Generator().manual_seed(8), **options).item()
        losses[tuple(options)] = LoraTrainStep(components, train, seed=8).train_micro_batch(batch)[0]
        assert losses[tuple(options)] == pytest.approx(expected, rel=1e-6)
    assert len(set(losses.values())) == 3


# --------------------------------------------------------------------------- the optimizer


@pytest.mark.skipif(HAS_BITSANDBYTES, reason="bitsandbytes is installed: the error path cannot happen")
def test_adamw_8bit_without_bitsandbytes_fails_the_preflight_naming_the_field():
    config = load_config("tiny", ["train.optimizer=adamw_8bit"])
    with pytest.raises(ConfigError, match=r"train.optimizer: adamw_8bit needs bitsandbytes.*pip install 'selma\[bnb\]'"):
        preflight_train(config)
    preflight_train(load_config("tiny"))
    torch.manual_seed(0)
    train = _train_config(optimizer="adamw_8bit")
    with pytest.raises(ConfigError, match="train.optimizer"):
        LoraTrainStep(load_training_components("tiny:sd", train), train, seed=0)


def test_the_default_optimizer_is_torch_adamw_with_the_configured_settings():
    torch.manual_seed(0)
    train = _train_config(learning_rate=2e-4, weight_decay=0.03, adam_beta2=0.99)
    trainer = LoraTrainStep(load_training_components("tiny:sd", train), train, seed=0)
    assert type(trainer.optimizer) is torch.optim.AdamW
    group = trainer.optimizer.param_groups[0]
    assert (group["lr"], group["weight_decay"], group["betas"]) == (2e-4, 0.03, (0.9, 0.99))


@pytest.mark.gpu
@pytest.mark.parametrize("strategy", ["ddp", "deepspeed"])
def test_adamw_8bit_trains_on_a_gpu(strategy):
    bitsandbytes = pytest.importorskip("bitsandbytes")
    if strategy == "deepspeed":
        init_single_process_group("cuda")
    torch.manual_seed(0)
    train = _train_config(optimizer="adamw_8bit", strategy=strategy, learning_rate=1e-3)
    preflight_train(load_config("tiny", ["train.optimizer=adamw_8bit"]))
    trainer = LoraTrainStep(load_training_components("tiny:sd", train, device="cuda"), train, seed=0)
    assert isinstance(trainer.base_optimizer, bitsandbytes.optim.AdamW8bit)
    if strategy == "deepspeed":
        assert trainer.engine.optimizer.optimizer is trainer.base_optimizer
    before = {k: v.clone() for k, v in trainer.lora_state_dict().items()}
    for _ in range(2):
        loss, stepped = trainer.train_micro_batch(_batch("tiny:sd", 2))
        assert stepped and math.isfinite(loss)
    assert any(not torch.equal(before[k], v) for k, v in trainer.lora_state_dict().items())
    assert any("state1" in state for state in trainer.base_optimizer.state.values())  # bitsandbytes' own step ran


@pytest.mark.parametrize("strategy, zero_stage", [("ddp", 2), ("deepspeed", 3)])
def test_gradient_checkpointing_trains_to_the_same_weights(strategy, zero_stage):
    """Two optimizer steps with and without checkpointing, the same seeds: the same LoRA weights,
    also under ZeRO-3, which gathers the partitioned weights again when the recomputation runs."""
    if strategy == "deepspeed":
        init_single_process_group("cpu")
    batch = _batch("tiny:sd", 2)
    weights = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        train = _train_config(learning_rate=1e-3, strategy=strategy, zero_stage=zero_stage,
                              gradient_checkpointing=checkpointing)
        trainer = LoraTrainStep(load_training_components("tiny:sd", train), train, seed=2)
        for _ in range(2):
            trainer.train_micro_batch(batch)
        weights.append({k: v.float() for k, v in trainer.lora_state_dict().items()})
    assert any(float(v.abs().sum()) > 0 for k, v in weights[0].items() if "lora_B" in k)
    for key in weights[0]:
        torch.testing.assert_close(weights[1][key], weights[0][key], rtol=1e-4, atol=1e-6)
