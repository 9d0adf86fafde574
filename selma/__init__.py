"""selma: SELMA (skill-specific LoRA experts, merged) on Ray."""

from selma.core.models import register_model_prefix

__version__ = "0.1.0"

# Models selma builds or ships itself, resolved (and imported) only when a spec names them.
register_model_prefix("tiny:", "selma.models.tiny:resolve_tiny")
register_model_prefix("world:", "selma.world.base:resolve_world")
