"""The served model set: models by name, the default, each model's runner, reloads, health.

One object holds what the service reads on every call, so a request sees either the old set
or the new one, never a mix: ``get`` finds a model, ``runner`` the way to its graph (its
dynamic ``Batcher``, or a ``Direct`` run). ``reload`` loads the models folder again,
validated and warmed up, swaps the new set in and reports it to grpc.health.v1; the batchers
it replaces are closed once the calls that started before the swap are done.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field

from grpc_health.v1 import health, health_pb2

from camserve.errors import NotFoundError, OperatorError
from camserve.explain.pipeline import Direct, Runner
from camserve.server.batching import Batcher
from camserve.server.config import ServerConfig
from camserve.server.lifecycle import Gate
from camserve.server.metrics import Metrics
from camserve.server.runtime import ExplainerModel, load_models

log = logging.getLogger("camserve.server")

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
RETIRE_WAIT_SECONDS = 5.0  # after the grace period: how long queued batches may still drain


@dataclass(frozen=True)
class ModelSet:
    """One generation of served models: by name, the default, and their batchers."""

    models: dict[str, ExplainerModel]
    default: str
    batchers: dict[str, Batcher] = field(default_factory=dict)


class ModelRepository:
    """The model set a server answers from. ``config`` (the models folder, device, threads,
    batching) is what ``reload`` reads again; ``health`` is told which models serve."""

    def __init__(self, models: dict[str, ExplainerModel], default: str | None = None, *,
                 config: ServerConfig | None = None, metrics: Metrics | None = None,
                 health_servicer: health.HealthServicer | None = None,
                 gate: Gate | None = None) -> None:
        if default is not None and default not in models:
            raise OperatorError(f"--default-model {default!r} is not among the loaded models: "
                                f"{', '.join(sorted(models))}")
        self.config = config or ServerConfig()
        self._reloadable = config is not None  # built from a models folder it can read again
        self.metrics = metrics or Metrics()
        self._health = health_servicer
        self._gate = gate or Gate()
        self._current = ModelSet(models, default or sorted(models)[0],
                                 self._batchers(models) if config else {})
        self._reload_lock = threading.Lock()  # one reload at a time
        self._state_lock = threading.Lock()  # swap vs close
        self._closed = False
        self._retiring: list[Batcher] = []  # replaced batchers not closed yet

    @classmethod
    def load(cls, config: ServerConfig, metrics: Metrics, health_servicer: health.HealthServicer,
             gate: Gate) -> "ModelRepository":
        """Every valid model of ``config.models``, validated and warmed up."""
        models = load_models(config.models, config.device, config.intra_op_threads)
        return cls(models, config.default_model, config=config, metrics=metrics,
                   health_servicer=health_servicer, gate=gate)

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
        """The model's batcher; a direct run when batching is off or ``model`` was read just
        before a reload replaced it."""
        batcher = self._current.batchers.get(model.name)
        return batcher if batcher is not None and batcher.model is model else Direct(model)

    def announce(self) -> None:
        """Tell health that every model of the current set serves."""
        if self._health is not None:
            for name in [""] + list(self.models):
                self._health.set(name, SERVING)

    # --- reload -----------------------------------------------------------------------------
    def reload(self) -> tuple[list[str], list[str]]:
        """Load the models folder again and swap the new set in; returns (loaded names,
        refused "file: why" lines). Raises CamserveError, keeping the old set, when the
        folder holds no usable model or the repository is closing."""
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
                                 refused)
            default = config.default_model
            if default and default not in models:
                log.warning("--default-model %r is not in the reloaded folder; the default is "
                            "now %r", default, sorted(models)[0])
                default = None
            new = ModelSet(models, default or sorted(models)[0], self._batchers(models))
            with self._state_lock:
                if self._closed:
                    _close(new.batchers.values())
                    raise OperatorError("the server is shutting down")
                old, self._current = self._current, new
                last_old = self._gate.advance()
                self._retiring += old.batchers.values()
            self._report_health(set(old.models), set(models))
            if old.batchers:
                threading.Thread(target=self._retire, args=(list(old.batchers.values()),
                                                            last_old),
                                 daemon=True, name="retire-batchers").start()
            log.info("reloaded: serving %s%s", ", ".join(sorted(models)),
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

    def _retire(self, batchers: list[Batcher], generation: int) -> None:
        """Close replaced batchers once the calls that may hold them are done (a stream
        open longer than the grace period no longer delays it)."""
        self._gate.wait_idle(max(self.config.grace_seconds, 1.0), upto=generation)
        deadline = time.monotonic() + RETIRE_WAIT_SECONDS
        while any(b.pending for b in batchers) and time.monotonic() < deadline:
            time.sleep(0.01)
        _close(batchers)
        with self._state_lock:
            self._retiring = [b for b in self._retiring if b not in batchers]

    # --- close ------------------------------------------------------------------------------
    def refuse_reloads(self) -> None:
        """From now on ``reload`` refuses (the server is stopping)."""
        with self._state_lock:
            self._closed = True

    def close(self) -> None:
        """Close every batcher, current and retiring; reloads are refused from now on."""
        with self._state_lock:
            self._closed = True
            batchers = list(self._current.batchers.values()) + self._retiring
        _close(batchers)


def _close(batchers) -> None:
    for batcher in batchers:
        batcher.close()
