"""Shared base of the reward scorers: ``RewardScorer``, ``RewardWeightsError`` and helpers.

Helpers shared by the scorer modules: weights resolution (a folder, a file or a ``tiny:`` spec),
state-dict loading (``.safetensors``, or torch files read with ``torch.load(weights_only=True)``:
nothing is unpickled beyond tensors and plain containers) and strict loading of converted state
dicts into models built on the meta device, image loading and CLIP's image transform.
torch / PIL / transformers are imported inside the functions, never at module level (cheap import:
selma.config loads ``REWARD_SCORERS``; tests/eval/test_rewards.py checks that no heavy library loads).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from selma.core.models import resolve_model
from selma.models.tiny import is_tiny_spec

if TYPE_CHECKING:
    import PIL.Image
    import torch

DEFAULT_BATCH_SIZE = 16
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
CLIP_TOKENIZER_FILES = ("tokenizer.json", "vocab.json")


class RewardWeightsError(FileNotFoundError):
    """A scorer's weights folder is missing or lacks files; names the scorer, path and files."""

    def __init__(self, scorer: str, path: str | Path, expected: str, detail: str = ""):
        self.scorer, self.path, self.expected, self.detail = scorer, str(path), expected, detail
        message = f"{scorer}: no usable weights at {path}"
        if detail:
            message += f" ({detail})"
        message += f". Expected: {expected}"
        super().__init__(message)

    def __reduce__(self):  # picklable (Ray ships exceptions between processes)
        return type(self), (self.scorer, self.path, self.expected, self.detail)


# --------------------------------------------------------------------------- shared helpers


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _resolve_weights(weights: str | Path) -> Path:
    if isinstance(weights, str) and is_tiny_spec(weights):
        weights = resolve_model(weights)
    return Path(weights).expanduser()


def _first_existing(folder: Path, names: Sequence[str]) -> Path | None:
    for name in names:
        if (folder / name).is_file():
            return folder / name
    return None


def _as_pil(image) -> "PIL.Image.Image":
    from PIL import Image

    if isinstance(image, Image.Image):
        return image
    if isinstance(image, (str, Path)):
        with Image.open(image) as opened:
            opened.load()
            return opened.copy()
    raise TypeError(f"expected a PIL image or an image path, got {type(image).__name__}")


def load_state_dict_file(path: Path) -> dict[str, "torch.Tensor"]:
    """Tensors of a ``.safetensors`` file, or of a torch file (``weights_only=True``).

    A torch file may hold the state dict itself or wrap it as ``{"state_dict": ...}`` (HPS).
    """
    import torch

    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # an unsafe pickle, a truncated download, not a torch file
        raise ValueError(
            f"cannot read {path} as a weights-only torch checkpoint ({type(error).__name__}: {error}); "
            "arbitrary pickled objects are not loaded: re-save the state dict with torch.save or as .safetensors"
        ) from error
    if isinstance(checkpoint, dict) and isinstance(checkpoint.get("state_dict"), dict):
        checkpoint = checkpoint["state_dict"]
    if not isinstance(checkpoint, dict) or not all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        raise ValueError(f"{path} does not hold a state dict of tensors")
    return dict(checkpoint)


def load_converted_state_dict(model: "torch.nn.Module", state_dict: dict, what: str) -> None:
    """Load ``state_dict`` (float32) into ``model`` built on the meta device; every tensor must match.

    Raises ValueError listing missing keys (model tensors the checkpoint does not fill),
    unexpected keys (checkpoint tensors the model does not use) or shape mismatches.
    """
    import torch

    state_dict = {k: (v.float() if v.is_floating_point() else v).contiguous() for k, v in state_dict.items()}
    expected = dict(model.state_dict())
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    mismatched = [f"{k}: checkpoint {tuple(state_dict[k].shape)} != model {tuple(t.shape)}"
                  for k, t in expected.items() if k in state_dict and tuple(state_dict[k].shape) != tuple(t.shape)]
    if missing or unexpected or mismatched:
        def _head(items):
            return ", ".join(items[:8]) + (f", ... ({len(items)} in all)" if len(items) > 8 else "")

        problems = []
        if missing:
            problems.append(f"missing {_head(missing)}")
        if unexpected:
            problems.append(f"unexpected {_head(unexpected)}")
        if mismatched:
            problems.append(f"shape mismatch {_head(mismatched)}")
        raise ValueError(f"{what}: checkpoint does not match the model architecture: " + "; ".join(problems))
    model.load_state_dict(state_dict, strict=True, assign=True)
    leftover = [name for name, tensor in list(model.named_parameters()) + list(model.named_buffers())
                if tensor.device == torch.device("meta")]
    if leftover:
        raise ValueError(f"{what}: tensors left unset after loading: {', '.join(leftover[:8])}")


def _empty_model(factory):
    """Build a model with parameters on the meta device (no random init); buffers stay real."""
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        return factory()


def _tensor_image(image: "PIL.Image.Image") -> "torch.Tensor":
    """torchvision's ``ToTensor`` for an 8-bit RGB image: float CHW in [0, 1]."""
    import numpy as np
    import torch

    array = np.asarray(image, dtype=np.uint8)
    if array.ndim == 2:
        array = array[:, :, None]
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div(255)


def _normalize(tensor: "torch.Tensor", mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD) -> "torch.Tensor":
    import torch

    mean = torch.tensor(mean, dtype=tensor.dtype).view(-1, 1, 1)
    std = torch.tensor(std, dtype=tensor.dtype).view(-1, 1, 1)
    return (tensor - mean) / std


def clip_resize_center_crop(image: "PIL.Image.Image", size: int) -> "torch.Tensor":
    """CLIP's / ImageReward's ``_transform(size)``, as torchvision computes it on a PIL image.

    ``Resize(size, BICUBIC)`` (shorter side to ``size``, longer side truncated), ``CenterCrop``
    (offsets rounded as torchvision does), then RGB, ``ToTensor`` and ``Normalize``.
    """
    from PIL import Image

    width, height = image.size
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = size, int(size * long / short)
    new_width, new_height = (new_short, new_long) if width <= height else (new_long, new_short)
    if (new_width, new_height) != (width, height):
        image = image.resize((new_width, new_height), Image.Resampling.BICUBIC)
    top = int(round((new_height - size) / 2.0))
    left = int(round((new_width - size) / 2.0))
    image = image.crop((left, top, left + size, top + size))
    return _normalize(_tensor_image(image.convert("RGB")))



# --------------------------------------------------------------------------- the scorer base class


class RewardScorer:
    """Scores image-prompt pairs; higher is better. Subclasses load their model in ``_load``."""

    name: str = ""
    expected_files: str = ""

    def __init__(self, weights: str | Path, *, device: str | None = None, batch_size: int = DEFAULT_BATCH_SIZE):
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.weights = _resolve_weights(weights)
        self.device = device or default_device()
        self.batch_size = batch_size
        self._load()

    def _missing(self, detail: str = "") -> RewardWeightsError:
        return RewardWeightsError(self.name, self.weights, self.expected_files, detail)

    def _folder(self) -> Path:
        if not self.weights.exists():
            raise self._missing("the path does not exist")
        return self.weights if self.weights.is_dir() else self.weights.parent

    def _load(self) -> None:
        raise NotImplementedError

    def _score_batch(self, images: list, prompts: list[str]) -> list[float]:
        raise NotImplementedError

    def score(self, images: Sequence["PIL.Image.Image"], prompts: Sequence[str]) -> list[float]:
        """One float per (image, prompt) pair, in order. Images may also be file paths."""
        import torch

        images, prompts = list(images), list(prompts)
        if len(images) != len(prompts):
            raise ValueError(f"{self.name}: {len(images)} images but {len(prompts)} prompts")
        for prompt in prompts:
            if not isinstance(prompt, str):
                raise TypeError(f"{self.name}: prompts must be strings, got {type(prompt).__name__}")
        scores: list[float] = []
        with torch.inference_mode():
            for start in range(0, len(images), self.batch_size):
                batch = [_as_pil(image) for image in images[start:start + self.batch_size]]
                scores.extend(float(s) for s in self._score_batch(batch, prompts[start:start + self.batch_size]))
        return scores

    def __repr__(self) -> str:
        return f"{type(self).__name__}(weights={str(self.weights)!r}, device={self.device!r})"

