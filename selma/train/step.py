"""LoRA fine-tuning of a diffusion UNet (Ray-free core): model loading, LoRA, the loss, the optimizer step.

LoRA goes on the UNet attention projections (``to_q, to_k, to_v, to_out.0``); VAE and text
encoder(s) are frozen. The loss is the plain noise-prediction MSE against the scheduler's
``prediction_type`` target (``epsilon`` or ``v_prediction``), optionally Min-SNR-γ weighted and on
offset noise (:mod:`selma.train.recipe`). SDXL-family UNets also receive pooled text embeddings and
``add_time_ids`` (original size, crop corner, target size).

:class:`LoraTrainStep` owns everything after the forward pass: the optimizer over the LoRA weights and
its learning-rate schedule, gradient clipping, gradient accumulation, DDP or DeepSpeed (ZeRO), and
checkpoints (LoRA, optimizer, schedule, step count, RNG state). It runs in a plain process as well as
in a Ray Train worker.

Every setting comes from a run config's ``train`` section (:class:`selma.core.config.TrainConfig`,
plain pydantic); outside a run, build one, e.g. ``TrainConfig(rank=4, alpha=4, strategy="ddp")``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from selma.core.models import resolve_model
from selma.images.generator import load_pipeline
from selma.train.recipe import build_lr_scheduler, build_optimizer, noise_prediction_loss, sample_noise

# torch, diffusers, peft and deepspeed are imported where used: the pipeline imports every stage
# module, the vLLM venv that runs the prompt stage has no diffusers or peft, and deepspeed is optional.

if TYPE_CHECKING:
    from selma.core.config import TrainConfig


def peft_lora_config(train: TrainConfig):
    """The peft ``LoraConfig`` of ``train``'s rank, alpha, initialisation and target modules."""
    from peft import LoraConfig

    init = True if train.init_lora_weights == "default" else train.init_lora_weights
    return LoraConfig(r=train.rank, lora_alpha=train.alpha, init_lora_weights=init,
                      target_modules=list(train.target_modules))


@dataclass
class TrainingComponents:
    unet: Any
    vae: Any
    text_encoders: list
    noise_scheduler: Any
    is_sdxl: bool
    device: str
    weight_dtype: Any

    def lora_parameters(self) -> list:
        return [p for p in self.unet.parameters() if p.requires_grad]


def weight_dtype_for(mixed_precision: str):
    import torch

    return {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[mixed_precision]


def load_training_components(model: str, train: TrainConfig, *, device: str = "cpu",
                             vae: str | None = None) -> TrainingComponents:
    """Frozen VAE/text encoders in ``train.mixed_precision`` and a UNet carrying a fresh fp32 LoRA adapter
    (with gradient checkpointing when ``train.gradient_checkpointing``); ``vae`` replaces the model's VAE."""
    import torch
    from diffusers import DDPMScheduler

    dtype = weight_dtype_for(train.mixed_precision)
    pipe = load_pipeline(model, dtype="float32", device="cpu", vae=vae)
    unet, vae = pipe.unet, pipe.vae
    text_encoders = [e for e in (pipe.text_encoder, getattr(pipe, "text_encoder_2", None)) if e is not None]
    for module in [unet, vae, *text_encoders]:
        module.requires_grad_(False)
        module.eval()
    _check_lora_fits(unet, train, model)
    unet.add_adapter(peft_lora_config(train))
    for module in [unet, vae, *text_encoders]:
        module.to(device, dtype=dtype)
    for parameter in unet.parameters():
        if parameter.requires_grad:
            parameter.data = parameter.data.to(torch.float32)
    if train.gradient_checkpointing:
        unet.enable_gradient_checkpointing()  # non-reentrant: LoRA weights get gradients with frozen inputs
    unet.train()
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    return TrainingComponents(unet, vae, text_encoders, scheduler, hasattr(pipe, "text_encoder_2"), device, dtype)


def _check_lora_fits(unet, train: TrainConfig, model: str, *, linear_only: bool = False) -> None:
    """Named errors for target modules the UNet lacks and for a rank wider than a targeted layer."""
    import torch

    targets = {m: [] for m in train.target_modules}
    for name, module in unet.named_modules():
        for suffix in targets:
            if name == suffix or name.endswith("." + suffix):
                targets[suffix].append(module)
    missing = [m for m, found in targets.items() if not found]
    if missing:
        raise ValueError(f"train.target_modules {missing} do not exist in the UNet of {model}")
    if linear_only:
        other = sorted({f"{m} ({type(x).__name__})" for m, found in targets.items() for x in found
                        if not isinstance(x, torch.nn.Linear)})
        if other:
            raise ValueError(f"train.target_modules: {other} are not Linear layers; selma's LoRA files "
                             "(and the merge methods) hold LoRA on Linear layers only")
    widths = [min(m.in_features, m.out_features) for found in targets.values() for m in found
              if isinstance(m, torch.nn.Linear)]
    if widths and train.rank > min(widths):
        raise ValueError(f"train.rank={train.rank} exceeds the narrowest targeted layer of {model} "
                         f"({min(widths)} features); a rank above a layer's width adds nothing")


def check_lora_targets(model: str, train: TrainConfig) -> None:
    """Preflight for the train stage, on a weightless (meta-device) UNet built from the model's config:
    the targets exist, are Linear layers (what an expert file can hold) and are at least ``rank`` wide."""
    import torch
    from diffusers import UNet2DConditionModel

    config = UNet2DConditionModel.load_config(resolve_model(model), subfolder="unet")
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config)
    _check_lora_fits(unet, train, model, linear_only=True)


def encode_text(components: TrainingComponents, batch: dict) -> tuple[Any, dict]:
    """encoder_hidden_states and, for SDXL, added_cond_kwargs."""
    import torch

    encoders = components.text_encoders
    with torch.no_grad():
        if not components.is_sdxl:
            return encoders[0](batch["input_ids"])[0], {}
        hidden, pooled = [], None
        for encoder, key in zip(encoders, ("input_ids", "input_ids_2")):
            output = encoder(batch[key], output_hidden_states=True)
            hidden.append(output.hidden_states[-2])
            pooled = output[0]  # the projection model's pooled text_embeds
        time_ids = batch["add_time_ids"].to(components.weight_dtype)
        return torch.cat(hidden, dim=-1), {"text_embeds": pooled, "time_ids": time_ids}


def diffusion_loss(components: TrainingComponents, batch: dict, generator=None, unet=None, *,
                   noise_offset: float = 0.0, snr_gamma: float | None = None):
    """Noise-prediction MSE for one batch of ``pixel_values`` in [-1, 1] plus token ids; with
    ``snr_gamma`` Min-SNR-γ weighted, with ``noise_offset`` on offset noise (:mod:`selma.train.recipe`).

    A batch may instead carry ``latent_moments`` (the VAE's latent distribution: mean and log-variance
    stacked on the channel axis, as ``selma.train.cache`` stores it) or ``latents`` (already scaled by
    the VAE's ``scaling_factor``), and
    ``encoder_hidden_states`` (plus ``text_embeds`` and ``add_time_ids`` for SDXL): the frozen encoders
    are then skipped. ``unet`` overrides ``components.unet`` for the forward pass (a DDP or DeepSpeed
    wrapper of it).
    """
    import torch

    vae, scheduler = components.vae, components.noise_scheduler
    unet = unet if unet is not None else components.unet
    if "latent_moments" in batch:  # cached: the VAE's latent distribution, sampled here as vae.encode's would be
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

        moments = batch["latent_moments"].to(components.device, components.weight_dtype)
        latents = DiagonalGaussianDistribution(moments).sample(generator) * vae.config.scaling_factor
    elif "latents" in batch:
        latents = batch["latents"].to(components.device, components.weight_dtype)
    else:
        pixels = batch["pixel_values"].to(components.device, components.weight_dtype)
        with torch.no_grad():
            latents = vae.encode(pixels).latent_dist.sample(generator) * vae.config.scaling_factor
    noise = sample_noise(latents, generator, noise_offset)
    timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],),
                              device=latents.device, generator=generator)
    noisy = scheduler.add_noise(latents, noise, timesteps)
    prediction_type = scheduler.config.prediction_type
    if prediction_type == "epsilon":
        target = noise
    elif prediction_type == "v_prediction":
        target = scheduler.get_velocity(latents, noise, timesteps)
    else:
        raise ValueError(f"unsupported prediction_type {prediction_type!r}")
    if "encoder_hidden_states" in batch:
        hidden = batch["encoder_hidden_states"].to(components.device, components.weight_dtype)
        added = {"text_embeds": batch["text_embeds"].to(components.device, components.weight_dtype),
                 "time_ids": batch["add_time_ids"].to(components.device, components.weight_dtype)} if components.is_sdxl else {}
    else:
        hidden, added = encode_text(components, batch)
    model_output = unet(noisy, timesteps, hidden, added_cond_kwargs=added or None).sample
    return noise_prediction_loss(model_output, target, scheduler, timesteps, snr_gamma)


def lora_state_dict(unet) -> dict:
    """The trainable LoRA tensors of a UNet (unwrapped), keyed as peft names them."""
    from peft.utils import get_peft_model_state_dict

    return {k: v.detach().to("cpu").contiguous() for k, v in get_peft_model_state_dict(unet).items()}


def load_lora_state_dict(unet, state: dict) -> None:
    from peft.utils import set_peft_model_state_dict

    result = set_peft_model_state_dict(unet, state)
    unexpected = getattr(result, "unexpected_keys", None)
    if unexpected:
        raise ValueError(f"checkpoint has LoRA tensors this UNet lacks: {unexpected[:5]}")


def deepspeed_config(train: TrainConfig) -> dict:
    return {
        "train_micro_batch_size_per_gpu": train.batch_size,
        "gradient_accumulation_steps": train.gradient_accumulation_steps,
        "gradient_clipping": train.max_grad_norm,
        "zero_optimization": {"stage": train.zero_stage},
        "bf16": {"enabled": train.mixed_precision == "bf16"},
        "fp16": {"enabled": train.mixed_precision == "fp16"},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        # The optimizer is ours (train.optimizer); ZeRO refuses ones it has not tested, as bitsandbytes' without this.
        "zero_allow_untested_optimizer": train.optimizer != "adamw",
    }


def uses_autocast(train: TrainConfig) -> bool:
    """Whether the train step runs under torch autocast (mixed precision without DeepSpeed, which
    casts by itself); anything computing what the step would compute must do the same."""
    return train.mixed_precision != "no" and train.strategy != "deepspeed"


class LoraTrainStep:
    """One expert's optimisation: ``train_micro_batch`` until ``step`` reaches the target.

    Under DeepSpeed a process group must exist (Ray Train makes one; in a plain process
    :func:`init_single_process_group` does). Checkpoints hold the LoRA weights, the optimizer and
    learning-rate schedule state, the optimizer step count and this rank's RNG state, so a resumed
    run draws the same noise and timesteps, at the same learning rates, it would have drawn without
    the interruption.
    """

    def __init__(self, components: TrainingComponents, train: TrainConfig, seed: int):
        import torch

        self.components = components
        self.train_config = train
        self.parameters = components.lora_parameters()
        self.base_optimizer = build_optimizer(self.parameters, train)
        self.engine = None
        if train.strategy == "deepspeed":
            import deepspeed

            # DeepSpeed steps the schedule at each accumulation boundary and keeps it in its checkpoints.
            self.engine, self.optimizer, _, self.lr_scheduler = deepspeed.initialize(
                model=components.unet, optimizer=self.base_optimizer, config=deepspeed_config(train),
                lr_scheduler=lambda optimizer: build_lr_scheduler(optimizer, train), dist_init_required=False)
            self.model = self.engine
        elif train.strategy == "ddp":
            self.optimizer = self.base_optimizer
            self.lr_scheduler = build_lr_scheduler(self.optimizer, train)
            self.model = _wrap_ddp(components.unet, components.device)
        else:
            raise ValueError(f"unknown train.strategy {train.strategy!r}; expected 'deepspeed' or 'ddp'")
        device = torch.device(components.device)
        self.generator = torch.Generator(device=device).manual_seed(seed)
        self.autocast = torch.autocast(device.type, dtype=components.weight_dtype, enabled=uses_autocast(train))
        # fp16 gradients underflow without loss scaling (DeepSpeed scales its own; bf16 needs none).
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.engine is None and train.mixed_precision == "fp16")
        self.step = 0
        self._micro_steps = 0
        self.grad_norm: float | None = None  # the last optimizer step's gradient norm, before clipping
        self._last_lr: float | None = None

    @property
    def current_lr(self) -> float:
        """The learning rate the latest optimizer step used (before any step: the one the next will use)."""
        return self._last_lr if self._last_lr is not None else self._scheduled_lr()

    def _scheduled_lr(self) -> float:
        return float(self.lr_scheduler.get_last_lr()[0])

    def train_micro_batch(self, batch: dict) -> tuple[float, bool]:
        """Forward, backward and (at an accumulation boundary) an optimizer step.

        Returns the micro-batch loss and whether an optimizer step happened.
        """
        import torch

        train = self.train_config
        with self.autocast:
            loss = diffusion_loss(self.components, batch, self.generator, unet=self.model,
                                  noise_offset=train.noise_offset, snr_gamma=train.snr_gamma)
        self._micro_steps += 1
        if self.engine is not None:
            boundary = self.engine.is_gradient_accumulation_boundary()
            if boundary:
                self._last_lr = self._scheduled_lr()
            self.engine.backward(loss)
            self.engine.step()
            if boundary:  # None where DeepSpeed's optimizer does not compute it (ZeRO 0 in fp32)
                norm = self.engine.get_global_grad_norm()
                self.grad_norm = None if norm is None else float(norm)
        else:
            self.scaler.scale(loss / train.gradient_accumulation_steps).backward()
            boundary = self._micro_steps % train.gradient_accumulation_steps == 0
            if boundary:
                self.scaler.unscale_(self.optimizer)
                self.grad_norm = float(torch.nn.utils.clip_grad_norm_(self.parameters, train.max_grad_norm))
                self._last_lr = self._scheduled_lr()
                self.scaler.step(self.optimizer)  # skipped (and the scale lowered) when a gradient overflowed
                self.scaler.update()
                self.lr_scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
        if boundary:
            self.step += 1
        return loss.item(), boundary

    def lora_state_dict(self) -> dict:
        """The full fp32 LoRA tensors (gathered across ranks under ZeRO-3); call on every rank."""
        import torch

        if self.engine is not None and self.train_config.zero_stage == 3:
            from deepspeed.utils import safe_get_full_fp32_param
            from peft.utils import get_peft_model_state_dict

            names = get_peft_model_state_dict(self.components.unet).keys()
            full = {}
            for name, parameter in self.components.unet.named_parameters():
                if parameter.requires_grad:
                    full[name] = safe_get_full_fp32_param(parameter).detach().to("cpu").contiguous()
            return {key: full[_parameter_name(key, full)] for key in names}
        return {k: v.to(torch.float32) for k, v in lora_state_dict(self.components.unet).items()}

    def save_checkpoint(self, directory, rank: int) -> None:
        """Every rank calls this with its own directory (the directories may be merged afterwards)."""
        from pathlib import Path

        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_file({"generator": self.generator.get_state()}, str(directory / f"rng-rank{rank}.safetensors"))
        if self.engine is not None:
            self.engine.save_checkpoint(str(directory), tag="deepspeed", exclude_frozen_parameters=True)
        elif rank == 0:
            import torch

            save_file(lora_state_dict(self.components.unet), str(directory / "lora.safetensors"))
            torch.save(self.optimizer.state_dict(), directory / "optimizer.pt")
            torch.save(self.lr_scheduler.state_dict(), directory / "lr_scheduler.pt")
            if self.scaler.is_enabled():
                torch.save(self.scaler.state_dict(), directory / "grad_scaler.pt")
        if rank == 0:
            import json

            (directory / "step.json").write_text(json.dumps({"step": self.step}))

    def load_checkpoint(self, directory, rank: int) -> None:
        import json
        from pathlib import Path

        from safetensors.torch import load_file

        directory = Path(directory)
        if self.engine is not None:
            self.engine.load_checkpoint(str(directory), tag="deepspeed", load_module_strict=False)
        else:
            import torch

            load_lora_state_dict(self.components.unet, load_file(str(directory / "lora.safetensors")))
            # weights_only: plain tensors and numbers, nothing else is unpickled
            self.optimizer.load_state_dict(torch.load(directory / "optimizer.pt", weights_only=True))
            if (directory / "lr_scheduler.pt").exists():  # checkpoints before schedules: constant, nothing to restore
                self.lr_scheduler.load_state_dict(torch.load(directory / "lr_scheduler.pt", weights_only=True))
            if self.scaler.is_enabled() and (directory / "grad_scaler.pt").exists():
                self.scaler.load_state_dict(torch.load(directory / "grad_scaler.pt", weights_only=True))
        rng = directory / f"rng-rank{rank}.safetensors"
        if rng.exists():
            self.generator.set_state(load_file(str(rng))["generator"])
        self.step = json.loads((directory / "step.json").read_text())["step"]
        self._micro_steps = self.step * self.train_config.gradient_accumulation_steps


def _parameter_name(peft_key: str, names: dict) -> str:
    """The ``named_parameters`` name of a peft state-dict key (which drops the adapter name)."""
    stem = peft_key.rsplit(".", 1)[0]
    for name in names:
        if name.startswith(stem + ".") and name.endswith(".weight"):
            return name
    raise KeyError(peft_key)


def _wrap_ddp(unet, device: str):
    import torch
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized() or dist.get_world_size() == 1:
        return unet
    device_ids = [torch.device(device).index or 0] if device.startswith("cuda") else None
    return torch.nn.parallel.DistributedDataParallel(unet, device_ids=device_ids)


def init_single_process_group(device: str = "cpu") -> None:
    """A one-rank process group for DeepSpeed outside a launcher (benchmarks, notebooks).

    Sets the variables a launcher would (``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_*``);
    DeepSpeed checks ``LOCAL_RANK`` even when the group exists.
    """
    import os
    import socket

    import torch.distributed as dist

    if dist.is_initialized():
        return
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(port)}.items():
        os.environ.setdefault(key, value)
    dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
