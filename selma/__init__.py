"""selma: SELMA (skill-specific LoRA experts, merged) on Ray."""

__version__ = "0.1.0"
