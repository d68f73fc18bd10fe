"""The one source of ``camserve serve``'s options: ``ServerConfig``, its flags and its argv.

Each option is declared once, as a field of ``ServerConfig`` with its flag and help text in
the field's metadata. ``add_arguments`` puts the flags on a parser (``camserve serve``, or
the replica group of ``camserve cluster``), ``from_args`` reads them back, and ``to_argv``
renders a config as the command line that recreates it (how ``camserve cluster`` starts
its replicas), so the three can never disagree.
"""

from __future__ import annotations

import argparse
from dataclasses import MISSING, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Iterable

DEVICES = ("auto", "cpu", "cuda")


def _option(default: Any, help: str, *, flag: str | None = None, metavar: str | None = None,
            choices: tuple[str, ...] | None = None, negate: str | None = None) -> Any:
    """A config field with its command-line flag (default: --field-name); ``negate`` makes
    a boolean that defaults to True a ``--no-...`` switch."""
    return field(default=default, metadata={"help": help, "flag": flag, "metavar": metavar,
                                             "choices": choices, "negate": negate})


@dataclass(frozen=True)
class ServerConfig:
    """Everything ``camserve serve`` can be told. Defaults are the documented ones."""

    models: Path = _option(Path("models"), "models folder")
    host: str = _option("127.0.0.1", "bind address (default: loopback)")
    port: int = _option(50051, "port (0: any free port)")
    device: str = _option("auto", "execution provider: CUDA when it works (auto), or the one "
                          "named", choices=DEVICES)
    intra_op_threads: int | None = _option(None, "onnxruntime threads per inference (default: "
                                           "onnxruntime's choice)")
    cpu_arena: bool = _option(True, "onnxruntime's CPU memory arena, one per process (fast "
                              "graph runs; it keeps what it took, which --max-inflight-mb "
                              "counts as held, up to half the budget): --no-cpu-arena gives "
                              "graph memory back after each run, graph runs slower",
                              negate="--no-cpu-arena")
    batching: bool = _option(True, "run every request on its own", negate="--no-batching")
    max_batch_size: int = _option(8, "dynamic batching: most requests per graph run")
    max_queue_delay_ms: float = _option(2.0, "dynamic batching: longest wait for a batch to "
                                        "fill, in ms")
    default_model: str | None = _option(None, "model for requests that name none (default: "
                                        "first by name)")
    tls_cert: Path | None = _option(None, "PEM certificate (chain) of the server; with "
                                    "--tls-key, serve TLS only", metavar="FILE")
    tls_key: Path | None = _option(None, "PEM private key of --tls-cert", metavar="FILE")
    tls_client_ca: Path | None = _option(None, "PEM CA certificate(s): require client "
                                         "certificates it signed (mutual TLS)", metavar="FILE")
    auth_token_file: Path | None = _option(None, "file holding one bearer token; every call "
                                           "but health and reflection must send metadata "
                                           "'authorization: Bearer <token>'", metavar="FILE")
    workers: int = _option(16, "calls answered at once")
    max_queue: int = _option(64, "calls waiting for a worker; more are refused with "
                             "RESOURCE_EXHAUSTED at once")
    max_message_bytes: int = _option(16 * 1024 * 1024, "largest request or response, in bytes")
    metrics_port: int | None = _option(None, "serve Prometheus metrics on this port (same "
                                       "host; 0: any free port)")
    health_port: int | None = _option(None, "also serve grpc.health.v1 alone on this port "
                                      "(same host, plaintext, threads of its own): probes there "
                                      "are answered even when the main port is saturated")
    grace_seconds: float = _option(10.0, "on SIGTERM/SIGINT: how long calls in flight may take "
                                   "to finish; SIGHUP reloads the models folder")
    drain_seconds: float = _option(0.0, "on SIGTERM/SIGINT, before new calls are refused: how "
                                   "long health says NOT_SERVING while calls are still taken, "
                                   "so that a load balancer's health checks take the server out "
                                   "first (camserve cluster sets it for its replicas)")
    max_connection_age: float | None = _option(
        None, "close each client connection after this many seconds (gRPC's "
        "max_connection_age, +/-10%% jitter), so clients reconnect and a load balancer "
        "spreads them over new replicas (default: off)", metavar="SECONDS")
    max_connection_age_grace: float | None = _option(
        None, "after --max-connection-age: how long the calls and streams still running on a "
        "closed connection may take to finish before they are cancelled (default: no limit)",
        metavar="SECONDS")
    max_inflight_mb: float | None = _option(
        None, "memory budget of the requests in flight, in MiB: each request's peak memory "
        "is estimated before it is admitted (decoded frame, preprocessing copies, smoothing "
        "and Score-CAM batches, maps), and one that would take the total over the budget is "
        "refused with RESOURCE_EXHAUSTED at once (default: a quarter of physical memory; "
        "0: no budget)", metavar="MIB")

    def with_(self, **changes: Any) -> "ServerConfig":
        """A copy with ``changes`` (``dataclasses.replace``)."""
        return replace(self, **changes)


SECURITY = ("tls_cert", "tls_key", "tls_client_ca", "auth_token_file")


def _flag(spec) -> str:
    return spec.metadata["flag"] or "--" + spec.name.replace("_", "-")


def _type(spec) -> type:
    """The Python type of a field's command-line value (from its default or annotation)."""
    text = str(spec.type)
    for name, kind in (("Path", Path), ("float", float), ("int", int)):
        if name in text:
            return kind
    return str


def add_arguments(parser: argparse.ArgumentParser | argparse._ArgumentGroup,
                  names: Iterable[str] | None = None) -> None:
    """Add the flags of ``names`` (default: every field) to ``parser``; each help text ends
    with the default when there is one worth saying."""
    wanted = set(names) if names is not None else None
    for spec in fields(ServerConfig):
        if wanted is not None and spec.name not in wanted:
            continue
        meta = spec.metadata
        if meta["negate"]:
            parser.add_argument(meta["negate"], dest=spec.name, action="store_false",
                                default=spec.default, help=meta["help"])
            continue
        default = spec.default if spec.default is not MISSING else None
        shown = f" (default {default})" if default not in (None, "") and \
            "default" not in meta["help"] else ""
        parser.add_argument(_flag(spec), dest=spec.name, type=_type(spec), default=default,
                            choices=meta["choices"], metavar=meta["metavar"],
                            help=meta["help"] + shown)


def from_args(args: argparse.Namespace, **changes: Any) -> ServerConfig:
    """The ServerConfig a parsed command line asks for (fields it has no flag for keep their
    defaults), with ``changes`` applied."""
    given = {spec.name: getattr(args, spec.name) for spec in fields(ServerConfig)
             if hasattr(args, spec.name)}
    return ServerConfig(**{**given, **changes})


def to_argv(config: ServerConfig) -> list[str]:
    """The ``camserve serve`` flags that recreate ``config``: every field that differs from
    its default, in declaration order."""
    argv: list[str] = []
    for spec in fields(ServerConfig):
        value = getattr(config, spec.name)
        if value == spec.default:
            continue
        if spec.metadata["negate"]:
            argv.append(spec.metadata["negate"])
        elif value is not None:
            argv += [_flag(spec), str(value)]
    return argv
