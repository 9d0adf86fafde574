"""``selma serve RUN``: host a finished run's base model, merged adapter and experts on Ray Serve."""

from __future__ import annotations

import signal

from ray import serve

from selma.config import build_config
from selma.core.config import apply_override, parse_override, upgrade_recorded_config
from selma.core.errors import ConfigError
from selma.core.rundir import RunDir
from selma.core.vae import check_vae
from selma.merge.lora_io import WEIGHT_NAME
from selma.raylib import init_ray
from selma.serve.app import BASE_MODEL_NAME, build_app, proxy_host, serve_run


def load_run_config(run_dir: str, overrides: list[str] | tuple[str, ...] = (), values: dict | None = None):
    """The config a run was made with, plus ``key.sub=value`` overrides and ``{"key.sub": value}``
    values (a YAML string is parsed); raises ConfigError."""
    run = RunDir(run_dir)
    data = run.manifest().get("config")
    if data is None:
        raise ConfigError(f"{run_dir}: no run.json; is it a selma run directory?")
    upgrade_recorded_config(data)
    for text in overrides:
        apply_override(data, *parse_override(text))
    for key, value in (values or {}).items():
        if isinstance(value, str):
            apply_override(data, *parse_override(f"{key}={value}"))
        else:
            apply_override(data, key.split("."), value)
    return build_config(data), run


def run_adapters(config, run: RunDir) -> dict[str, str]:
    """API model name → LoRA folder (a local path, or a URI the replicas copy locally): ``merged``
    once the merge stage committed, and ``expert-<name>`` for every trained expert."""
    where = run.path if run.is_local else run.uri_of
    adapters = {}
    if run.stage("merge").get("status") == "committed":
        adapters["merged"] = where("merged")
    for name in config.expert_names:
        if run.exists("experts", name, WEIGHT_NAME):  # a training expert's folder holds only its checkpoints
            adapters[f"expert-{name}"] = where("experts", name)
    return adapters


def build_run_app(config, run: RunDir, **options):
    """The Serve app for a run; ``options``: more :func:`selma.serve.app.build_app` arguments (``host``)."""
    adapters = run_adapters(config, run)
    if config.serve.model != BASE_MODEL_NAME and config.serve.model not in adapters:
        hint = "; run `selma run` first or serve --model base" if config.serve.model == "merged" else ""
        raise ConfigError(f"serve.model: {run.uri} has no {config.serve.model!r} to serve "
                          f"(it has {[BASE_MODEL_NAME, *adapters]}){hint}")
    check_vae(config.vae, config.model)
    return build_app(
        config.serve,
        base_model=config.model,
        vae=config.vae,
        adapters=adapters,
        default_model=config.serve.model,
        default_steps=config.serve.default_steps or config.images.steps,
        guidance_scale=config.images.guidance_scale,
        **options,
    )


def serve_run_dir(config, run: RunDir, *, blocking: bool = True):
    app = build_run_app(config, run)  # refuses a bad config or a missing key before Ray starts
    if blocking:
        _stop_on_signals()
    init_ray(config.ray)
    running = proxy_host()
    if running is not None and running != config.serve.host:
        # Serve already runs in this cluster and its proxy keeps its own host: check against that one.
        app = build_run_app(config, run, host=running)
    return serve_run(app, config.serve.host, config.serve.port, blocking=blocking)


def _stop_on_signals() -> None:
    """SIGTERM (Kubernetes, process managers) and SIGINT both end serving cleanly."""
    def interrupt(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, interrupt)
    signal.signal(signal.SIGTERM, interrupt)


def app_builder(args: dict) -> serve.Application:
    """``serve run selma.serve.run:app_builder run_dir=RUN [serve.model=expert-coco ...]``.

    ``run_dir`` names a finished run; every other argument is a config override (``key.sub=value``)
    on top of the run's own config.

    ``serve.host`` does not apply here: Serve's HTTP proxy listens where the Serve config's (or
    ``serve run``'s) ``http_options`` say. Under ``serve deploy`` (and a RayService) the app is built
    in a task on the cluster, where the running proxy's host is asked for; where it is not known
    (``serve run IMPORT_PATH`` builds before Serve starts) an API key is required unless
    ``serve.allow_unauthenticated`` is true.
    """
    args = dict(args)
    run_dir = args.pop("run_dir", None)
    if not run_dir:
        raise ValueError("app_builder needs run_dir=<a finished selma run directory>")
    config, run = load_run_config(run_dir, values=args)
    return build_run_app(config, run, host=proxy_host())
