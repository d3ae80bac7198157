"""The narrow seam through which cloud_sync changes what a running daemon serves.

cloud_sync never touches pipelines or sockets: it opens an engine for a bundle, asks
for a swap, and reads health counters. The swap itself is ModelPipeline.swap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from runtime.daemon.health import STALL_S, ModelHealth, PipelineState
from runtime.engines import Engine, EngineSettings, open_bundle_engine
from runtime.errors import SightlineError, UpdateRejected
from runtime.fusion.open import FusedEngine, open_serving_engine
from runtime.fusion.parity import FusionMismatch
from runtime.models.bundle import Bundle

__all__ = ["STALL_S", "ModelHealth", "PipelineState", "ServerModelHost"]

if TYPE_CHECKING:
    from runtime.daemon.server import Server


class ServerModelHost:
    def __init__(self, server: Server, engine_settings: EngineSettings) -> None:
        self._server = server
        # An update may need a TensorRT engine that no one compiled yet: build it (it is
        # the "prepare" step) rather than fail or fall back silently.
        self.engine_settings = engine_settings.model_copy(update={"build_missing_engines": True})

    def serving(self) -> dict[str, str]:
        return {name: p.bundle.version for name, p in self._server.pipelines.items()}

    def open_engine(self, bundle: Bundle) -> Engine:
        return open_bundle_engine(bundle, self.engine_settings, self._server.engine_builder)

    def fuse(self, bundle: Bundle, engine: Engine, *, strict: bool = True) -> Engine:
        """After validation, the engine to serve with: the fused one where the bundle's steps
        fuse (closing `engine`), else `engine`. `strict` (an update): a fused graph that
        disagrees with the Python reference refuses the update, before it serves; not
        strict (a rollback): the Python steps serve instead."""
        if self.engine_settings.fused == "off":
            return engine
        try:
            served = open_serving_engine(bundle, self.engine_settings,
                                         self._server.engine_builder, strict=strict)
        except FusionMismatch as exc:
            engine.close()
            raise UpdateRejected(f"{exc}", step="validate") from None
        if isinstance(served, FusedEngine):
            engine.close()
            return served
        served.close()  # not fusable: the validated engine serves, with the Python steps
        return engine

    def warm_up(self, bundle: Bundle, engine: Engine) -> None:
        from runtime.daemon.pipeline import LoadedModel

        LoadedModel.of(bundle, engine).warm_up()

    def swap(self, bundle: Bundle, engine: Engine) -> None:
        pipeline = self._server.pipelines.get(bundle.name)
        if pipeline is None:
            raise SightlineError(f"this daemon does not serve {bundle.name!r}; serving "
                                 f"{', '.join(self._server.pipelines)}")
        pipeline.swap(bundle, engine)

    def health(self, name: str, stall_s: float = STALL_S) -> ModelHealth:
        pipeline = self._server.pipelines[name]
        return ModelHealth(pipeline.state(stall_s), pipeline.counters.results,
                           pipeline.counters.errors)
