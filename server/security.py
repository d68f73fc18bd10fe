"""Transport security and authentication for the server: TLS / mutual TLS credentials, a
bearer-token interceptor, and an interceptor that refuses bytes that are not a message.

The token guards every RPC except ``grpc.health.v1.Health`` (probes carry no credentials) and
server reflection. It is compared in constant time and never logged.
"""

from __future__ import annotations

import hmac
import logging
from pathlib import Path
from typing import Any, Callable, Iterator

import grpc

from camserve.errors import CallerError, CamserveError

log = logging.getLogger("camserve.server")

# Services answered without a token: health probes and reflection (method names are
# "/<package>.<Service>/<Method>").
OPEN_SERVICES = ("/grpc.health.v1.Health/", "/grpc.reflection.v1alpha.ServerReflection/",
                 "/grpc.reflection.v1.ServerReflection/")

AUTH_HINT = ("send call metadata 'authorization: Bearer <token>' with the token from the "
             "server's --auth-token-file (Python SDK: Client(..., token=TOKEN))")


def is_open(method: str) -> bool:
    """Whether an RPC (its full method name) is answered without a token."""
    return method.startswith(OPEN_SERVICES)


def read_token(path: Path) -> str:
    """The token in ``path`` (surrounding whitespace stripped); a clear error when the file
    is missing, unreadable, empty or holds more than one token."""
    path = Path(path)
    try:
        token = path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        raise CamserveError(f"--auth-token-file {str(path)!r} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise CamserveError(f"--auth-token-file {str(path)!r} cannot be read "
                            f"({type(exc).__name__}: {exc})") from None
    if not token:
        raise CamserveError(f"--auth-token-file {str(path)!r} is empty; put one token in it")
    if any(c.isspace() for c in token) or not token.isprintable() or not token.isascii():
        raise CamserveError(f"--auth-token-file {str(path)!r} must hold one token: printable "
                            "ASCII without spaces or line breaks")
    return token


def _read_pem(path: Path, flag: str, kind: str) -> bytes:
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise CamserveError(f"{flag} {str(path)!r} does not exist") from None
    except OSError as exc:
        raise CamserveError(f"{flag} {str(path)!r} cannot be read ({exc})") from None
    if b"-----BEGIN" not in data or kind.encode() not in data:
        raise CamserveError(f"{flag} {str(path)!r} is not a PEM file holding a {kind}")
    return data


def server_credentials(cert: Path, key: Path,
                       client_ca: Path | None = None) -> grpc.ServerCredentials:
    """TLS credentials from PEM files: the server's certificate chain and private key; with
    ``client_ca``, clients must present a certificate signed by that CA (mutual TLS)."""
    chain = _read_pem(cert, "--tls-cert", "CERTIFICATE")
    private_key = _read_pem(key, "--tls-key", "PRIVATE KEY")
    roots = _read_pem(client_ca, "--tls-client-ca", "CERTIFICATE") if client_ca else None
    return grpc.ssl_server_credentials([(private_key, chain)], root_certificates=roots,
                                       require_client_auth=roots is not None)


def refusal(handler: grpc.RpcMethodHandler, code: grpc.StatusCode,
            message: str) -> grpc.RpcMethodHandler:
    """A handler of the same kind as ``handler`` that answers every call with ``code``."""
    def refuse(request, context):
        context.abort(code, message)

    def refuse_streaming(request, context):
        context.abort(code, message)
        yield  # pragma: no cover -- makes this a generator, as a streaming handler must be

    behavior = refuse_streaming if handler.response_streaming else refuse
    return _like(handler, behavior, handler.request_deserializer)


def _like(handler: grpc.RpcMethodHandler, behavior: Callable,
          deserializer: Callable | None) -> grpc.RpcMethodHandler:
    """A handler of the same streaming kinds as ``handler`` running ``behavior``."""
    make: Callable = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }[(handler.request_streaming, handler.response_streaming)]
    return make(behavior, request_deserializer=deserializer,
                response_serializer=handler.response_serializer)


class TokenAuthInterceptor(grpc.ServerInterceptor):
    """Requires ``authorization: Bearer <token>`` on every call but health and reflection;
    anything else is answered UNAUTHENTICATED."""

    def __init__(self, token: str) -> None:
        if not token:
            raise ValueError("an empty token would let everyone in")
        self._expected = token.encode("utf-8")

    def authorized(self, metadata) -> bool:
        """Whether call metadata carries the right bearer token (constant-time compare)."""
        ok = False
        for key, value in metadata or ():
            if key != "authorization":
                continue
            if isinstance(value, bytes):
                value = value.decode("utf-8", "replace")
            scheme, _, credential = value.strip().partition(" ")
            if scheme.lower() == "bearer":
                # compare every value, so that timing tells nothing about which one matched
                ok |= hmac.compare_digest(credential.strip().encode("utf-8"), self._expected)
        return ok

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or is_open(method):
            return handler
        if self.authorized(handler_call_details.invocation_metadata):
            return handler
        log.warning("refused %s: missing or wrong bearer token", method)
        return refusal(handler, grpc.StatusCode.UNAUTHENTICATED,
                       f"this server requires a bearer token: {AUTH_HINT}")


class _Malformed:
    """What a request that does not parse as its message type deserializes to."""

    __slots__ = ("reason",)

    def __init__(self, reason: str) -> None:
        self.reason = reason


def _tolerant(parse: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    def deserialize(data: bytes) -> Any:
        try:
            return parse(data)
        except Exception as exc:  # noqa: BLE001 -- whatever the parser raises, the bytes are bad
            return _Malformed(f"{type(exc).__name__}: {exc}"[:200])
    return deserialize


class MalformedMessageError(CallerError):
    """A request's bytes are not the method's protobuf message (INVALID_ARGUMENT)."""

    def __init__(self, method: str, reason: str) -> None:
        super().__init__(f"the request to {method} is not a valid protobuf message of its "
                         f"type ({reason}); send a message built from camserve's .proto")


class MalformedMessageInterceptor(grpc.ServerInterceptor):
    """Requests whose bytes do not parse are answered INVALID_ARGUMENT with one WARNING line.

    gRPC itself answers them INTERNAL and logs an ERROR with a traceback for each: any
    caller could flood the log, and the caller is told the server failed. Here the
    method's parser is wrapped: a bad message becomes a marker that the call refuses
    (unary) or that ends the stream at that message (streaming requests)."""

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None or handler.request_deserializer is None:
            return handler
        method = handler_call_details.method
        behavior = (handler.stream_unary or handler.stream_stream if handler.request_streaming
                    else handler.unary_unary or handler.unary_stream)

        def refuse(context: grpc.ServicerContext, bad: _Malformed) -> None:
            log.warning("refused %s: not a valid message (%s)", method, bad.reason)
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          str(MalformedMessageError(method, bad.reason)))

        def unary(request, context):
            if isinstance(request, _Malformed):
                refuse(context, request)
            return behavior(request, context)

        def checked(requests: Iterator[Any]) -> Iterator[Any]:
            for request in requests:
                if isinstance(request, _Malformed):
                    log.warning("refused %s: not a valid message (%s)", method,
                                request.reason)
                    raise MalformedMessageError(method, request.reason)
                yield request

        def streaming(requests, context):
            return behavior(checked(requests), context)

        return _like(handler, streaming if handler.request_streaming else unary,
                     _tolerant(handler.request_deserializer))
