"""Experiment tracking for the train stage: one tracking run per expert, written by its rank-0 worker.

Each backend is a :class:`Tracker` (``log_metrics`` / ``log_images`` / ``close``), picked from
:data:`TRACKERS` by ``train.tracking.backend``. MLflow and Weights & Biases are set up through Ray's
own integrations (``setup_mlflow``, ``setup_wandb``), TensorBoard through torch's ``SummaryWriter``,
as Ray Train's docs do it. :class:`ExpertMonitor` is what the training loop calls after each
optimizer step: metrics to the tracker, and validation images when they are due.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Protocol

from selma.core.errors import ConfigError
from selma.core.rundir import RunDir

# mlflow, tensorboard and wandb (the `tracking` extra) are imported where used: they are optional.

if TYPE_CHECKING:
    from selma.core.config import TrackingConfig
    from selma.train.validation import Validator

# The per-step metrics a tracker receives (the metrics.jsonl record's keys less ``step``).
TRACKED_METRICS = ("loss", "lr", "samples_per_s", "grad_norm")
# backend → (module that must import, pip requirement that provides it)
BACKEND_PACKAGES = {"mlflow": ("mlflow", "mlflow-skinny"), "tensorboard": ("tensorboard", "tensorboard"),
                    "wandb": ("wandb", "wandb")}


class Tracker(Protocol):
    def log_metrics(self, step: int, metrics: dict[str, float]) -> None: ...

    def log_images(self, step: int, images: list, captions: list[str]) -> None: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class TrackingTarget:
    """Which tracking run an expert logs to, and what it starts with."""

    run_name: str  # the selma run's ``name``
    run_uri: str
    expert: str
    params: dict = field(default_factory=dict)  # logged as the tracking run's parameters / config
    resumed_step: int = 0  # > 0: the expert continues from a checkpoint at this step

    @property
    def display_name(self) -> str:
        return f"{self.run_name}/{self.expert}"

    @property
    def key(self) -> str:
        """Stable across restarts of the same expert in the same run directory: a restarted worker
        continues the tracking run it started."""
        return hashlib.sha256(f"{self.run_uri}\x00{self.expert}".encode()).hexdigest()[:16]

    def work_dir(self, *parts: str) -> str:
        """``RUN/_work/...`` as a local path (the run directory must be local)."""
        run = RunDir(self.run_uri)
        if not run.is_local:
            raise ValueError(f"the run directory {self.run_uri} is not local")
        return run.path("_work", *parts)


TRACKERS: dict[str, Callable[[TrackingConfig, TrackingTarget], Tracker]] = {}


def register(backend: str):
    def add(cls):
        TRACKERS[backend] = cls
        return cls

    return add


def open_tracker(tracking: TrackingConfig, target: TrackingTarget) -> Tracker:
    return TRACKERS[tracking.backend](tracking, target)


def check_tracking(tracking: TrackingConfig | None, run: RunDir) -> None:
    """Preflight: the backend's package is installed here, and a backend that writes files has a
    place for them."""
    if tracking is None:
        return
    module, requirement = BACKEND_PACKAGES[tracking.backend]
    if importlib.util.find_spec(module) is None:
        raise ConfigError(f"train.tracking.backend: {tracking.backend} needs the {module} package, which is not "
                          f"installed: pip install '{requirement}' (or pip install 'selma[tracking]')")
    if not run.is_local:
        if tracking.backend == "mlflow" and tracking.tracking_uri is None:
            raise ConfigError(f"train.tracking.tracking_uri: needed with a run directory that is not local "
                              f"({run.uri}); name an MLflow server, e.g. http://mlflow:5000")
        if tracking.backend == "tensorboard" and tracking.log_dir is None:
            raise ConfigError(f"train.tracking.log_dir: needed with a run directory that is not local ({run.uri})")


def _metrics(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(metrics[k]) for k in TRACKED_METRICS if metrics.get(k) is not None}


def _is_file_store(uri: str) -> bool:
    return "://" not in uri or uri.startswith("file:")


@register("mlflow")
class MlflowTracker:
    """An MLflow run per expert in experiment ``experiment_name`` (default: the run's name)."""

    def __init__(self, tracking: TrackingConfig, target: TrackingTarget):
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient
        from ray.air.integrations.mlflow import setup_mlflow

        uri = tracking.tracking_uri or target.work_dir("mlflow")
        if _is_file_store(uri):
            # MLflow 3 refuses folder stores unless told; the user named (or defaulted to) a folder.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        experiment = tracking.experiment_name or target.run_name
        self.client = MlflowClient(tracking_uri=uri)
        if self.client.get_experiment_by_name(experiment) is None:
            try:  # here, not in setup_mlflow: experts starting at once would race to create it
                self.client.create_experiment(experiment)
            except MlflowException:
                if self.client.get_experiment_by_name(experiment) is None:
                    raise
        self.run_id = self._run_to_resume(experiment, target) if target.resumed_step else None
        if self.run_id is None:
            mlflow = setup_mlflow(config=target.params, tracking_uri=uri, experiment_name=experiment,
                                  run_name=target.display_name,
                                  tags={"selma.run": target.run_name, "selma.expert": target.expert,
                                        "selma.key": target.key}, rank_zero_only=False)
            self.run_id = mlflow.active_run().info.run_id
        self.captions_logged = False

    def _run_to_resume(self, experiment: str, target: TrackingTarget) -> str | None:
        found = self.client.get_experiment_by_name(experiment)
        if found is None:
            return None
        runs = self.client.search_runs([found.experiment_id], filter_string=f"tags.`selma.key` = '{target.key}'",
                                       order_by=["attributes.start_time DESC"], max_results=1)
        return runs[0].info.run_id if runs else None

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in _metrics(metrics).items()])

    def log_images(self, step: int, images: list, captions: list[str]) -> None:
        for index, image in enumerate(images):
            self.client.log_image(self.run_id, image, key=f"validation_{index}", step=step)
        if not self.captions_logged:
            self.client.log_dict(self.run_id, {f"validation_{i}": c for i, c in enumerate(captions)},
                                 "validation_prompts.json")
            self.captions_logged = True

    def close(self) -> None:
        import mlflow

        active = mlflow.active_run()
        if active is not None and active.info.run_id == self.run_id:
            mlflow.end_run()
        else:
            self.client.set_terminated(self.run_id)


@register("tensorboard")
class TensorBoardTracker:
    """Event files in ``<log_dir>/<run name>/<expert>`` (default log_dir: RUN/_work/tensorboard)."""

    def __init__(self, tracking: TrackingConfig, target: TrackingTarget):
        from torch.utils.tensorboard import SummaryWriter

        root = tracking.log_dir or target.work_dir("tensorboard")
        # purge_step: a restarted worker drops the events it logged after its checkpoint.
        self.writer = SummaryWriter(os.path.join(root, target.run_name, target.expert),
                                    purge_step=target.resumed_step or None, flush_secs=10)
        self.captions_logged = False

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        for key, value in _metrics(metrics).items():
            self.writer.add_scalar(key, value, step)

    def log_images(self, step: int, images: list, captions: list[str]) -> None:
        import numpy as np

        for index, (image, caption) in enumerate(zip(images, captions)):
            self.writer.add_image(f"validation/{index}", np.asarray(image), step, dataformats="HWC")
            if not self.captions_logged:
                self.writer.add_text(f"validation/{index}", caption, step)
        self.captions_logged = True

    def close(self) -> None:
        self.writer.close()


@register("wandb")
class WandbTracker:
    """A wandb run per expert (id stable across restarts) in ``project`` (default: the run's name),
    grouped by the run's name."""

    def __init__(self, tracking: TrackingConfig, target: TrackingTarget):
        from ray.air.integrations.wandb import setup_wandb

        if tracking.mode == "offline":
            os.environ["WANDB_MODE"] = "offline"  # setup_wandb asks for an API key unless this says offline
        directory = target.work_dir() if RunDir(target.run_uri).is_local else None
        if directory:
            os.makedirs(directory, exist_ok=True)
        self.run = setup_wandb(config=target.params, trial_id=target.key, trial_name=target.display_name,
                               project=tracking.project or target.run_name, entity=tracking.entity,
                               group=target.run_name, mode=tracking.mode, rank_zero_only=False, dir=directory)

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        self.run.log(_metrics(metrics), step=step)

    def log_images(self, step: int, images: list, captions: list[str]) -> None:
        import wandb

        self.run.log({"validation": [wandb.Image(image, caption=c) for image, c in zip(images, captions)]}, step=step)

    def close(self) -> None:
        self.run.finish()


class ExpertMonitor:
    """Rank 0's work after each optimizer step: the step's metrics to the tracker, and validation
    images when they are due (also logged to the tracker)."""

    def __init__(self, tracker: Tracker | None = None, validator: Validator | None = None):
        self.tracker = tracker
        self.validator = validator

    def after_step(self, trainer, record: dict) -> None:
        if self.tracker is not None:
            self.tracker.log_metrics(record["step"], record)
        if self.validator is not None and self.validator.due(trainer.step):
            images, captions = self.validator.run(trainer.components, trainer.step)
            if self.tracker is not None:
                self.tracker.log_images(trainer.step, images, captions)

    def close(self) -> None:
        if self.tracker is not None:
            self.tracker.close()
