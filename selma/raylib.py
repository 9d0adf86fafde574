"""Connecting to Ray: a cluster when one is named (or RAY_ADDRESS is set), else a fresh local one."""

from __future__ import annotations

import logging
import os

import ray
from ray.data import DataContext


def init_ray(ray_config) -> None:
    if ray.is_initialized():
        return
    address = ray_config.address or os.environ.get("RAY_ADDRESS")
    options = {"runtime_env": ray_config.runtime_env or None, "logging_level": logging.WARNING,
               "configure_logging": True}
    if address:
        ray.init(address=address, **options)
    else:
        ray.init(address="local", num_cpus=ray_config.num_cpus, **options)
        # Helpers that Ray Train spawns connect with address="auto"; point them at this instance
        # even when other Ray clusters run on the same machine.
        os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
    quiet_ray_data()


def quiet_ray_data() -> None:
    """selma prints its own progress lines; Ray Data's bars flood logs that are not terminals."""
    DataContext.get_current().enable_progress_bars = False
