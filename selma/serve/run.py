"""``selma serve RUN``: host a finished run's merged model (or its base model) on Ray Serve."""

from __future__ import annotations

from selma.rundir import RunDir


def serve_run_dir(config, run: RunDir, *, blocking: bool = True):
    from selma.raylib import init_ray
    from selma.serve.app import build_app, serve_run

    lora_dir = None
    if config.serve.model == "merged":
        if run.stage("merge").get("status") != "committed":
            raise RuntimeError(f"{run.uri} has no committed merged adapter; run `selma run` first or serve --model base")
        if not run.is_local:
            raise RuntimeError("serving from a remote run directory is not supported yet; copy merged/ locally")
        lora_dir = run.path("merged")
    if blocking:
        _stop_on_signals()
    init_ray(config.ray)
    app = build_app(
        config.serve,
        base_model=config.model,
        lora_dir=lora_dir,
        model_name=config.serve.model,
        default_steps=config.serve.default_steps or config.images.steps,
        guidance_scale=config.images.guidance_scale,
    )
    return serve_run(app, config.serve.host, config.serve.port, blocking=blocking)


def _stop_on_signals() -> None:
    """SIGTERM (Kubernetes, process managers) and SIGINT both end serving cleanly."""
    import signal

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, interrupt)
    signal.signal(signal.SIGTERM, interrupt)
