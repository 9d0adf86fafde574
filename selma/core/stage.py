"""The Stage protocol every step of a run implements, and what a stage is handed when it runs.

A stage names the run-directory folders it reads and writes, the config sections whose values
decide its output (its hash covers them), the compute it asks Ray for, and ``run(ctx)``.
``selma.pipeline`` orders stages, hashes and checks them, locks the run directory, marks stages
``running``/``failed``/``committed`` in run.json and discards a stage's ``writes`` on
``--restart``; a stage only does its work. A stage whose ``streams_to`` names the next stage
also implements ``run_streaming``: it hands each pass of rows it produces to that stage while
it is still producing (``selma run`` draws images of prompts as they are accepted).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Callable, ClassVar, Protocol, runtime_checkable

from selma.core.progress import Progress
from selma.core.rundir import RunDir


@dataclass(frozen=True)
class StageContext:
    config: Any  # selma.core.config.SelmaConfig
    run: RunDir
    progress: Progress
    stream: Any = None  # rows the upstream stage is still producing (a Ray Dataset), when streaming

    def streaming(self, stream) -> "StageContext":
        return replace(self, stream=stream)


@runtime_checkable
class Stage(Protocol):
    name: str
    reads: tuple[str, ...]  # run-directory folders it reads
    writes: tuple[str, ...]  # run-directory folders it writes: discarded on --restart
    sections: tuple[str, ...]  # config sections its hash covers (with every upstream stage's hash)
    needs: str | None  # the stage that must be committed first, None: checked by preflight
    needs_ray: bool
    streams_to: str | None  # the stage that can consume this one's rows while they are produced

    def resources(self, config) -> Any: ...

    def preflight(self, config, run: RunDir) -> None: ...

    def run(self, ctx: StageContext) -> dict: ...


class StageBase:
    """Defaults for the protocol's optional parts; stages subclass it and set the class attributes."""

    name: ClassVar[str]
    reads: ClassVar[tuple[str, ...]] = ()
    writes: ClassVar[tuple[str, ...]] = ()
    sections: ClassVar[tuple[str, ...]] = ()
    needs: ClassVar[str | None] = None
    needs_ray: ClassVar[bool] = True
    streams_to: ClassVar[str | None] = None
    # A chained stage is committed under its config hash and refuses rows made under another
    # config; an unchained one (eval) keys its own outputs, so it always runs and skips what is done.
    chained: ClassVar[bool] = True

    def resources(self, config):
        """The ``Resources`` of the section named like the stage, if it has one."""
        section = getattr(config, self.name, None)
        return getattr(section, "resources", None)

    def preflight(self, config, run: RunDir) -> None:
        """Checks that need no cluster, run before anything in the run directory is written."""

    def run(self, ctx: StageContext) -> dict:
        raise NotImplementedError

    def run_streaming(self, ctx: StageContext, consume: Callable[[Any], dict]) -> tuple[dict, dict | None]:
        """Run, handing each pass of produced rows to ``consume`` (the ``streams_to`` stage's run);
        returns (this stage's result, the last result ``consume`` returned or None)."""
        raise NotImplementedError(f"stage {self.name!r} does not stream")

    def __repr__(self) -> str:
        return f"<stage {self.name}>"
