"""The served model set: models by name, the default, each model's runner, reloads, health.

One object holds what the service reads on every call, so a request sees either the old set
or the new one, never a mix: ``get`` finds a model, ``runner`` the way to its graph (its
dynamic ``Batcher``, or a ``Direct`` run). A call's model and the runner it gets for it
belong to the same set, so its response names the version whose session ran it.

``reload`` loads the models folder again, validated and warmed up, swaps the new set in and
reports it to grpc.health.v1. Calls that started on the old set finish on it. Each call
borrows its batcher from ``runner`` until its graph run is over (a lease); a replaced batcher
closes when its last lease ends, at once when it has none, and the old models' sessions are
freed with the last call that holds them. A stream borrows per frame, so one open across a
reload keeps nothing of the old set alive: its next frame runs on the new one.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np
from grpc_health.v1 import health, health_pb2

from camserve.errors import NotFoundError, OperatorError
from camserve.explain.pipeline import Direct, Outputs, Runner
from camserve.server.batching import Batcher
from camserve.server.config import ServerConfig
from camserve.server.lifecycle import trim_freed_memory_soon
from camserve.server.metrics import Metrics
from camserve.server.runtime import ExplainerModel, load_models

log = logging.getLogger("camserve.server")

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@dataclass(frozen=True)
class ModelSet:
    """One generation of served models: by name, the default, and their batchers."""

    models: dict[str, ExplainerModel]
    default: str
    batchers: dict[str, Batcher] = field(default_factory=dict)


class Lease:
    """One call's ``Runner``: its model's batcher, lent from ``ModelRepository.runner`` until
    the call's graph run is over (the end of ``run``, or ``cancel`` when preparing failed);
    ``release`` is then called once."""

    def __init__(self, batcher: Batcher, release: Callable[[Batcher], None]) -> None:
        self.batcher = batcher
        self._release = release
        self._ended = False

    @property
    def model(self) -> ExplainerModel:
        return self.batcher.model

    def expect(self) -> None:
        self.batcher.expect()

    def cancel(self) -> None:
        try:
            self.batcher.cancel()
        finally:
            self._end()

    def run(self, image: np.ndarray, targets: np.ndarray, layers: list[str],
            alive: Callable[[], bool] = lambda: True) -> Outputs:
        """image [1,3,H,W], targets [K] -> ``Outputs`` of batch 1 (``Batcher.run``)."""
        try:
            return self.batcher.run(image, targets, layers, alive)
        finally:
            self._end()

    def _end(self) -> None:
        if not self._ended:
            self._ended = True
            self._release(self.batcher)


class ModelRepository:
    """The model set a server answers from. ``config`` (the models folder, device, threads,
    batching) is what ``reload`` reads again; ``health`` is told which models serve."""

    def __init__(self, models: dict[str, ExplainerModel], default: str | None = None, *,
                 config: ServerConfig | None = None, metrics: Metrics | None = None,
                 health_servicer: health.HealthServicer | None = None) -> None:
        if default is not None and default not in models:
            raise OperatorError(f"--default-model {default!r} is not among the loaded models: "
                                f"{', '.join(sorted(models))}")
        self.config = config or ServerConfig()
        self._reloadable = config is not None  # built from a models folder it can read again
        self.metrics = metrics or Metrics()
        self._health = health_servicer
        self._current = ModelSet(models, default or min(models),
                                 self._batchers(models) if config else {})
        self._reload_lock = threading.Lock()  # one reload at a time
        self._state_lock = threading.Lock()  # swap, leases and close
        self._closed = False
        # batchers not closed yet: the current set's, and replaced ones still lent
        self._open: list[Batcher] = list(self._current.batchers.values())
        self._leases: Counter[Batcher] = Counter()  # calls that borrowed each batcher
        self._replaced: set[Batcher] = set()  # to close when their last lease ends

    @classmethod
    def load(cls, config: ServerConfig, metrics: Metrics,
             health_servicer: health.HealthServicer) -> ModelRepository:
        """Every valid model of ``config.models``, validated and warmed up."""
        models = load_models(config.models, config.device, config.intra_op_threads,
                             cpu_arena=config.cpu_arena)
        return cls(models, config.default_model, config=config, metrics=metrics,
                   health_servicer=health_servicer)

    # --- what a call reads ----------------------------------------------------------------
    @property
    def models(self) -> dict[str, ExplainerModel]:
        return self._current.models

    @property
    def default(self) -> str:
        return self._current.default

    @property
    def batchers(self) -> dict[str, Batcher]:
        return self._current.batchers

    def get(self, name: str) -> ExplainerModel:
        """The model ``name`` (the default for ""); NotFoundError listing the others."""
        current = self._current
        name = name or current.default
        if name not in current.models:
            raise NotFoundError(f"unknown model {name!r}; this server has: "
                                f"{', '.join(sorted(current.models))}")
        return current.models[name]

    def runner(self, model: ExplainerModel) -> Runner:
        """The way to ``model``'s graph for one call: a lease on its batcher, also when a
        reload replaced ``model`` after the call read it (its batcher stays open for the
        call); a direct run when batching is off or that batcher is closed already. Pass it
        to ``Pipeline.explain``, which ends the lease."""
        with self._state_lock:
            batcher = next((b for b in self._open if b.model is model), None)
            if batcher is None:
                return Direct(model)
            self._leases[batcher] += 1
        return Lease(batcher, self._release)

    def _release(self, batcher: Batcher) -> None:
        """A call is done with ``batcher``; the last one closes it when it was replaced."""
        with self._state_lock:
            self._leases[batcher] -= 1
            if self._leases[batcher] > 0:
                return
            del self._leases[batcher]
            if batcher not in self._replaced:
                return
            self._replaced.discard(batcher)
            self._open.remove(batcher)
        batcher.close()
        trim_freed_memory_soon()  # the replaced model's memory goes back to the system

    def announce(self) -> None:
        """Tell health that every model of the current set serves."""
        if self._health is not None:
            for name in [""] + list(self.models):
                self._health.set(name, SERVING)

    # --- reload -----------------------------------------------------------------------------
    def reload(self) -> tuple[list[str], list[str]]:
        """Load the models folder again and swap the new set in; returns (loaded names,
        refused "file: why" lines). The replaced batchers close once no call borrows them.
        Raises CamserveError, keeping the old set, when the folder holds no usable model or
        the repository is closing."""
        with self._reload_lock:
            config = self.config
            if not self._reloadable:
                raise OperatorError("this server was not started with a models folder to "
                                    "reload")
            if self._closed:
                raise OperatorError("the server is shutting down")
            log.info("reloading models from %s", config.models)
            refused: list[str] = []
            models = load_models(config.models, config.device, config.intra_op_threads,
                                 refused, cpu_arena=config.cpu_arena)
            default = config.default_model
            if default and default not in models:
                log.warning("--default-model %r is not in the reloaded folder; the default is "
                            "now %r", default, min(models))
                default = None
            new = ModelSet(models, default or min(models), self._batchers(models))
            with self._state_lock:
                closing = self._closed
                if closing:
                    idle = list(new.batchers.values())
                else:
                    old, self._current = self._current, new
                    self._open += new.batchers.values()
                    idle = [b for b in old.batchers.values() if not self._leases[b]]
                    self._replaced.update(b for b in old.batchers.values() if self._leases[b])
                    self._open = [b for b in self._open if b not in idle]
            _close(idle)
            if closing:
                raise OperatorError("the server is shutting down")
            self._report_health(set(old.models), set(models))
            trim_freed_memory_soon()  # what no call still uses of the old set goes back
            log.info("reloaded: serving %s (versions %s)%s", ", ".join(sorted(models)),
                     ", ".join(models[name].version for name in sorted(models)),
                     f"; refused {len(refused)} file(s)" if refused else "")
            return sorted(models), refused

    def _report_health(self, before: set[str], after: set[str]) -> None:
        if self._health is None:
            return
        for name in after:
            self._health.set(name, SERVING)
        for name in before - after:
            self._health.set(name, NOT_SERVING)

    def _batchers(self, models: dict[str, ExplainerModel]) -> dict[str, Batcher]:
        config = self.config
        if not config.batching:
            return {}
        return {name: Batcher(model, config.max_batch_size, config.max_queue_delay_ms / 1e3,
                              self.metrics)
                for name, model in models.items()}

    # --- close ------------------------------------------------------------------------------
    def refuse_reloads(self) -> None:
        """From now on ``reload`` refuses (the server is stopping)."""
        with self._state_lock:
            self._closed = True

    def close(self) -> None:
        """Close every batcher, current and replaced; reloads are refused from now on."""
        with self._state_lock:
            self._closed = True
            batchers, self._open = self._open, []
            self._replaced.clear()
        _close(batchers)


def _close(batchers: Iterable[Batcher]) -> None:
    for batcher in batchers:
        batcher.close()
