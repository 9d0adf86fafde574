"""Merging skill experts (UNet LoRAs) into one adapter, layer by layer, on CPU.

Every method in :data:`MERGE_METHODS` has the signature
``method(layers: Sequence[LoraLayer], weights: Sequence[float], **options) -> LoraLayer``: the same
UNet layer from each expert, in expert order, and one weight per expert. ``s_i = alpha_i / r_i`` is
expert i's LoRA scaling, so its delta is ``s_i · B_i @ A_i``.

Weights: non-negative and finite, one per expert, default ``1/N``. :func:`merge_experts` normalises
them to sum to 1 (``normalize=True``, the default: a *mean* of experts, as in SELMA); with
``normalize=False`` they are used as given (task-arithmetic style sums).
"""

from __future__ import annotations

import inspect
import json
import math
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

from selma.merge.lora_io import LoraAdapter, LoraLayer, atomic_write, read_lora, write_lora

if TYPE_CHECKING:
    import torch

MERGE_REPORT_NAME = "merge.json"


class MergeError(ValueError):
    """Experts or options that cannot be merged; the message names the experts involved."""


# ----------------------------------------------------------------------------------------- methods


def delta_mean(layers: Sequence[LoraLayer], weights: Sequence[float]) -> LoraLayer:
    """Exact weighted sum of deltas: ``ΔW = Σ_i w_i · s_i · B_i @ A_i`` (SELMA's released code, w_i = 1/N).

    Stored without approximation as a concatenated-rank LoRA: ``B = [w_1 s_1 B_1 | … | w_N s_N B_N]``,
    ``A = [A_1; …; A_N]``, ``alpha = rank = Σ r_i`` (scaling 1). Experts with weight 0 are left out. The same
    delta as peft's ``add_weighted_adapter(combination_type="cat")`` (which folds ``w_i s_i`` into A instead).
    """
    import torch

    kept = [(layer, w) for layer, w in zip(layers, weights) if w != 0]
    B = torch.cat([layer.B.float() * (w * layer.scaling) for layer, w in kept], dim=1)
    A = torch.cat([layer.A.float() for layer, _ in kept], dim=0)
    return LoraLayer(A=A, B=B, alpha=A.shape[0])


def ab_mean(layers: Sequence[LoraLayer], weights: Sequence[float]) -> LoraLayer:
    """The paper's equation: average A and B separately, ``ΔW = (Σ_i w_i s_i B_i) @ (Σ_i w_i A_i)``.

    NOT the delta average: expanding the product adds cross terms ``w_i w_j s_i B_i A_j`` (i ≠ j) and
    scales each expert's own term by ``w_i²``, so with w_i = 1/N it is not ``mean_i(s_i B_i A_i)``. Needs
    equal ranks. Each expert's scaling is folded into its B before averaging (when all experts share one
    scaling s this is ``s · B̄ @ Ā``, the paper's setting); the result has ``alpha = rank`` (scaling 1).
    peft's ``combination_type="linear"`` is different again: it weights A and B by ``sqrt(w_i s_i)`` each,
    ``(Σ √(w_i s_i) B_i)(Σ √(w_i s_i) A_i)``, which for w_i = 1/N and a shared s is N times ``s · B̄ @ Ā``.
    """
    ranks = {layer.rank for layer in layers}
    if len(ranks) != 1:
        raise MergeError(f"ab_mean needs experts of equal rank, got ranks {sorted(ranks)}")
    B = sum(layer.B.float() * (w * layer.scaling) for layer, w in zip(layers, weights))
    A = sum(layer.A.float() * w for layer, w in zip(layers, weights))
    return LoraLayer(A=A, B=B, alpha=A.shape[0])


def svd(layers: Sequence[LoraLayer], weights: Sequence[float], *, rank: int | None = None) -> LoraLayer:
    """:func:`delta_mean` re-factorised to ``rank`` (default: the largest expert rank) by truncated SVD.

    The best rank-``rank`` approximation of the exact delta average (Eckart–Young); exact when ``rank`` is
    at least the rank of that sum. Computed from QR of the concatenated factors, never the dense delta.
    """
    import torch

    if rank is None:
        rank = max(layer.rank for layer in layers)
    if not isinstance(rank, int) or rank < 1:
        raise MergeError(f"svd rank must be a positive integer, got {rank!r}")
    exact = delta_mean(layers, weights)
    Q_B, R_B = torch.linalg.qr(exact.B.double())
    Q_A, R_A = torch.linalg.qr(exact.A.double().T)
    U, S, Vh = torch.linalg.svd(R_B @ R_A.T)
    keep = min(rank, S.numel())
    root_S = S[:keep].sqrt()
    B = (Q_B @ U[:, :keep]) * root_S
    A = root_S[:, None] * (Vh[:keep] @ Q_A.T)
    return LoraLayer(A=A.float(), B=B.float(), alpha=keep)


MergeMethod = Callable[..., LoraLayer]
MERGE_METHODS: dict[str, MergeMethod] = {
    "delta_mean": delta_mean,
    "ab_mean": ab_mean,
    "svd": svd,
}


# ----------------------------------------------------------------------------------------- merging


def merge_experts(
    expert_dirs: Mapping[str, str | os.PathLike],
    out_dir: str | os.PathLike,
    *,
    method: str = "delta_mean",
    weights: Mapping[str, float] | None = None,
    normalize: bool = True,
    options: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Merge the expert LoRA directories into ``out_dir`` and return the report written to ``merge.json``.

    ``expert_dirs`` maps expert (skill) names to LoRA directories; ``weights`` maps the same names to
    non-negative weights (default 1/N, normalised to sum 1 unless ``normalize=False``); ``options`` go to
    the method (e.g. ``{"rank": 64}`` for ``svd``). Everything is checked before anything is written; the
    merged LoRA (same format as the experts) is written first, ``merge.json`` last.
    """
    started = time.perf_counter()
    if not expert_dirs:
        raise MergeError("no experts to merge")
    _method_named(method)
    validate_weights(list(expert_dirs), weights, normalize=normalize)
    experts = {name: read_lora(path) for name, path in expert_dirs.items()}
    merged = merge_adapters(experts, method=method, weights=weights, normalize=normalize, options=options)
    weights_path = write_lora(merged, out_dir)

    names = list(experts)
    expert_norms, merged_norms, gram = _delta_statistics(experts, merged)
    report = {
        "method": method,
        "options": dict(options or {}),
        "experts": {name: str(expert_dirs[name]) for name in names},
        "weights": merged.metadata["merge"]["weights"],
        "normalized": normalize,
        "base_model": merged.base_model,
        "num_layers": len(merged.layers),
        "ranks": {
            "experts": {name: _distinct_ranks(experts[name]) for name in names},
            "merged": _distinct_ranks(merged),
        },
        "delta_norms": {
            "experts": {name: _norm_summary(expert_norms[name]) for name in names},
            "merged": _norm_summary(merged_norms),
        },
        "cosine_similarity": _cosine_matrix(names, gram),
        "output": str(weights_path),
        "seconds": round(time.perf_counter() - started, 3),
    }
    report_text = json.dumps(report, indent=2)
    atomic_write(Path(out_dir) / MERGE_REPORT_NAME, lambda tmp: tmp.write_text(report_text))
    return report


def merge_adapters(
    experts: Mapping[str, LoraAdapter],
    *,
    method: str = "delta_mean",
    weights: Mapping[str, float] | None = None,
    normalize: bool = True,
    options: Mapping[str, Any] | None = None,
) -> LoraAdapter:
    """In-memory merge of compatible experts, layer by layer; see :func:`merge_experts`."""
    if not experts:
        raise MergeError("no experts to merge")
    merge_layer = _method_named(method)
    method_options = _checked_options(method, merge_layer, options)
    names = list(experts)
    applied_weights = validate_weights(names, weights, normalize=normalize)
    check_compatible(experts)

    weight_list = [applied_weights[name] for name in names]
    merged_layers = {}
    for layer_name in sorted(experts[names[0]].layers):
        layers = [experts[name].layers[layer_name] for name in names]
        try:
            merged_layers[layer_name] = merge_layer(layers, weight_list, **method_options)
        except MergeError as err:
            ranks = {name: layer.rank for name, layer in zip(names, layers)}
            raise MergeError(f"{method} cannot merge layer {layer_name} (expert ranks {ranks}): {err}") from None
    return LoraAdapter(
        layers=merged_layers,
        target_modules=_common_target_modules(experts),
        base_model=next((e.base_model for e in experts.values() if e.base_model), None),
        metadata={"merge": {"method": method, "experts": names, "weights": applied_weights}},
    )


def validate_weights(
    names: Sequence[str], weights: Mapping[str, float] | None, *, normalize: bool = True
) -> dict[str, float]:
    """Weights per expert as applied: default 1/N; non-negative, finite, named exactly like the experts."""
    if weights is None:
        return {name: 1.0 / len(names) for name in names}
    missing = [name for name in names if name not in weights]
    unknown = [name for name in weights if name not in names]
    if missing or unknown:
        raise MergeError(
            f"merge weights must name exactly the experts {list(names)}: missing {missing}, unknown {unknown}"
        )
    bad = {name: weights[name] for name in names if not _is_valid_weight(weights[name])}
    if bad:
        raise MergeError(f"merge weights must be finite and non-negative numbers, got {bad}")
    total = sum(float(weights[name]) for name in names)
    if total <= 0:
        raise MergeError(f"merge weights must not all be zero, got {dict(weights)}")
    scale = 1.0 / total if normalize else 1.0
    return {name: float(weights[name]) * scale for name in names}


def _method_named(method: str) -> MergeMethod:
    if method not in MERGE_METHODS:
        raise MergeError(f"unknown merge method {method!r}; known: {sorted(MERGE_METHODS)}")
    return MERGE_METHODS[method]


def _checked_options(method: str, merge_layer: MergeMethod, options: Mapping[str, Any] | None) -> dict[str, Any]:
    method_options = dict(options or {})
    try:
        inspect.signature(merge_layer).bind([], [], **method_options)
    except TypeError as err:
        raise MergeError(f"merge method {method!r} does not take options {method_options}: {err}") from None
    return method_options


def check_compatible(experts: Mapping[str, LoraAdapter]) -> None:
    """Same layer set, same layer shapes and same base model across experts, else a :class:`MergeError`."""
    names = list(experts)
    reference_name, reference = names[0], experts[names[0]]
    reference_layers = set(reference.layers)
    for name in names[1:]:
        layers = set(experts[name].layers)
        if layers != reference_layers:
            missing = sorted(reference_layers - layers)
            extra = sorted(layers - reference_layers)
            raise MergeError(
                f"experts {reference_name!r} and {name!r} adapt different UNet layers: {name!r} lacks "
                f"{len(missing)} ({missing[:3]}) and has {len(extra)} extra ({extra[:3]})"
            )
        for layer_name in sorted(layers):
            expected, got = reference.layers[layer_name].shape, experts[name].layers[layer_name].shape
            if expected != got:
                raise MergeError(
                    f"experts {reference_name!r} and {name!r} differ in shape at {layer_name}: "
                    f"{expected} vs {got} (different base models?)"
                )
    base_models = {name: experts[name].base_model for name in names if experts[name].base_model}
    if len(set(base_models.values())) > 1:
        raise MergeError(f"experts were trained on different base models: {base_models}")


# ----------------------------------------------------------------------------------------- statistics


def _delta_statistics(experts: Mapping[str, LoraAdapter], merged: LoraAdapter):
    """Per-layer delta norms of each expert and of the merge, and the experts' Gram matrix over all layers."""
    names = list(experts)
    expert_norms: dict[str, dict[str, float]] = {name: {} for name in names}
    merged_norms: dict[str, float] = {}
    gram = None
    for layer_name in sorted(merged.layers):
        layer_gram = _delta_gram([experts[name].layers[layer_name] for name in names])
        gram = layer_gram if gram is None else gram + layer_gram
        for index, name in enumerate(names):
            expert_norms[name][layer_name] = math.sqrt(max(layer_gram[index][index].item(), 0.0))
        merged_norms[layer_name] = _delta_norm(merged.layers[layer_name])
    return expert_norms, merged_norms, gram


def _delta_gram(layers: Sequence[LoraLayer]) -> "torch.Tensor":
    """``G[i, j] = <ΔW_i, ΔW_j>_F`` without forming any dense delta: ``s_i s_j · Σ (B_iᵀB_j) ⊙ (A_i A_jᵀ)``."""
    import torch

    count = len(layers)
    gram = torch.zeros(count, count, dtype=torch.float64)
    for i in range(count):
        for j in range(i, count):
            gram[i, j] = gram[j, i] = _delta_inner(layers[i], layers[j])
    return gram


def _delta_inner(first: LoraLayer, second: LoraLayer) -> float:
    left = first.B.double().T @ second.B.double()
    right = first.A.double() @ second.A.double().T
    return float((left * right).sum()) * first.scaling * second.scaling


def _delta_norm(layer: LoraLayer) -> float:
    return math.sqrt(max(_delta_inner(layer, layer), 0.0))


def _norm_summary(norms: Mapping[str, float]) -> dict[str, float]:
    values = list(norms.values())
    return {
        "total": math.sqrt(sum(value * value for value in values)),
        "mean": sum(values) / len(values),
        "min": min(values),
        "max": max(values),
    }


def _cosine_matrix(names: Sequence[str], gram: "torch.Tensor") -> dict[str, dict[str, float | None]]:
    """Pairwise cosine similarity of the experts' deltas flattened over all layers (None for a zero delta)."""
    norms = [math.sqrt(max(gram[i][i].item(), 0.0)) for i in range(len(names))]
    matrix: dict[str, dict[str, float | None]] = {}
    for i, first in enumerate(names):
        matrix[first] = {}
        for j, second in enumerate(names):
            denominator = norms[i] * norms[j]
            matrix[first][second] = gram[i][j].item() / denominator if denominator > 0 else None
    return matrix


def _distinct_ranks(adapter: LoraAdapter) -> list[int]:
    return sorted(set(adapter.ranks.values()))


def _common_target_modules(experts: Mapping[str, LoraAdapter]):
    targets = [experts[name].target_modules for name in experts]
    normalised = [sorted(t) if isinstance(t, (list, tuple, set)) else t for t in targets]
    return normalised[0] if all(t == normalised[0] for t in normalised) else None


def _is_valid_weight(value: Any) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return math.isfinite(value) and value >= 0
