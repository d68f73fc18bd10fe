"""Envoy in front of several camserve replicas: the bootstrap configuration, as a pure function.

``bootstrap`` returns the configuration as a dict (written as JSON, which Envoy reads as
YAML too). One listener takes gRPC on ``listen_host:listen_port`` and sends every call to a
cluster of the replicas:

- HTTP/2 to the replicas, balanced by least requests;
- active ``grpc.health.v1`` checks (service ""), and a zero panic threshold, so a replica
  whose health is not SERVING (starting, draining after SIGTERM, gone) gets no calls;
- retries on UNAVAILABLE, CANCELLED (by the replica), refused connections, refused
  streams and resets, each to a replica not tried yet for that call, bounded in number and
  by a budget (RESOURCE_EXHAUSTED goes back to the caller: see ``RETRY_ON``);
- outlier detection for replicas that keep failing between two health checks;
- the caller's ``grpc-timeout`` is the call's only deadline (no route timeout);
- optionally TLS to the replicas (``UpstreamTls``, for replicas on other hosts): their
  certificates must chain to a given CA (and name a given server name), Envoy shows a client
  certificate of its own for replicas that ask for one; health checks on the replicas'
  health-only ports stay plaintext, as ``camserve serve --health-port`` serves them;
- request bodies up to the server's message limit are kept for a retry; a larger one that
  Envoy would have to retry (its replica died while the body was arriving) is answered
  RESOURCE_EXHAUSTED, as a replica answers it (``oversize_reply``), not Envoy's UNKNOWN;
- the admin interface on loopback only.

``python -m camserve.server.cluster.envoy HOST:PORT ... [--host H] [--port P] [--admin-port A]
[--upstream-tls-ca FILE [--upstream-tls-cert FILE --upstream-tls-key FILE]]`` prints the
configuration for other addresses.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from camserve.errors import CamserveError, OperatorError

CLUSTER = "camserve"
ADMIN_HOST = "127.0.0.1"  # the admin interface can reconfigure and stop Envoy: loopback only
MAX_MESSAGE_BYTES = 16 * 1024 * 1024  # the server's default receive and send limit
# room for the gRPC frame header (5 bytes) and HTTP/2 framing around one such message
BODY_MARGIN_BYTES = 64 * 1024
HEALTH_INTERVAL_S = 1.0  # between two health checks of a replica
# gRPC statuses and transport failures retried on another replica. A replica shutting down
# answers UNAVAILABLE, and CANCELLED for calls its transport had taken but not yet handed to
# a worker when it closed; Explain has no side effects, so either is safe to send elsewhere.
# (A caller that cancels leaves no answer to retry.) RESOURCE_EXHAUSTED is passed back, not
# retried: most such refusals hold on every replica (a message over the size limit, too many
# targets, an image too large), and a message over the limit is refused while its body is
# still arriving: Envoy, waiting to retry it, overflowed its retry buffer and answered
# UNKNOWN ("exceeded request buffer limit while retrying upstream") about once in 100 calls.
# A replica refusing for load is rare behind least-request balancing; the caller's back-off
# handles it, as gRPC advises for RESOURCE_EXHAUSTED.
RETRY_ON = "unavailable,cancelled,connect-failure,refused-stream,reset"

_HCM = ("type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3."
        "HttpConnectionManager")
_ROUTER = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
_UPSTREAM_HTTP = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
_PREVIOUS_HOSTS = ("type.googleapis.com/envoy.extensions.retry.host.previous_hosts.v3."
                   "PreviousHostsPredicate")
_DOWNSTREAM_TLS = ("type.googleapis.com/envoy.extensions.transport_sockets.tls.v3."
                   "DownstreamTlsContext")
_UPSTREAM_TLS = ("type.googleapis.com/envoy.extensions.transport_sockets.tls.v3."
                 "UpstreamTlsContext")
_RAW_BUFFER = ("type.googleapis.com/envoy.extensions.transport_sockets.raw_buffer.v3."
               "RawBuffer")
# health checks carry this criterion, and the cluster's only transport socket match with it
# is plaintext: with TLS to the replicas, their (plaintext) health ports are still checked
PLAINTEXT_HEALTH = {"camserve_health": "plaintext"}
_CONNECTIONS_MONITOR = ("type.googleapis.com/envoy.extensions.resource_monitors."
                        "downstream_connections.v3.DownstreamConnectionsConfig")


def split_address(address: str) -> tuple[str, int]:
    """"host:port" (IPv6 in brackets) -> (host, port); OperatorError when malformed."""
    host, sep, port = address.strip().rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise OperatorError(f"replica address {address!r} is not HOST:PORT")
    return host, int(port)


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _socket(host: str, port: int) -> dict[str, Any]:
    return {"socket_address": {"address": host, "port_value": port}}


def _seconds(value: float) -> str:
    """A protobuf Duration in JSON: "1s", "0.25s"."""
    return f"{value:g}s"


def health_check(interval_s: float = HEALTH_INTERVAL_S,
                 timeout_s: float = 2.0) -> dict[str, Any]:
    """Active grpc.health.v1 checks of the whole server (service "").

    A NOT_SERVING answer marks a replica unhealthy at once; missed answers (a busy or dead
    replica) do so after three in a row. Two SERVING answers bring it back, one at startup.
    """
    return {
        "timeout": _seconds(timeout_s),
        "interval": _seconds(interval_s),
        "interval_jitter": _seconds(interval_s / 10),
        # Envoy checks a cluster that has carried no call yet only this often
        "no_traffic_interval": _seconds(max(interval_s, 5.0)),
        "unhealthy_threshold": 3,
        "healthy_threshold": 2,
        "grpc_health_check": {"service_name": ""},
    }


def retry_policy(num_retries: int) -> dict[str, Any]:
    """Retry a refused or broken call on another replica, at most ``num_retries`` times."""
    return {
        "retry_on": RETRY_ON,
        "num_retries": num_retries,
        # a retry goes to a replica this call has not tried yet
        "retry_host_predicate": [{"name": "envoy.retry_host_predicates.previous_hosts",
                                  "typed_config": {"@type": _PREVIOUS_HOSTS}}],
        "host_selection_retry_max_attempts": 5,
        "retry_back_off": {"base_interval": "0.025s", "max_interval": "0.25s"},
    }


def upstream_cluster(replicas: Sequence[str], health: dict[str, Any],
                     health_ports: Sequence[int | None] | None = None,
                     tls: UpstreamTls | None = None) -> dict[str, Any]:
    """The replicas as one cluster: STATIC for IP addresses, STRICT_DNS when a name needs
    resolving (every address a name resolves to becomes a replica). ``health_ports[i]``, when
    given, is the port replica i answers health checks on (``camserve serve --health-port``,
    which a saturated replica still answers); else its gRPC port. With ``tls`` Envoy talks
    TLS to the replicas' gRPC ports (plaintext to their health ports)."""
    endpoints = [split_address(address) for address in replicas]
    ports = list(health_ports) if health_ports is not None else [None] * len(endpoints)
    static = all(_is_ip(host) for host, _ in endpoints)
    cluster: dict[str, Any] = {
        "name": CLUSTER,
        "type": "STATIC" if static else "STRICT_DNS",
        "connect_timeout": "1s",
        "lb_policy": "LEAST_REQUEST",
        "load_assignment": {"cluster_name": CLUSTER, "endpoints": [{"lb_endpoints": [
            {"endpoint": _endpoint(host, port, health_port)}
            for (host, port), health_port in zip(endpoints, ports)]}]},
        "typed_extension_protocol_options": {_UPSTREAM_HTTP: {
            "@type": f"type.googleapis.com/{_UPSTREAM_HTTP}",
            "explicit_http_config": {"http2_protocol_options": {}}}},
        "health_checks": [health],
        # never route to a replica that failed its health checks, even when few are left
        "common_lb_config": {"healthy_panic_threshold": {"value": 0.0}},
        "outlier_detection": {
            # gRPC statuses count as HTTP codes here: UNAVAILABLE 503, INTERNAL 500
            "consecutive_5xx": 5,
            "consecutive_gateway_failure": 5,
            "enforcing_consecutive_gateway_failure": 100,
            "interval": "2s",
            "base_ejection_time": "10s",
            "max_ejection_percent": 50,
        },
        "circuit_breakers": {"thresholds": [{
            "priority": "DEFAULT",
            # retries in flight: a fifth of the calls in flight, at least 32
            "retry_budget": {"budget_percent": {"value": 20.0}, "min_retry_concurrency": 32},
        }]},
    }
    if not static:
        cluster["dns_lookup_family"] = "V4_PREFERRED"
    if tls is not None:
        cluster["transport_socket"] = tls.transport_socket()
        if any(port is not None for port in ports):  # the health ports are plaintext
            cluster["transport_socket_matches"] = [{
                "name": "plaintext-health", "match": PLAINTEXT_HEALTH,
                "transport_socket": {"name": "envoy.transport_sockets.raw_buffer",
                                     "typed_config": {"@type": _RAW_BUFFER}}}]
            health["transport_socket_match_criteria"] = PLAINTEXT_HEALTH
    return cluster


@dataclass(frozen=True)
class UpstreamTls:
    """TLS from Envoy to the replicas: their certificates must chain to ``ca`` (and, with
    ``server_name``, name it: it is also sent as SNI); ``cert`` and ``key``, when given, are
    Envoy's client certificate (replicas started with --tls-client-ca ask for one)."""

    ca: Path
    cert: Path | None = None
    key: Path | None = None
    server_name: str | None = None

    def transport_socket(self) -> dict[str, Any]:
        validation: dict[str, Any] = {"trusted_ca": {"filename": str(self.ca)}}
        if self.server_name:
            validation["match_typed_subject_alt_names"] = [
                {"san_type": "DNS", "matcher": {"exact": self.server_name}}]
        context: dict[str, Any] = {"validation_context": validation,
                                   "alpn_protocols": ["h2"]}  # gRPC
        if self.cert is not None:
            context["tls_certificates"] = [{"certificate_chain": {"filename": str(self.cert)},
                                            "private_key": {"filename": str(self.key)}}]
        tls: dict[str, Any] = {"@type": _UPSTREAM_TLS, "common_tls_context": context}
        if self.server_name:
            tls["sni"] = self.server_name
        return {"name": "envoy.transport_sockets.tls", "typed_config": tls}


def upstream_tls(ca: Path | None, cert: Path | None = None, key: Path | None = None,
                 server_name: str | None = None) -> UpstreamTls | None:
    """``UpstreamTls`` from the --upstream-tls-* options (None without them), with absolute
    paths of files that exist; OperatorError for an incomplete or unreadable set."""
    if ca is None and cert is None and key is None and not server_name:
        return None
    if ca is None:
        raise OperatorError("TLS to the replicas needs --upstream-tls-ca (the CA their "
                            "certificates chain to)")
    if (cert is None) != (key is None):
        raise OperatorError("a client certificate for the replicas needs both "
                            "--upstream-tls-cert and --upstream-tls-key")
    files = {"--upstream-tls-ca": ca, "--upstream-tls-cert": cert, "--upstream-tls-key": key}
    for flag, path in files.items():
        if path is not None and not Path(path).is_file():
            raise OperatorError(f"{flag} {str(path)!r} is not a readable file")
    return UpstreamTls(Path(ca).resolve(), Path(cert).resolve() if cert else None,
                       Path(key).resolve() if key else None, server_name or None)


@dataclass(frozen=True)
class ListenerTls:
    """PEM files for TLS on the listener: ``cert`` (chain) and ``key``; with ``client_ca``,
    callers must show a certificate it signed (mutual TLS). Envoy reads them at start."""

    cert: Path
    key: Path
    client_ca: Path | None = None

    def transport_socket(self) -> dict[str, Any]:
        context: dict[str, Any] = {
            "tls_certificates": [{"certificate_chain": {"filename": str(self.cert)},
                                  "private_key": {"filename": str(self.key)}}],
            "alpn_protocols": ["h2"],  # gRPC
        }
        tls: dict[str, Any] = {"@type": _DOWNSTREAM_TLS, "common_tls_context": context}
        if self.client_ca is not None:
            context["validation_context"] = {"trusted_ca": {"filename": str(self.client_ca)}}
            tls["require_client_certificate"] = True
        return {"name": "envoy.transport_sockets.tls", "typed_config": tls}


def oversize_reply(max_message_bytes: int) -> dict[str, Any]:
    """Envoy's own answer to a body over its retry buffer, as a replica would give it.

    A body larger than ``request_body_buffer_limit`` is streamed to one replica, which
    refuses it RESOURCE_EXHAUSTED. If that replica dies (or resets) while the body is still
    arriving, Envoy holds the call for a retry, its buffer overflows, and it answers HTTP 507,
    which gRPC callers would see as UNKNOWN ("exceeded request buffer limit while retrying
    upstream"). This mapper turns that 507 (the router sends it for nothing else) into
    RESOURCE_EXHAUSTED with a message that says what to do. Envoy keeps a ``grpc-status``
    already set on a local reply; the body becomes ``grpc-message``."""
    mib = max_message_bytes / (1024 * 1024)
    return {"mappers": [{
        "filter": {"status_code_filter": {"comparison": {
            "op": "EQ", "value": {"default_value": 507, "runtime_key": "camserve.oversize"}}}},
        "headers_to_add": [{"header": {"key": "grpc-status", "value": "8"},  # RESOURCE_EXHAUSTED
                            "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}],
        "body": {"inline_string": (
            f"request message larger than the replicas' {mib:g} MiB limit: send a smaller "
            "or JPEG-encoded image, or raise the replicas' --max-message-bytes")},
    }]}


def listener(listen_host: str, listen_port: int, num_retries: int,
             max_message_bytes: int, tls: ListenerTls | None = None) -> dict[str, Any]:
    """The gRPC listener: every call goes to the replicas, with the caller's deadline;
    TLS-only with ``tls``."""
    route = {
        "match": {"prefix": "/"},
        "route": {
            "cluster": CLUSTER,
            # no deadline of Envoy's own: the caller's grpc-timeout header goes to the replica,
            # which ends the call DEADLINE_EXCEEDED, and the caller's library enforces it too.
            # (Envoy enforcing it, max_stream_duration, reset streams whose response had
            # begun: the caller saw INTERNAL instead of DEADLINE_EXCEEDED.)
            "timeout": "0s",
            "retry_policy": retry_policy(num_retries),
        },
    }
    manager = {
        "@type": _HCM,
        "stat_prefix": "camserve",
        "codec_type": "AUTO",
        "route_config": {"name": "camserve", "virtual_hosts": [{
            "name": "camserve", "domains": ["*"], "routes": [route],
            # a request body up to the server's limit is kept so that it can be retried
            "request_body_buffer_limit": max_message_bytes + BODY_MARGIN_BYTES,
        }]},
        "local_reply_config": oversize_reply(max_message_bytes),
        "http_filters": [{"name": "envoy.filters.http.router",
                          "typed_config": {"@type": _ROUTER}}],
    }
    chain: dict[str, Any] = {"filters": [{"name": "envoy.filters.network.http_connection_manager",
                                          "typed_config": manager}]}
    if tls is not None:
        chain["transport_socket"] = tls.transport_socket()
    return {
        "name": "camserve_grpc",
        "address": _socket(listen_host, listen_port),
        "filter_chains": [chain],
    }


def _endpoint(host: str, port: int, health_port: int | None) -> dict[str, Any]:
    endpoint: dict[str, Any] = {"address": _socket(host, port)}
    if health_port is not None:
        endpoint["health_check_config"] = {"port_value": health_port}
    return endpoint


def bootstrap(replicas: Sequence[str], *, listen_host: str = "127.0.0.1",
              listen_port: int = 50050, admin_port: int = 9901, num_retries: int = 2,
              health_interval_s: float = HEALTH_INTERVAL_S,
              health_ports: Sequence[int | None] | None = None,
              tls: ListenerTls | None = None,
              max_message_bytes: int = MAX_MESSAGE_BYTES,
              max_connections: int = 10_000,
              upstream: UpstreamTls | None = None) -> dict[str, Any]:
    """Envoy's bootstrap configuration for ``replicas`` ("host:port" each) behind one gRPC
    listener on ``listen_host:listen_port`` (port 0: any free port; TLS-only with ``tls``),
    the admin interface on 127.0.0.1:``admin_port`` (0: any free port); ``health_ports`` and
    ``upstream`` (TLS to the replicas) as for ``upstream_cluster``."""
    if not replicas:
        raise OperatorError("at least one replica address is needed")
    if health_ports is not None and (
            len(health_ports) != len(replicas)
            or any(p is not None and not 0 < p < 65536 for p in health_ports)):
        raise OperatorError("give one health port (1..65535) per replica")
    if not 0 <= listen_port < 65536 or not 0 <= admin_port < 65536:
        raise OperatorError("ports must be within 0..65535")
    if num_retries < 0:
        raise OperatorError("the number of retries must be >= 0")
    return {
        "admin": {"address": _socket(ADMIN_HOST, admin_port)},
        "static_resources": {
            "listeners": [listener(listen_host, listen_port, num_retries, max_message_bytes,
                                   tls)],
            "clusters": [upstream_cluster(replicas, health_check(health_interval_s),
                                          health_ports, upstream)],
        },
        "overload_manager": {"resource_monitors": [{
            "name": "envoy.resource_monitors.global_downstream_max_connections",
            "typed_config": {"@type": _CONNECTIONS_MONITOR,
                             "max_active_downstream_connections": max_connections}}]},
    }


def listener_tls(cert: Path | None, key: Path | None,
                 client_ca: Path | None = None) -> ListenerTls | None:
    """``ListenerTls`` from the --tls-* options (None without them), with absolute paths of
    files that exist; OperatorError for an incomplete or unreadable set."""
    if cert is None and key is None and client_ca is None:
        return None
    if cert is None or key is None:
        raise OperatorError("TLS needs both --tls-cert and --tls-key"
                            + (" (--tls-client-ca is mutual TLS on top)" if client_ca else ""))
    files = {"--tls-cert": cert, "--tls-key": key, "--tls-client-ca": client_ca}
    for flag, path in files.items():
        if path is not None and not Path(path).is_file():
            raise OperatorError(f"{flag} {str(path)!r} is not a readable file")
    return ListenerTls(Path(cert).resolve(), Path(key).resolve(),
                       Path(client_ca).resolve() if client_ca is not None else None)


def render(config: dict[str, Any]) -> str:
    """The configuration as the JSON text Envoy reads (``-c FILE``)."""
    return json.dumps(config, indent=2) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    """Print the configuration for the replica addresses given on the command line."""
    parser = argparse.ArgumentParser(
        prog="python -m camserve.server.cluster.envoy",
        description="Print Envoy's configuration for camserve replicas (JSON).")
    parser.add_argument("replicas", nargs="+", metavar="HOST:PORT",
                        help="a replica's address (IP, or a name Envoy resolves)")
    parser.add_argument("--host", default="127.0.0.1", help="listen address (default loopback)")
    parser.add_argument("--port", type=int, default=50050, help="listen port (default 50050)")
    parser.add_argument("--admin-port", type=int, default=9901,
                        help="admin port, always on 127.0.0.1 (default 9901)")
    parser.add_argument("--retries", type=int, default=2,
                        help="most retries of one call, each on another replica (default 2)")
    parser.add_argument("--health-port", type=int, default=None,
                        help="the replicas answer health checks on this port (their "
                             "'camserve serve --health-port'; default: their gRPC port, "
                             "where a saturated replica refuses them)")
    parser.add_argument("--tls-cert", type=Path, metavar="FILE",
                        help="PEM certificate (chain) for TLS on the listener, with --tls-key")
    parser.add_argument("--tls-key", type=Path, metavar="FILE", help="PEM key of --tls-cert")
    parser.add_argument("--tls-client-ca", type=Path, metavar="FILE",
                        help="PEM CA: callers must show a certificate it signed (mutual TLS)")
    parser.add_argument("--upstream-tls-ca", type=Path, metavar="FILE",
                        help="TLS to the replicas (on other hosts): PEM CA their certificates "
                             "must chain to (they serve with 'camserve serve --tls-cert')")
    parser.add_argument("--upstream-tls-cert", type=Path, metavar="FILE",
                        help="PEM client certificate Envoy shows the replicas (for replicas "
                             "with --tls-client-ca), with --upstream-tls-key")
    parser.add_argument("--upstream-tls-key", type=Path, metavar="FILE",
                        help="PEM key of --upstream-tls-cert")
    parser.add_argument("--upstream-tls-server-name", metavar="NAME",
                        help="the name the replicas' certificates must carry (DNS SAN), also "
                             "sent as SNI (default: any certificate the CA signed)")
    args = parser.parse_args(argv)
    try:
        health_ports = (None if args.health_port is None
                        else [args.health_port] * len(args.replicas))
        config = bootstrap(args.replicas, listen_host=args.host, listen_port=args.port,
                           admin_port=args.admin_port, num_retries=args.retries,
                           health_ports=health_ports,
                           tls=listener_tls(args.tls_cert, args.tls_key, args.tls_client_ca),
                           upstream=upstream_tls(args.upstream_tls_ca, args.upstream_tls_cert,
                                                 args.upstream_tls_key,
                                                 args.upstream_tls_server_name))
    except CamserveError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    sys.stdout.write(render(config))
    return 0


if __name__ == "__main__":
    sys.exit(main())
