"""Human-preference reward scorers: CLIPScore, PickScore, HPS v2 / v2.1 and ImageReward.

Every scorer reads an explicit, local weights folder (or a ``tiny:`` spec, built once by
``selma.core.models.resolve_model``), never a model hub, and scores image-prompt pairs::

    scorer = load_reward_scorer("pickscore", "/models/pickscore")
    scorer.score([image_a, image_b], ["a red cube", "two cats"])  # -> [21.3, 19.8]

Models are built once per scorer (in ``__init__``) and run in float32 under
``torch.inference_mode()``. Prompts longer than a model's context are truncated, as the
reference implementations do. torch / transformers are imported only when a scorer is built:
importing this package (``selma.config`` does, for ``REWARD_SCORERS``) stays light.

Modules, each documenting its weights folder layout and score:

``base`` -- ``RewardScorer``, ``RewardWeightsError`` and the shared helpers (weights resolution,
    state-dict loading, image transforms, ``default_device``).
``clip`` -- ``clipscore`` and ``pickscore``: transformers ``CLIPModel`` folders.
``hps`` -- ``hpsv2`` / ``hpsv2.1``: the HPS release checkpoints (open_clip keys), converted.
``imagereward`` -- ``imagereward``: ``ImageReward.pt`` (BLIP keys), converted.

``weights`` may also name the checkpoint file itself for HPS and ImageReward; its configuration
and tokenizer files are then looked up beside it. HPS and ImageReward run on transformers' own
modules after a key-by-key conversion of the original checkpoints that uses every checkpoint
tensor and fills every model tensor, so a wrong mapping fails loudly; neither open_clip nor the
``image-reward`` package is needed. Checkpoints are read with ``torch.load(weights_only=True)``:
nothing is unpickled beyond tensors and plain containers.
"""

from __future__ import annotations

from pathlib import Path

from selma.eval.rewards.base import DEFAULT_BATCH_SIZE, RewardScorer, RewardWeightsError
from selma.eval.rewards.clip import CLIPScoreScorer, PickScoreScorer
from selma.eval.rewards.hps import HPSv2Scorer, HPSv21Scorer
from selma.eval.rewards.imagereward import ImageRewardScorer

REWARD_SCORERS: dict[str, type[RewardScorer]] = {
    "clipscore": CLIPScoreScorer,
    "pickscore": PickScoreScorer,
    "hpsv2": HPSv2Scorer,
    "hpsv2.1": HPSv21Scorer,
    "imagereward": ImageRewardScorer,
}


def load_reward_scorer(name: str, weights: str | Path, *, device: str | None = None,
                       batch_size: int = DEFAULT_BATCH_SIZE) -> RewardScorer:
    """Build the scorer ``name`` from the local weights folder (or ``tiny:`` spec) ``weights``.

    Raises KeyError listing the known scorers for an unknown ``name``, and RewardWeightsError
    (a FileNotFoundError) naming the scorer, the path and the expected files when weights are missing.
    """
    key = name.strip().lower()
    if key not in REWARD_SCORERS:
        raise KeyError(f"unknown reward scorer {name!r}; known scorers: {', '.join(REWARD_SCORERS)}")
    return REWARD_SCORERS[key](weights, device=device, batch_size=batch_size)


def known_scorers() -> list[str]:
    return list(REWARD_SCORERS)


__all__ = [
    "REWARD_SCORERS",
    "RewardScorer",
    "RewardWeightsError",
    "load_reward_scorer",
    "known_scorers",
    "CLIPScoreScorer",
    "PickScoreScorer",
    "HPSv2Scorer",
    "HPSv21Scorer",
    "ImageRewardScorer",
]
