"""Experiments built on the stages: each composes runs of the pipeline (prompts, images, train,
merge, eval) into a comparison with its report. ``world``: SELMA measured in the shapes world."""
