"""An expert's exported steps: where they lie in a run directory, which training steps get one, and
which one ``train.select`` picks for the merge stage.

    RUN/experts/<name>/                           the final expert (the LoRA after train.max_steps)
    RUN/experts/<name>/checkpoints/step-000006/   the LoRA after 6 steps, in the same format, + step.json

The train stage writes (:mod:`selma.train.checkpoints`), the merge stage reads: both find a step here.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from selma.core.errors import ConfigError

if TYPE_CHECKING:
    from selma.core.config import TrainConfig

CHECKPOINTS_DIR = "checkpoints"
STEP_FILE = "step.json"  # {"step": N, "loss": the training loss at step N}
LAST = "last"
_STEP_DIR = re.compile(r"step-(\d+)")
_SELECT = re.compile(r"step:([1-9]\d*)")


def checkpoint_relative(expert: str, step: int) -> str:
    """The run-relative folder of ``expert``'s LoRA at ``step``."""
    return f"experts/{expert}/{CHECKPOINTS_DIR}/step-{step:06d}"


def step_of_folder(name: str) -> int | None:
    """6 for ``step-000006``; None for a folder that is no step's."""
    match = _STEP_DIR.fullmatch(name)
    return int(match.group(1)) if match else None


def parse_select(value: str) -> int | None:
    """``train.select``: None for ``last`` (the final experts), N for ``step:N``; ValueError otherwise."""
    if value == LAST:
        return None
    match = _SELECT.fullmatch(value) if isinstance(value, str) else None
    if not match:
        raise ValueError("must be 'last' or 'step:N' with N a step number ≥ 1, e.g. step:500")
    return int(match.group(1))


def checkpoint_steps(max_steps: int, every: int) -> list[int]:
    """The steps at which an expert's LoRA is exported: every ``every`` steps, and the last one."""
    return sorted({*range(every, max_steps + 1, every), max_steps})


def check_select(train: TrainConfig) -> None:
    """``train.select`` names a step that training will export (a ConfigError naming the field if not)."""
    step = parse_select(train.select)
    if step is None or step in checkpoint_steps(train.max_steps, train.checkpoint_every):
        return
    raise ConfigError(
        f"train.select: no checkpoint is written at step {step}; checkpoints are written every "
        f"train.checkpoint_every={train.checkpoint_every} steps and at train.max_steps={train.max_steps}, "
        f"e.g. {', '.join(map(str, _nearby(step, train)))}")


def _nearby(step: int, train: TrainConfig) -> list[int]:
    steps = checkpoint_steps(train.max_steps, train.checkpoint_every)
    return sorted(sorted(steps, key=lambda s: abs(s - step))[:3])
