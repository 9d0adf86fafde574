"""The one place that knows the LoRA file format.

A LoRA directory (``RUN/experts/<skill>/``, ``RUN/merged/``) holds::

    pytorch_lora_weights.safetensors   diffusers format, loads with ``pipe.load_lora_weights(dir)``
    adapter_config.json                the peft ``LoraConfig`` as JSON (with ``base_model_name_or_path``)

Inside the safetensors file (the layout diffusers' ``save_lora_weights`` writes):

* tensors ``unet.<module path>.lora.down.weight`` (A, r×in) and ``unet.<module path>.lora.up.weight``
  (B, out×r), e.g. ``unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_q.lora.down.weight``;
* header ``lora_adapter_metadata``: JSON of the ``LoraConfig`` fields that loading needs, each key
  prefixed ``unet.`` (``unet.r``, ``unet.lora_alpha``, ``unet.rank_pattern``, ``unet.alpha_pattern``,
  ``unet.target_modules``, ``unet.use_rslora``, ``unet.base_model_name_or_path``). diffusers ≥ 0.33
  builds the ``LoraConfig`` from it, so alpha ≠ rank loads with the right scaling. Without this header
  diffusers assumes alpha = rank (scaling 1), and so does :func:`read_lora`;
* header ``selma``: JSON of free-form metadata (skill, training facts, merge provenance);
* header ``format``: ``pt``.

The delta of a layer is ``(alpha / r) · B @ A`` (``alpha / sqrt(r)`` under rsLoRA, which
:func:`read_lora` folds into an equivalent plain alpha). Only LoRA on ``Linear`` layers is handled:
DoRA, LoRA bias, conv LoRA and ``modules_to_save`` are refused with :class:`LoraFormatError`.

Reading: :func:`read_lora` loads a whole adapter; :class:`LoraFile` opens one for reading layer by layer
(header, layer names, shapes, ranks and alphas at once; each layer's tensors only when asked), which is how
:mod:`selma.merge.methods` streams experts without holding them all in memory.
"""

from __future__ import annotations

import json
import math
import os
import re
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from pyarrow.fs import LocalFileSystem, copy_files
from safetensors import SafetensorError, safe_open

from selma.core.errors import InputError

if TYPE_CHECKING:
    import torch

    from selma.core.rundir import RunDir

# peft and safetensors.torch (both import torch) are imported in the functions that use them (cheap
# import): selma.merge.methods imports this module, and selma.config and `selma --help` import that one.

WEIGHT_NAME = "pytorch_lora_weights.safetensors"
CONFIG_NAME = "adapter_config.json"
ADAPTER_FILES = (WEIGHT_NAME, CONFIG_NAME)  # what a LoRA folder needs; it may hold more (checkpoints, images)
UNET_PREFIX = "unet."
DIFFUSERS_METADATA_KEY = "lora_adapter_metadata"  # diffusers.loaders.lora_base.LORA_ADAPTER_METADATA_KEY
SELMA_METADATA_KEY = "selma"
A_SUFFIXES = (".lora.down.weight", ".lora_A.weight")
B_SUFFIXES = (".lora.up.weight", ".lora_B.weight")
# LoraConfig fields written into the safetensors header: what loading needs, and no field that an older
# peft would reject (diffusers calls ``LoraConfig(**header)``).
HEADER_CONFIG_FIELDS = (
    "r",
    "lora_alpha",
    "rank_pattern",
    "alpha_pattern",
    "target_modules",
    "use_rslora",
    "base_model_name_or_path",
)


class LoraFormatError(InputError):
    """A LoRA file or adapter that this module cannot read or write; the message names the path or layer."""


@dataclass
class LoraLayer:
    """One LoRA'd ``Linear``: ``delta = (alpha / rank) · B @ A``."""

    A: "torch.Tensor"  # rank × in_features
    B: "torch.Tensor"  # out_features × rank
    alpha: float

    def __post_init__(self) -> None:
        _check_factor_shapes(self.A, self.B)
        self.alpha = float(self.alpha)
        if not math.isfinite(self.alpha) or self.alpha <= 0:
            raise LoraFormatError(f"LoRA alpha must be positive and finite, got {self.alpha}")

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    @property
    def shape(self) -> tuple[int, int]:
        """(out_features, in_features) of the layer the delta is added to."""
        return int(self.B.shape[0]), int(self.A.shape[1])

    def delta(self) -> "torch.Tensor":
        """The dense fp32 weight update ``(alpha / rank) · B @ A``."""
        return (self.B.float() @ self.A.float()) * self.scaling


def _check_factor_shapes(A: "torch.Tensor", B: "torch.Tensor") -> None:
    _check_shapes(tuple(A.shape), tuple(B.shape))


def _check_shapes(shape_A: tuple[int, ...], shape_B: tuple[int, ...]) -> None:
    if len(shape_A) != 2 or len(shape_B) != 2:
        raise LoraFormatError(f"LoRA factors must be 2-D (Linear layers only), got A {shape_A}, B {shape_B}")
    if shape_B[1] != shape_A[0]:
        raise LoraFormatError(f"LoRA rank mismatch: A {shape_A} and B {shape_B}")


@dataclass
class LoraAdapter:
    """A UNet LoRA: layers keyed by UNet module path (``down_blocks.1.attentions.0.….attn2.to_q``)."""

    layers: dict[str, LoraLayer]
    target_modules: list[str] | str | None = None
    base_model: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    def delta(self, name: str) -> "torch.Tensor":
        return self.layers[name].delta()

    def layer(self, name: str) -> LoraLayer:
        """The layer ``name`` (same call as :meth:`LoraFile.layer`, so merging takes either)."""
        return self.layers[name]

    @property
    def layer_names(self) -> list[str]:
        return sorted(self.layers)

    @property
    def ranks(self) -> dict[str, int]:
        return {name: layer.rank for name, layer in self.layers.items()}

    @property
    def shapes(self) -> dict[str, tuple[int, int]]:
        return {name: layer.shape for name, layer in self.layers.items()}


# ----------------------------------------------------------------------------------------- writing


def save_unet_lora(
    unet,
    out_dir: str | os.PathLike,
    *,
    lora_config=None,
    base_model: str | None = None,
    extra_metadata: dict | None = None,
    adapter_name: str = "default",
) -> Path:
    """Write the peft LoRA adapter carried by ``unet`` (diffusers ``add_adapter`` or a peft wrapper).

    ``lora_config`` defaults to ``unet.peft_config[adapter_name]``. The LoRA tensors keep their dtype
    (fp32 LoRA on a bf16 UNet stays fp32). Returns the path of the weights file.
    """
    from peft.utils import get_peft_model_state_dict

    config = lora_config if lora_config is not None else _peft_config_of(unet, adapter_name)
    state_dict = get_peft_model_state_dict(unet, adapter_name=adapter_name)
    return save_peft_state_dict(state_dict, config, out_dir, base_model=base_model, extra_metadata=extra_metadata)


def save_peft_state_dict(
    state_dict: dict[str, "torch.Tensor"],
    lora_config,
    out_dir: str | os.PathLike,
    *,
    base_model: str | None = None,
    extra_metadata: dict | None = None,
) -> Path:
    """Write a peft-keyed UNet LoRA state dict (``<module>.lora_A.weight`` …), e.g. one gathered from ZeRO-3."""
    _refuse_unsupported_config(lora_config)
    tensors = {_strip_wrapper_prefixes(key): value for key, value in state_dict.items()}
    pairs = _pair_factors(tensors, source="peft state dict")
    config = _config_dict(lora_config)
    _check_ranks_match_config(pairs, config)
    if base_model is not None:
        config["base_model_name_or_path"] = base_model
    return _write_lora_dir(Path(out_dir), pairs, config, extra_metadata or {})


def write_lora(
    adapter: LoraAdapter,
    out_dir: str | os.PathLike,
    *,
    base_model: str | None = None,
    extra_metadata: dict | None = None,
) -> Path:
    """Write ``adapter`` in the same format as :func:`save_unet_lora`; ranks and alphas may differ per layer.

    Each layer's A, B and alpha are stored as they are (non-default ranks/alphas go into peft's
    ``rank_pattern``/``alpha_pattern`` with ``^``-anchored module paths), so ``read_lora`` gives them back
    unchanged and diffusers applies exactly ``(alpha / r) · B @ A`` per layer.
    """
    from peft import LoraConfig

    if not adapter.layers:
        raise LoraFormatError(f"cannot write an adapter with no layers to {out_dir}")
    names = sorted(adapter.layers)
    ranks = {name: adapter.layers[name].rank for name in names}
    alphas = {name: _json_number(adapter.layers[name].alpha) for name in names}
    default_rank = Counter(ranks.values()).most_common(1)[0][0]
    default_alpha = Counter(alphas.values()).most_common(1)[0][0]
    target_modules = adapter.target_modules if adapter.target_modules is not None else names
    lora_config = LoraConfig(
        r=default_rank,
        lora_alpha=default_alpha,
        rank_pattern={f"^{name}": rank for name, rank in ranks.items() if rank != default_rank},
        alpha_pattern={f"^{name}": alpha for name, alpha in alphas.items() if alpha != default_alpha},
        target_modules=target_modules,
        base_model_name_or_path=base_model if base_model is not None else adapter.base_model,
    )
    pairs = {name: (adapter.layers[name].A, adapter.layers[name].B) for name in names}
    metadata = {**adapter.metadata, **(extra_metadata or {})}
    return _write_lora_dir(Path(out_dir), pairs, _config_dict(lora_config), metadata)


def _write_lora_dir(
    out_dir: Path,
    pairs: dict[str, tuple["torch.Tensor", "torch.Tensor"]],
    config: dict[str, Any],
    metadata: dict[str, Any],
) -> Path:
    from safetensors.torch import save_file

    tensors = {}
    for name in sorted(pairs):
        A, B = pairs[name]
        tensors[f"{UNET_PREFIX}{name}{A_SUFFIXES[0]}"] = _plain_cpu_tensor(A)
        tensors[f"{UNET_PREFIX}{name}{B_SUFFIXES[0]}"] = _plain_cpu_tensor(B)
    header_config = {f"{UNET_PREFIX}{key}": config.get(key) for key in HEADER_CONFIG_FIELDS}
    header = {
        "format": "pt",
        DIFFUSERS_METADATA_KEY: json.dumps(header_config, indent=2, sort_keys=True),
        SELMA_METADATA_KEY: json.dumps(metadata, sort_keys=True),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    weights_path = out_dir / WEIGHT_NAME
    atomic_write(weights_path, lambda tmp: save_file(tensors, str(tmp), metadata=header))
    config_text = json.dumps(config, indent=2, sort_keys=True)
    atomic_write(out_dir / CONFIG_NAME, lambda tmp: tmp.write_text(config_text))
    return weights_path


def _check_ranks_match_config(pairs: dict[str, tuple["torch.Tensor", "torch.Tensor"]], config: dict[str, Any]) -> None:
    for name, (A, B) in sorted(pairs.items()):
        try:
            _check_factor_shapes(A, B)
        except LoraFormatError as err:
            raise LoraFormatError(f"layer {name}: {err}") from None
        expected = _pattern_value(config.get("rank_pattern") or {}, name, config["r"])
        if A.shape[0] != expected:
            raise LoraFormatError(f"layer {name} has rank {A.shape[0]} but the LoraConfig says {expected}")


def _peft_config_of(unet, adapter_name: str):
    configs = getattr(unet, "peft_config", None)
    if not configs or adapter_name not in configs:
        raise LoraFormatError(
            f"the model carries no peft LoRA adapter named {adapter_name!r} "
            f"(adapters: {sorted(configs or {})}); add one with unet.add_adapter(LoraConfig(...)) or pass lora_config="
        )
    return configs[adapter_name]


def _refuse_unsupported_config(lora_config) -> None:
    from peft import LoraConfig

    if not isinstance(lora_config, LoraConfig):
        raise LoraFormatError(f"expected a peft LoraConfig, got {type(lora_config).__name__}")
    unsupported = {
        "use_dora": bool(getattr(lora_config, "use_dora", False)),
        "lora_bias": bool(getattr(lora_config, "lora_bias", False)),
        "modules_to_save": bool(getattr(lora_config, "modules_to_save", None)),
        "bias": getattr(lora_config, "bias", "none") != "none",
    }
    refused = sorted(option for option, used in unsupported.items() if used)
    if refused:
        raise LoraFormatError(f"LoRA options not supported by the selma LoRA format: {refused}")


def _config_dict(lora_config) -> dict[str, Any]:
    """The LoraConfig as plain JSON-able data (sets become sorted lists, enums their value)."""
    data = lora_config.to_dict()
    return json.loads(json.dumps(data, default=_json_default, sort_keys=True))


def _json_default(value):
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    if hasattr(value, "value"):  # enums such as PeftType
        return value.value
    raise TypeError(f"not JSON serialisable: {value!r}")


def _json_number(value: float) -> int | float:
    return int(value) if float(value).is_integer() else float(value)


def _strip_wrapper_prefixes(key: str) -> str:
    # peft wrappers add ``base_model.model.``; torch.compile adds ``_orig_mod.``
    for prefix in ("_orig_mod.", "base_model.model."):
        key = key.removeprefix(prefix)
    return key


def _plain_cpu_tensor(tensor: "torch.Tensor") -> "torch.Tensor":
    # safetensors refuses views of shared storage and non-contiguous tensors.
    return tensor.detach().to("cpu").contiguous().clone()


def copy_adapter_files(run: "RunDir", relative: str, local_dir: str | os.PathLike) -> Path:
    """Copy the adapter files of the LoRA folder ``relative`` of ``run`` (a run directory, local or on an
    object store) into ``local_dir``, leaving out whatever else the folder holds. Returns ``local_dir``."""
    local_dir = Path(local_dir)
    local_dir.mkdir(parents=True, exist_ok=True)
    for name in ADAPTER_FILES:
        if run.exists(relative, name):
            copy_files(run.path(relative, name), str(local_dir / name), source_filesystem=run.fs,
                       destination_filesystem=LocalFileSystem())
    return local_dir


def atomic_write(path: Path, write: Callable[[Path], Any]) -> None:
    """Write through ``write(tmp)`` and move into place, so a reader never sees a half-written file."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


# ----------------------------------------------------------------------------------------- reading


def read_lora(path: str | os.PathLike) -> LoraAdapter:
    """Read a LoRA directory (or its weights file) written by :func:`save_unet_lora` / :func:`write_lora`.

    Reads safetensors only (never pickle). Per-layer alpha follows what diffusers applies when it loads the
    file: the header's ``lora_alpha``/``alpha_pattern`` when present, alpha = rank when the header is absent.
    """
    with LoraFile(path) as lora_file:
        return lora_file.read()


class LoraFile:
    """One LoRA file opened for reading layer by layer (a context manager; :meth:`close` when done).

    Opening reads only the header: it checks the key layout (UNet keys, paired A/B factors, 2-D, matching
    ranks, positive alphas) and exposes ``layer_names``, ``shapes`` (out, in), ``ranks``, ``alphas``,
    ``base_model``, ``target_modules`` and ``metadata``. :meth:`layer` loads one layer's tensors. A missing,
    truncated or non-safetensors file raises :class:`LoraFormatError` naming the path.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = _weights_path(Path(path))
        try:
            self._handle = safe_open(str(self.path), framework="pt", device="cpu")
            header = self._handle.metadata() or {}
            keys = list(self._handle.keys())
            key_shapes = {key: tuple(self._handle.get_slice(key).get_shape()) for key in keys}
        except (SafetensorError, OSError, ValueError, RuntimeError) as err:
            raise LoraFormatError(
                f"cannot read LoRA file {self.path} (truncated or not safetensors?): {err}"
            ) from None
        if not keys:
            raise LoraFormatError(f"{self.path}: the file holds no tensors")
        config = _header_config(header, self.path)
        unet_keys = _unet_tensors({key: key for key in keys}, self.path)
        self._keys = _pair_factors(unet_keys, source=str(self.path))  # name -> (key of A, key of B)
        self.shapes: dict[str, tuple[int, int]] = {}
        self.ranks: dict[str, int] = {}
        self.alphas: dict[str, float] = {}
        for name in sorted(self._keys):
            key_A, key_B = self._keys[name]
            shape_A, shape_B = key_shapes[key_A], key_shapes[key_B]
            try:
                _check_shapes(shape_A, shape_B)
            except LoraFormatError as err:
                raise LoraFormatError(f"{self.path}: layer {name}: {err}") from None
            alpha = _alpha_for(name, shape_A[0], config)
            if not math.isfinite(alpha) or alpha <= 0:
                raise LoraFormatError(f"{self.path}: layer {name}: LoRA alpha must be positive and finite, got {alpha}")
            self.shapes[name] = (int(shape_B[0]), int(shape_A[1]))
            self.ranks[name] = int(shape_A[0])
            self.alphas[name] = alpha
        self.target_modules = config.get("target_modules") if config else None
        self.base_model = config.get("base_model_name_or_path") if config else None
        self.metadata = _selma_metadata(header, self.path)

    @property
    def layer_names(self) -> list[str]:
        return sorted(self.shapes)

    def layer(self, name: str) -> LoraLayer:
        """Load one layer's factors (as stored) with the alpha diffusers applies."""
        if name not in self._keys:
            raise LoraFormatError(f"{self.path}: no LoRA layer {name!r}")
        key_A, key_B = self._keys[name]
        try:
            A, B = self._handle.get_tensor(key_A), self._handle.get_tensor(key_B)
        except (SafetensorError, OSError, ValueError, RuntimeError) as err:
            raise LoraFormatError(f"cannot read layer {name} from {self.path}: {err}") from None
        try:
            return LoraLayer(A=A, B=B, alpha=self.alphas[name])
        except LoraFormatError as err:
            raise LoraFormatError(f"{self.path}: layer {name}: {err}") from None

    def read(self) -> LoraAdapter:
        """The whole adapter in memory."""
        return LoraAdapter(
            layers={name: self.layer(name) for name in self.layer_names},
            target_modules=self.target_modules,
            base_model=self.base_model,
            metadata=self.metadata,
        )

    def close(self) -> None:
        handle, self._handle = getattr(self, "_handle", None), None
        if handle is not None:
            handle.__exit__(None, None, None)

    def __enter__(self) -> "LoraFile":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def _weights_path(path: Path) -> Path:
    weights_path = path / WEIGHT_NAME if path.is_dir() else path
    if not weights_path.is_file():
        raise LoraFormatError(f"no LoRA weights at {weights_path} (expected a directory holding {WEIGHT_NAME})")
    if weights_path.suffix != ".safetensors":
        raise LoraFormatError(f"{weights_path}: only .safetensors LoRA files are read")
    return weights_path


def _header_config(header: dict[str, str], weights_path: Path) -> dict[str, Any] | None:
    raw = header.get(DIFFUSERS_METADATA_KEY)
    if not raw:
        return None
    try:
        packed = json.loads(raw)
    except json.JSONDecodeError as err:
        raise LoraFormatError(f"{weights_path}: malformed {DIFFUSERS_METADATA_KEY} header: {err}") from None
    config = {key.removeprefix(UNET_PREFIX): value for key, value in packed.items() if key.startswith(UNET_PREFIX)}
    return config or None


def _selma_metadata(header: dict[str, str], weights_path: Path) -> dict[str, Any]:
    raw = header.get(SELMA_METADATA_KEY)
    if not raw:
        return {}
    try:
        return json.loads(raw)
    except json.JSONDecodeError as err:
        raise LoraFormatError(f"{weights_path}: malformed {SELMA_METADATA_KEY} header: {err}") from None


def _unet_tensors(tensors: dict[str, "torch.Tensor"], weights_path: Path) -> dict[str, "torch.Tensor"]:
    foreign = sorted(key for key in tensors if not key.startswith(UNET_PREFIX))
    if foreign:
        raise LoraFormatError(
            f"{weights_path}: only UNet LoRA keys (prefix {UNET_PREFIX!r}) are supported; found e.g. {foreign[:3]}"
        )
    return {key.removeprefix(UNET_PREFIX): value for key, value in tensors.items()}


def _pair_factors(
    tensors: dict[str, "torch.Tensor"], *, source: str
) -> dict[str, tuple["torch.Tensor", "torch.Tensor"]]:
    """``{module: (A, B)}`` from keys ``<module>.lora.down.weight`` / ``.lora_A.weight`` and their B twins."""
    found_A, found_B = {}, {}
    for key, value in tensors.items():
        module_A = _module_of(key, A_SUFFIXES)
        module_B = _module_of(key, B_SUFFIXES)
        if module_A is not None:
            found_A[module_A] = value
        elif module_B is not None:
            found_B[module_B] = value
        else:
            raise LoraFormatError(f"{source}: unexpected key {key!r} (only plain LoRA A/B weights are supported)")
    unpaired = sorted(set(found_A) ^ set(found_B))
    if unpaired:
        raise LoraFormatError(f"{source}: LoRA layers missing their A or B factor: {unpaired[:5]}")
    if not found_A:
        raise LoraFormatError(f"{source}: no LoRA layers found")
    return {name: (found_A[name], found_B[name]) for name in found_A}


def _module_of(key: str, suffixes: tuple[str, ...]) -> str | None:
    for suffix in suffixes:
        if key.endswith(suffix):
            return key[: -len(suffix)]
    return None


def _alpha_for(name: str, rank: int, config: dict[str, Any] | None) -> float:
    """The plain alpha (scaling = alpha / rank) that diffusers/peft apply to layer ``name``."""
    if config is None:
        return float(rank)  # no header: diffusers builds LoraConfig with alpha = rank
    alpha = float(_pattern_value(config.get("alpha_pattern") or {}, name, config.get("lora_alpha", rank)))
    if config.get("use_rslora"):
        return alpha * math.sqrt(rank)  # rsLoRA scaling alpha/sqrt(r) == (alpha·sqrt(r))/r
    return alpha


def _pattern_value(patterns: dict[str, Any], name: str, default):
    # Same matching as peft.utils.other.get_pattern_key: the first pattern matching a suffix of the path.
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", name):
            return value
    return default
