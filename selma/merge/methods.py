"""Merging skill experts (UNet LoRAs) into one adapter: a Ray-free core over adapter files, layer by layer, on CPU.

Every method in :data:`MERGE_METHODS` has the signature
``method(layers: Sequence[LoraLayer], weights: Sequence[float], **options) -> LoraLayer``: the same UNet
layer from each expert, in expert order, and one weight per expert. ``ΔW_i = s_i · B_i @ A_i`` is expert i's
delta (task vector) for that layer, ``s_i = alpha_i / r_i`` its LoRA scaling.

* ``delta_mean`` (default): ``Σ w_i ΔW_i``, SELMA's released code. Stored exactly, rank Σ r_i (w_i > 0).
* ``cat``: the same delta ``Σ w_i ΔW_i``, in the factor layout of peft's ``cat`` (rank Σ r_i, every expert).
* ``ab_mean``: the paper's equation ``(Σ w_i s_i B_i)(Σ w_i A_i)``: A and B averaged separately, which adds
  cross terms; *not* the delta average. Rank r (equal ranks needed); exact for its own formula.
* ``svd``: the best rank-k approximation of ``Σ w_i ΔW_i`` (Eckart–Young); exact iff k ≥ Σ r_i.
* ``ties``: TIES on the dense deltas (trim, elect sign, disjoint mean).
* ``dare_linear``: ``Σ w_i · DARE(ΔW_i)`` (random drop, rescale by 1/density; seeded).
* ``dare_ties``: DARE, then TIES' sign election and disjoint mean.
* ``magnitude_prune``: ``Σ w_i · top_density_magnitudes(ΔW_i)``.

**Weights**: one per expert, finite and non-negative, default ``1/N``. :func:`merge_experts` normalises them to
sum to 1 (``normalize=True``, a *mean* of experts as in SELMA); ``normalize=False`` uses them as given
(task-arithmetic sums). For every method (at density 1 for the pruning ones), N identical experts merge to
``(Σ w_i) · ΔW``. ``ab_mean`` needs weights that sum to 1 (it averages factors). Experts with weight 0 take no
part (``cat`` keeps a zero slot for them).

**Dense methods** (``ties``, ``dare_linear``, ``dare_ties``, ``magnitude_prune``) work on each expert's dense
delta ``ΔW_i`` (out × in, one layer at a time), reusing peft's ``peft.utils.merge_utils`` (``prune``,
``calculate_majority_sign_mask``, ``task_arithmetic``, ``magnitude_prune``). Their result is a dense delta; by
default (``rank=None``) it is stored **exactly** as a LoRA of rank ``min(out, in)`` (``B = I, A = ΔW`` or
``B = ΔW, A = I``, scaling 1; as large as the dense delta, but bit-exact), or with ``rank=k`` as its best
rank-k SVD factorisation, the retained energy ``Σ_{j≤k} σ_j² / Σ σ_j²`` reported per layer in ``merge.json``.
Options: ``density`` (fraction kept, 0 < density ≤ 1; default 0.2 for the magnitude methods as in the TIES
paper, 0.5 for DARE), ``seed`` (DARE), ``majority_sign_method`` (``total`` or ``frequency``), ``rank``.

* TIES (Yadav et al. 2023): trim each ``ΔW_i`` to its top-``density`` magnitudes (peft ``prune``), elect the
  sign of each entry by the sign of ``Σ w_i ΔŴ_i`` (peft ``calculate_majority_sign_mask`` on the weighted
  stack; ``frequency`` counts signs instead), then the *weighted* disjoint mean
  ``(Σ_j w_j) · Σ_i w_i m_i ΔŴ_i / Σ_i w_i m_i`` (0 where no expert agrees). With equal weights this is the
  paper's disjoint mean (λ = 1). peft's ``disjoint_merge`` divides by the *count* of agreeing experts instead,
  so its ``ties`` with weights 1/N is N times smaller; ours equals peft's ``ties(deltas, weights=1)`` when
  weights are equal (tested), and stays a weighted mean when they are not (mergekit's normalisation).
* DARE (Yu et al. 2024): drop each entry with probability ``1 - density`` and rescale by ``1/density`` (peft
  ``prune(method="random", rescale=True)``). The mask of expert i (position in expert order, zero-weight
  experts counted) at layer L is ``torch.bernoulli(full(shape, density))`` drawn right after
  ``torch.manual_seed(dare_seed(seed, L, i))``; so it does not depend on the other experts, and the global RNG
  is left untouched. ``dare_linear`` sums ``w_i · DARE(ΔW_i)``; ``dare_ties`` applies TIES' sign election and
  weighted disjoint mean to the DARE'd deltas.
* ``magnitude_prune``: ``Σ w_i · prune_top_density(ΔW_i)`` (peft ``magnitude_prune``).

**peft's** ``add_weighted_adapter`` **compared.** ``cat``: the same delta, and our ``cat`` writes bit-identical
factors. ``svd`` (and ``*_svd``): a dense SVD of the merged delta truncated to ``svd_rank`` (default: the largest
expert rank — lossy); our ``svd`` is the same approximation computed from QR of the factors, our dense methods
default to exact storage. ``linear``, ``ties``, ``dare_linear``, ``dare_ties``, ``magnitude_prune`` (without
``_svd``) merge A and B *separately*, each weighted by ``sqrt(w_i s_i)``: ``linear`` is
``(Σ √(w_i s_i) B_i)(Σ √(w_i s_i) A_i)`` (cross terms, like ``ab_mean`` but N times larger at w = 1/N), and
TIES/DARE of factors is not TIES/DARE of deltas. We therefore use peft's ``merge_utils`` on the deltas and never
its factor-wise paths.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Protocol, Sequence

from selma.merge.errors import MergeError
from selma.merge.fuse import fuse_into_pipeline
from selma.merge.lora_io import LoraAdapter, LoraFile, LoraLayer, atomic_write, write_lora

if TYPE_CHECKING:
    import torch

# torch and peft are imported in the functions that use them (cheap import): selma.config and
# `selma --help` (through selma.merge.adapters) load MERGE_METHODS and method_options from here.

MERGE_REPORT_NAME = "merge.json"
FUSED_DIR_NAME = "fused"
MAJORITY_SIGN_METHODS = ("total", "frequency")


@dataclass(eq=False)
class MergedLayer(LoraLayer):
    """A merged layer plus what the method learned about it: ``norm`` (Frobenius norm of the stored delta),
    ``retained_energy`` (share of the exact merged delta's squared norm kept by a truncated SVD), ``exact``."""

    stats: dict[str, Any] = field(default_factory=dict)


class LoraSource(Protocol):
    """What merging reads from an expert: a :class:`LoraAdapter` in memory or a :class:`LoraFile` on disk."""

    shapes: Mapping[str, tuple[int, int]]
    ranks: Mapping[str, int]
    base_model: str | None
    target_modules: Any

    def layer(self, name: str) -> LoraLayer: ...


# ----------------------------------------------------------------------------------------- exact methods


def delta_mean(layers: Sequence[LoraLayer], weights: Sequence[float]) -> LoraLayer:
    """Exact weighted sum of deltas: ``ΔW = Σ_i w_i · s_i · B_i @ A_i`` (SELMA's released code, w_i = 1/N).

    Stored without approximation as a concatenated-rank LoRA: ``B = [w_1 s_1 B_1 | … | w_N s_N B_N]``,
    ``A = [A_1; …; A_N]``, ``alpha = rank = Σ r_i`` (scaling 1). Experts with weight 0 are left out. The same
    delta as :func:`cat` and peft's ``add_weighted_adapter(combination_type="cat")``.
    """
    import torch

    kept = [(layer, w) for layer, w in zip(layers, weights) if w != 0]
    B = torch.cat([layer.B.float() * (w * layer.scaling) for layer, w in kept], dim=1)
    A = torch.cat([layer.A.float() for layer, _ in kept], dim=0)
    return LoraLayer(A=A, B=B, alpha=A.shape[0])


def cat(layers: Sequence[LoraLayer], weights: Sequence[float]) -> LoraLayer:
    """Concatenation exactly as peft's ``add_weighted_adapter(combination_type="cat")`` writes it.

    The same delta as :func:`delta_mean` (``Σ_i w_i s_i B_i A_i``, exact); only the stored factors differ:
    ``A = [A_1 · w_1 · s_1; …]``, ``B = [B_1 | … | B_N]`` (weights folded into A, as peft does), and every expert
    keeps its slot, zero-weight ones included, so the rank is always ``Σ r_i``. Use it for factors bit-identical
    to peft's; ``delta_mean`` is otherwise the better default (it drops zero-weight experts).
    """
    import torch

    A = torch.cat([layer.A.float() * w * layer.scaling for layer, w in zip(layers, weights)], dim=0)
    B = torch.cat([layer.B.float() for layer in layers], dim=1)
    return LoraLayer(A=A, B=B, alpha=A.shape[0])


def ab_mean(layers: Sequence[LoraLayer], weights: Sequence[float]) -> LoraLayer:
    """The paper's equation: average A and B separately, ``ΔW = (Σ_i w_i s_i B_i) @ (Σ_i w_i A_i)``.

    NOT the delta average: expanding the product adds cross terms ``w_i w_j s_i B_i A_j`` (i ≠ j) and
    scales each expert's own term by ``w_i²``, so with w_i = 1/N it is not ``mean_i(s_i B_i A_i)``. Needs
    equal ranks and weights summing to 1. Each expert's scaling is folded into its B before averaging (when all
    experts share one scaling s this is ``s · B̄ @ Ā``, the paper's setting); the result has ``alpha = rank``.
    peft's ``combination_type="linear"`` is different again: it weights A and B by ``sqrt(w_i s_i)`` each,
    ``(Σ √(w_i s_i) B_i)(Σ √(w_i s_i) A_i)``, which for w_i = 1/N and a shared s is N times ``s · B̄ @ Ā``.
    """
    ranks = {layer.rank for layer in layers}
    if len(ranks) != 1:
        raise MergeError(f"ab_mean needs experts of equal rank, got ranks {sorted(ranks)}")
    B = sum(layer.B.float() * (w * layer.scaling) for layer, w in zip(layers, weights))
    A = sum(layer.A.float() * w for layer, w in zip(layers, weights))
    return LoraLayer(A=A, B=B, alpha=A.shape[0])


def svd(layers: Sequence[LoraLayer], weights: Sequence[float], *, rank: int | None = None) -> MergedLayer:
    """:func:`delta_mean` re-factorised to ``rank`` (default: the largest expert rank) by truncated SVD.

    The best rank-``rank`` approximation of the exact delta average (Eckart–Young); exact when ``rank`` is
    at least the rank of that sum (≤ Σ r_i). Computed from QR of the concatenated factors, never the dense delta.
    Reports the retained energy ``Σ_{j≤rank} σ_j² / Σ_j σ_j²``.
    """
    import torch

    if rank is None:
        rank = max(layer.rank for layer in layers)
    exact = delta_mean(layers, weights)
    Q_B, R_B = torch.linalg.qr(exact.B.double())
    Q_A, R_A = torch.linalg.qr(exact.A.double().T)
    U, S, Vh = torch.linalg.svd(R_B @ R_A.T)
    keep = min(rank, S.numel())
    root_S = S[:keep].sqrt()
    B = (Q_B @ U[:, :keep]) * root_S
    A = root_S[:, None] * (Vh[:keep] @ Q_A.T)
    return MergedLayer(A=A.float(), B=B.float(), alpha=keep, stats=_svd_stats(S, keep))


# ----------------------------------------------------------------------------------------- dense methods


def ties(
    layers: Sequence[LoraLayer],
    weights: Sequence[float],
    *,
    density: float = 0.2,
    majority_sign_method: str = "total",
    rank: int | None = None,
) -> MergedLayer:
    """TIES-merging of the deltas: trim to top-``density`` magnitudes, elect signs, weighted disjoint mean.

    See the module doc for the exact formula and how it relates to peft's ``ties`` (equal to
    ``peft.utils.merge_utils.ties(deltas, weights=ones, density)`` when the weights are equal).
    """
    deltas, w = _dense_inputs(layers, weights)
    trimmed = [_magnitude_trim(delta, density) for delta in deltas]
    return _store_dense(_disjoint_weighted_mean(trimmed, w, majority_sign_method), rank)


def dare_linear(
    layers: Sequence[LoraLayer],
    weights: Sequence[float],
    *,
    density: float = 0.5,
    seed: int = 0,
    rank: int | None = None,
    layer_name: str = "",
) -> MergedLayer:
    """DARE: drop each delta entry with probability ``1 - density``, rescale by ``1/density``, weighted sum."""
    from peft.utils.merge_utils import task_arithmetic

    deltas, w = _dense_inputs(layers, weights, keep_index=True)
    dropped = [_dare(delta, density, dare_seed(seed, layer_name, index)) for index, delta in deltas]
    return _store_dense(task_arithmetic(dropped, w), rank)


def dare_ties(
    layers: Sequence[LoraLayer],
    weights: Sequence[float],
    *,
    density: float = 0.5,
    seed: int = 0,
    majority_sign_method: str = "total",
    rank: int | None = None,
    layer_name: str = "",
) -> MergedLayer:
    """DARE's random drop and rescale, then TIES' sign election and weighted disjoint mean."""
    deltas, w = _dense_inputs(layers, weights, keep_index=True)
    dropped = [_dare(delta, density, dare_seed(seed, layer_name, index)) for index, delta in deltas]
    return _store_dense(_disjoint_weighted_mean(dropped, w, majority_sign_method), rank)


def magnitude_prune(
    layers: Sequence[LoraLayer],
    weights: Sequence[float],
    *,
    density: float = 0.2,
    rank: int | None = None,
) -> MergedLayer:
    """Keep each delta's top-``density`` magnitudes (peft's ``magnitude_prune``), then the weighted sum."""
    from peft.utils.merge_utils import magnitude_prune as peft_magnitude_prune
    from peft.utils.merge_utils import task_arithmetic

    deltas, w = _dense_inputs(layers, weights)
    merged = task_arithmetic(deltas, w) if density >= 1 else peft_magnitude_prune(deltas, w, density)
    return _store_dense(merged, rank)


def dare_seed(seed: int, layer_name: str, expert_index: int) -> int:
    """The torch seed of one expert's DARE mask at one layer (stable across runs, processes and machines)."""
    digest = hashlib.sha256(f"selma-dare/{seed}/{layer_name}/{expert_index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _dense_inputs(layers: Sequence[LoraLayer], weights: Sequence[float], *, keep_index: bool = False):
    """Dense fp32 deltas of the experts with non-zero weight, and their weights as a tensor."""
    import torch

    kept = [(index, layer.delta(), float(w)) for index, (layer, w) in enumerate(zip(layers, weights)) if w != 0]
    deltas = [(index, delta) for index, delta, _ in kept] if keep_index else [delta for _, delta, _ in kept]
    return deltas, torch.tensor([w for _, _, w in kept], dtype=torch.float32)


def _magnitude_trim(delta: "torch.Tensor", density: float) -> "torch.Tensor":
    from peft.utils.merge_utils import prune

    return delta if density >= 1 else prune(delta, density, method="magnitude")


def _dare(delta: "torch.Tensor", density: float, seed: int) -> "torch.Tensor":
    import torch
    from peft.utils.merge_utils import prune

    if density >= 1:
        return delta
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return prune(delta, density, method="random", rescale=True)


def _disjoint_weighted_mean(
    deltas: Sequence["torch.Tensor"], weights: "torch.Tensor", majority_sign_method: str
) -> "torch.Tensor":
    """``(Σ_j w_j) · Σ_i w_i m_i Δ_i / Σ_i w_i m_i`` with ``m_i`` = 1 where Δ_i has the elected sign (w_i > 0)."""
    import torch
    from peft.utils.merge_utils import calculate_majority_sign_mask

    stacked = torch.stack(list(deltas), dim=0)
    w = weights.to(stacked.dtype).view(-1, *([1] * (stacked.dim() - 1)))
    weighted = stacked * w
    agrees = calculate_majority_sign_mask(weighted, method=majority_sign_method)
    numerator = (weighted * agrees).sum(dim=0)
    denominator = (w * agrees).sum(dim=0)
    mean = torch.where(denominator > 0, numerator / denominator.clamp_min(torch.finfo(stacked.dtype).tiny), 0.0)
    return mean * weights.sum()


def _store_dense(delta: "torch.Tensor", rank: int | None) -> MergedLayer:
    """A dense delta as a LoRA: exactly at rank ``min(out, in)`` (``rank=None``), else its best rank-``rank`` SVD."""
    import torch

    out_features, in_features = delta.shape
    full = min(out_features, in_features)
    delta = delta.float().contiguous()
    if rank is None or rank >= full:
        norm = float(delta.double().norm())
        if out_features <= in_features:
            B, A = torch.eye(out_features), delta
        else:
            B, A = delta, torch.eye(in_features)
        return MergedLayer(A=A, B=B, alpha=full, stats={"norm": norm, "exact": True, "retained_energy": 1.0})
    U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
    root_S = S[:rank].sqrt()
    B = (U[:, :rank] * root_S).contiguous()
    A = (root_S[:, None] * Vh[:rank]).contiguous()
    return MergedLayer(A=A, B=B, alpha=rank, stats=_svd_stats(S.double(), rank))


def _svd_stats(S: "torch.Tensor", keep: int) -> dict[str, Any]:
    energy = S.double().square()
    total = float(energy.sum())
    kept = float(energy[:keep].sum())
    return {
        "norm": math.sqrt(kept),
        "retained_energy": kept / total if total > 0 else 1.0,
        "exact": keep >= S.numel(),
    }


MergeMethod = Callable[..., LoraLayer]
MERGE_METHODS: dict[str, MergeMethod] = {
    "delta_mean": delta_mean,
    "cat": cat,
    "ab_mean": ab_mean,
    "svd": svd,
    "ties": ties,
    "dare_linear": dare_linear,
    "dare_ties": dare_ties,
    "magnitude_prune": magnitude_prune,
}
# The merged delta is exactly Σ w_i ΔW_i: its norm follows from the experts' Gram matrix.
WEIGHTED_SUM_METHODS = frozenset({"delta_mean", "cat"})
# Average A and B factor by factor: need equal ranks, and weights that sum to 1.
FACTOR_AVERAGE_METHODS = frozenset({"ab_mean"})
# Arguments merge_adapters passes itself; not user options.
_INTERNAL_ARGUMENTS = frozenset({"layer_name"})


# ----------------------------------------------------------------------------------------- options


def method_options(method: str, options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The options ``method`` runs with: its defaults updated by ``options``, each checked; else a MergeError."""
    merge_layer = _method_named(method)
    given = dict(options or {})
    internal = sorted(set(given) & _INTERNAL_ARGUMENTS)
    if internal:
        raise MergeError(f"merge method {method!r}: {internal} is set by the merge itself, not an option")
    try:
        inspect.signature(merge_layer).bind([], [], **given)
    except TypeError as err:
        accepted = sorted(_option_defaults(merge_layer)) or "none"
        raise MergeError(f"merge method {method!r} does not take options {given} (accepted: {accepted}): {err}") from None
    resolved = {**_option_defaults(merge_layer), **given}
    for name, value in resolved.items():
        problem = _option_problem(name, value)
        if problem:
            raise MergeError(f"merge method {method!r}: option {name}={value!r} {problem}")
    return resolved


def _option_defaults(merge_layer: MergeMethod) -> dict[str, Any]:
    return {
        name: parameter.default
        for name, parameter in inspect.signature(merge_layer).parameters.items()
        if parameter.kind is inspect.Parameter.KEYWORD_ONLY and name not in _INTERNAL_ARGUMENTS
    }


def _option_problem(name: str, value: Any) -> str | None:
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if name == "density" and not (is_number and math.isfinite(value) and 0 < value <= 1):
        return "must be a number with 0 < density ≤ 1 (the fraction of each delta kept)"
    if name == "seed" and not (isinstance(value, int) and not isinstance(value, bool)):
        return "must be an integer"
    if name == "rank" and value is not None and not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
        return "must be a positive integer (or null for the default)"
    if name == "majority_sign_method" and value not in MAJORITY_SIGN_METHODS:
        return f"must be one of {list(MAJORITY_SIGN_METHODS)}"
    return None


def _method_named(method: str) -> MergeMethod:
    if method not in MERGE_METHODS:
        raise MergeError(f"unknown merge method {method!r}; known: {sorted(MERGE_METHODS)}")
    return MERGE_METHODS[method]


# ----------------------------------------------------------------------------------------- merging


def merge_experts(
    expert_dirs: Mapping[str, str | os.PathLike],
    out_dir: str | os.PathLike,
    *,
    method: str = "delta_mean",
    weights: Mapping[str, float] | None = None,
    normalize: bool = True,
    options: Mapping[str, Any] | None = None,
    fuse_into: str | None = None,
    fused_dtype: str = "float32",
    fused_vae: str | None = None,
) -> dict[str, Any]:
    """Merge the expert LoRA directories into ``out_dir`` and return the report written to ``merge.json``.

    ``expert_dirs`` maps expert (skill) names to LoRA directories; ``weights`` maps the same names to
    non-negative weights (default 1/N, normalised to sum 1 unless ``normalize=False``); ``options`` go to
    the method (e.g. ``{"rank": 64}`` for ``svd``, ``{"density": 0.5}`` for ``ties``). Experts are read layer
    by layer (one layer of every expert in memory at a time). Everything is checked before anything is
    written; the merged LoRA (same format as the experts) is written first, then the optional fused pipeline
    (``fuse_into``: a base model path, hub id or ``tiny:`` spec, with the VAE ``fused_vae`` in place of its own
    when given; saved to ``out_dir/fused``), ``merge.json`` last.
    """
    started = time.perf_counter()
    if not expert_dirs:
        raise MergeError("no experts to merge")
    resolved_options = method_options(method, options)
    validate_weights(list(expert_dirs), weights, normalize=normalize)
    files: dict[str, LoraFile] = {}
    try:
        for name, path in expert_dirs.items():
            files[name] = LoraFile(path)
        merged, layer_stats, gram = _merge(
            files, method=method, weights=weights, normalize=normalize, options=resolved_options
        )
    finally:
        for lora_file in files.values():
            lora_file.close()
    weights_path = write_lora(merged, out_dir)
    fused_path = None
    if fuse_into is not None:
        fused_path = fuse_into_pipeline(fuse_into, out_dir, Path(out_dir) / FUSED_DIR_NAME, dtype=fused_dtype,
                                        vae=fused_vae)

    report = _report(
        method=method, options=resolved_options, expert_dirs=expert_dirs, normalize=normalize,
        merged=merged, layer_stats=layer_stats, gram=gram, expert_ranks={n: f.ranks for n, f in files.items()},
    )
    report["output"] = str(weights_path)
    report["fused_pipeline"] = str(fused_path) if fused_path is not None else None
    report["seconds"] = round(time.perf_counter() - started, 3)
    report_text = json.dumps(report, indent=2)
    atomic_write(Path(out_dir) / MERGE_REPORT_NAME, lambda tmp: tmp.write_text(report_text))
    return report


def merge_adapters(
    experts: Mapping[str, LoraSource],
    *,
    method: str = "delta_mean",
    weights: Mapping[str, float] | None = None,
    normalize: bool = True,
    options: Mapping[str, Any] | None = None,
) -> LoraAdapter:
    """In-memory merge of compatible experts (:class:`LoraAdapter` or open :class:`LoraFile`); see :func:`merge_experts`."""
    return _merge(experts, method=method, weights=weights, normalize=normalize, options=options)[0]


def _merge(
    experts: Mapping[str, LoraSource],
    *,
    method: str,
    weights: Mapping[str, float] | None,
    normalize: bool,
    options: Mapping[str, Any] | None,
):
    """The merge loop: one layer of every expert at a time → merged adapter, per-layer statistics, Gram matrix."""
    import torch

    if not experts:
        raise MergeError("no experts to merge")
    merge_layer = _method_named(method)
    resolved_options = method_options(method, options)
    names = list(experts)
    applied_weights = validate_weights(names, weights, normalize=normalize)
    check_compatible(experts)
    _check_method_fits(method, experts, applied_weights)

    weight_list = [applied_weights[name] for name in names]
    weight_vector = torch.tensor(weight_list, dtype=torch.float64)
    takes_layer_name = "layer_name" in inspect.signature(merge_layer).parameters
    merged_layers: dict[str, LoraLayer] = {}
    layer_stats: dict[str, dict[str, Any]] = {}
    gram = torch.zeros(len(names), len(names), dtype=torch.float64)
    for layer_name in sorted(experts[names[0]].shapes):
        layers = [experts[name].layer(layer_name) for name in names]
        call_options = {**resolved_options, **({"layer_name": layer_name} if takes_layer_name else {})}
        try:
            result = merge_layer(layers, weight_list, **call_options)
        except MergeError as err:
            ranks = {name: layer.rank for name, layer in zip(names, layers)}
            raise MergeError(f"{method} cannot merge layer {layer_name} (expert ranks {ranks}): {err}") from None
        layer_gram = _delta_gram(layers)
        gram += layer_gram
        stats = dict(getattr(result, "stats", {}))
        if "norm" not in stats:
            if method in WEIGHTED_SUM_METHODS:
                stats["norm"] = math.sqrt(max(float(weight_vector @ layer_gram @ weight_vector), 0.0))
            else:
                stats["norm"] = _delta_norm(result)
        layer_stats[layer_name] = {
            "shape": list(result.shape),
            "rank": result.rank,
            "norm": stats["norm"],
            "expert_norms": {name: math.sqrt(max(layer_gram[i, i].item(), 0.0)) for i, name in enumerate(names)},
            "exact": bool(stats.get("exact", True)),
            **({"retained_energy": stats["retained_energy"]} if "retained_energy" in stats else {}),
        }
        merged_layers[layer_name] = LoraLayer(A=result.A, B=result.B, alpha=result.alpha)
        del layers, result
    adapter = LoraAdapter(
        layers=merged_layers,
        target_modules=_common_target_modules(experts),
        base_model=next((e.base_model for e in experts.values() if e.base_model), None),
        metadata={"merge": {"method": method, "experts": names, "weights": applied_weights,
                            "options": resolved_options}},
    )
    return adapter, layer_stats, gram


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


def check_compatible(experts: Mapping[str, LoraSource]) -> None:
    """Same layer set, same layer shapes and same base model across experts, else a :class:`MergeError`."""
    names = list(experts)
    reference_name, reference = names[0], experts[names[0]]
    reference_layers = set(reference.shapes)
    for name in names[1:]:
        layers = set(experts[name].shapes)
        if layers != reference_layers:
            missing = sorted(reference_layers - layers)
            extra = sorted(layers - reference_layers)
            raise MergeError(
                f"experts {reference_name!r} and {name!r} adapt different UNet layers (different target modules?): "
                f"{name!r} lacks {len(missing)} ({missing[:3]}) and has {len(extra)} extra ({extra[:3]})"
            )
        for layer_name in sorted(layers):
            expected, got = tuple(reference.shapes[layer_name]), tuple(experts[name].shapes[layer_name])
            if expected != got:
                raise MergeError(
                    f"experts {reference_name!r} and {name!r} differ in shape at {layer_name}: "
                    f"{expected} vs {got} (different base models?)"
                )
    base_models = {name: experts[name].base_model for name in names if experts[name].base_model}
    if len(set(base_models.values())) > 1:
        raise MergeError(f"experts were trained on different base models: {base_models}")


def _check_method_fits(method: str, experts: Mapping[str, LoraSource], weights: Mapping[str, float]) -> None:
    if method not in FACTOR_AVERAGE_METHODS:
        return
    ranks = {name: sorted(set(experts[name].ranks.values())) for name in experts}
    if len({tuple(r) for r in ranks.values()}) > 1 or any(len(r) > 1 for r in ranks.values()):
        shown = ", ".join(f"{name} r={'/'.join(map(str, r))}" for name, r in ranks.items())
        raise MergeError(
            f"{method} averages A and B factor by factor and needs experts of equal rank, got {shown}; "
            f"use delta_mean (exact) or svd to merge experts of different ranks"
        )
    total = sum(weights.values())
    if abs(total - 1.0) > 1e-6:
        raise MergeError(
            f"{method} is an average of factors: its weights must sum to 1 (normalize=True), got {dict(weights)} "
            f"(sum {total:g})"
        )


# ----------------------------------------------------------------------------------------- statistics


def _report(*, method, options, expert_dirs, normalize, merged, layer_stats, gram, expert_ranks) -> dict[str, Any]:
    names = list(expert_dirs)
    expert_norms = {name: {layer: stats["expert_norms"][name] for layer, stats in layer_stats.items()} for name in names}
    merged_norms = {layer: stats["norm"] for layer, stats in layer_stats.items()}
    retained = [stats for stats in layer_stats.values() if "retained_energy" in stats]
    retained_energy = None
    if retained:  # share of the whole exact merged delta's energy that the stored LoRA keeps
        total = sum(s["norm"] ** 2 / s["retained_energy"] for s in retained if s["retained_energy"] > 0)
        retained_energy = sum(s["norm"] ** 2 for s in retained) / total if total > 0 else 1.0
    return {
        "method": method,
        "options": options,
        "experts": {name: str(expert_dirs[name]) for name in names},
        "weights": merged.metadata["merge"]["weights"],
        "normalized": normalize,
        "base_model": merged.base_model,
        "num_layers": len(merged.layers),
        "exact": all(stats["exact"] for stats in layer_stats.values()),
        "retained_energy": retained_energy,
        "ranks": {
            "experts": {name: sorted(set(expert_ranks[name].values())) for name in names},
            "merged": _distinct_ranks(merged),
        },
        "delta_norms": {
            "experts": {name: _norm_summary(expert_norms[name]) for name in names},
            "merged": _norm_summary(merged_norms),
        },
        "cosine_similarity": _cosine_matrix(names, gram),
        "layers": layer_stats,
    }


def _delta_gram(layers: Sequence[LoraLayer]) -> "torch.Tensor":
    """``G[i, j] = <ΔW_i, ΔW_j>_F`` without forming any dense delta: ``s_i s_j · Σ (B_iᵀB_j) ⊙ (A_i A_jᵀ)``."""
    import torch

    count = len(layers)
    gram = torch.zeros(count, count, dtype=torch.float64)
    Bs = [layer.B.double() for layer in layers]
    As = [layer.A.double() for layer in layers]
    for i in range(count):
        for j in range(i, count):
            inner = float(((Bs[i].T @ Bs[j]) * (As[i] @ As[j].T)).sum()) * layers[i].scaling * layers[j].scaling
            gram[i, j] = gram[j, i] = inner
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


def _common_target_modules(experts: Mapping[str, LoraSource]):
    targets = [experts[name].target_modules for name in experts]
    normalised = [sorted(t) if isinstance(t, (list, tuple, set)) else t for t in targets]
    return normalised[0] if all(t == normalised[0] for t in normalised) else None


def _is_valid_weight(value: Any) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return math.isfinite(value) and value >= 0
