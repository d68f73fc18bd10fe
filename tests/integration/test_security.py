"""TLS, mutual TLS and bearer-token authentication, over real loopback channels.

Certificates are made by the tests (``pki`` in conftest.py: a CA, a server certificate for
127.0.0.1/localhost, client certificates), so nothing is read from outside a temporary
folder.
"""

from __future__ import annotations

import logging

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from camserve import cli
from camserve.client import Client
from camserve.errors import CamserveError
from camserve.server.app import start
from camserve.server.config import ServerConfig
from camserve.server.security import TokenAuthInterceptor, read_token
from camserve.v1 import explainer_pb2 as pb
from camserve.v1 import explainer_pb2_grpc as pb_grpc

TOKEN = "s3cr3t-T0ken_for-tests.0123456789"  # what a server log must never show
WRONG = "not-the-token-4567"
IMAGE = np.random.default_rng(0).integers(0, 256, (48, 80, 3), dtype=np.uint8)
CALL_S = 10  # every call's deadline: a refused handshake must fail, not hang


# --- certificates: the ``pki`` fixture (tests/conftest.py) --------------------------------

def _credentials(pki, ca="ca", client: str | None = None) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(
        root_certificates=pki[ca].read_bytes(),
        private_key=pki[f"{client}_key"].read_bytes() if client else None,
        certificate_chain=pki[f"{client}_cert"].read_bytes() if client else None)


def _refused(port: int, credentials: grpc.ChannelCredentials | None) -> grpc.StatusCode:
    """The status of a ListModels call on a plain channel (the SDK would retry UNAVAILABLE)."""
    target = f"127.0.0.1:{port}"
    with (grpc.secure_channel(target, credentials) if credentials
          else grpc.insecure_channel(target)) as channel:
        stub = pb_grpc.ExplainerStub(channel)
        return _code(lambda: stub.ListModels(pb.ListModelsRequest(), timeout=CALL_S))


def _code(call) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    return caught.value.code()


@pytest.fixture(scope="module")
def tls_server(models_dir, pki):
    running = start(ServerConfig(models=models_dir, port=0, device="cpu", intra_op_threads=1,
                                 tls_cert=pki["server_cert"], tls_key=pki["server_key"]))
    yield running
    running.stop(grace=0)


@pytest.fixture(scope="module")
def mtls_server(models_dir, pki):
    running = start(ServerConfig(models=models_dir, port=0, device="cpu", intra_op_threads=1,
                                 tls_cert=pki["server_cert"], tls_key=pki["server_key"],
                                 tls_client_ca=pki["ca"]))
    yield running
    running.stop(grace=0)


# --- TLS ------------------------------------------------------------------------------------
@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
def test_tls_client_trusting_the_ca_gets_answers(tls_server, pki, host):
    with Client(f"{host}:{tls_server.port}", credentials=_credentials(pki),
                timeout=CALL_S) as client:
        assert {m.name for m in client.list_models()} == {"tiny", "tiny2"}
        assert len(client.explain(IMAGE, model="tiny", targets=[3])) == 1
        assert client.health() == "SERVING"


def test_tls_server_refuses_plaintext_and_untrusting_clients(tls_server, pki):
    assert _refused(tls_server.port, None) == grpc.StatusCode.UNAVAILABLE
    # a client that doesn't trust the server's CA
    assert _refused(tls_server.port, _credentials(pki, ca="rogue_ca")) \
        == grpc.StatusCode.UNAVAILABLE


def test_mtls_refuses_a_client_without_a_certificate(mtls_server, pki):
    assert _refused(mtls_server.port, _credentials(pki)) == grpc.StatusCode.UNAVAILABLE
    with Client(f"127.0.0.1:{mtls_server.port}", credentials=_credentials(pki),
                timeout=CALL_S) as client:
        assert _code(client.health) == grpc.StatusCode.UNAVAILABLE  # no way in at all


def test_mtls_refuses_a_certificate_from_another_ca(mtls_server, pki):
    assert _refused(mtls_server.port, _credentials(pki, client="rogue_client")) \
        == grpc.StatusCode.UNAVAILABLE


def test_mtls_client_with_a_certificate_from_the_ca_works(mtls_server, pki):
    with Client(f"127.0.0.1:{mtls_server.port}", credentials=_credentials(pki, client="client"),
                timeout=CALL_S) as client:
        assert len(client.list_models()) == 2
        assert client.explain(IMAGE, targets=[1])[0].class_index == 1


# --- bearer token ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def token_server(models_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("token") / "token"
    path.write_text(f"  {TOKEN}\n\n")  # surrounding whitespace is not part of the token
    running = start(ServerConfig(models=models_dir, port=0, device="cpu", intra_op_threads=1,
                                 auth_token_file=path))
    yield running
    running.stop(grace=0)


@pytest.fixture
def server_log(caplog):
    """Everything any logger says while the test runs."""
    with caplog.at_level(logging.DEBUG):
        yield caplog


def _calls(stub: pb_grpc.ExplainerStub, metadata):
    """One call of every Explainer RPC kind, with ``metadata``."""
    request = Client.request(IMAGE)
    return {
        "Explain": lambda: stub.Explain(request, timeout=CALL_S, metadata=metadata),
        "ListModels": lambda: stub.ListModels(pb.ListModelsRequest(), timeout=CALL_S,
                                              metadata=metadata),
        "GetModel": lambda: stub.GetModel(pb.GetModelRequest(), timeout=CALL_S,
                                          metadata=metadata),
        "ReloadModels": lambda: stub.ReloadModels(pb.ReloadModelsRequest(), timeout=CALL_S,
                                                  metadata=metadata),
        "ExplainStream": lambda: list(stub.ExplainStream(iter([request]), timeout=CALL_S,
                                                         metadata=metadata)),
    }


@pytest.mark.parametrize("metadata", [
    None,
    [("authorization", f"Bearer {WRONG}")],
    [("authorization", TOKEN)],  # no scheme
    [("authorization", f"Basic {TOKEN}")],
    [("authorization", f"Bearer {TOKEN}x")],
    [("authorization", f"Bearer {TOKEN[:-1]}")],
], ids=["none", "wrong", "no-scheme", "basic", "longer", "shorter"])
def test_calls_without_the_right_token_are_unauthenticated(token_server, metadata, server_log):
    with grpc.insecure_channel(f"127.0.0.1:{token_server.port}") as channel:
        stub = pb_grpc.ExplainerStub(channel)
        for name, call in _calls(stub, metadata).items():
            with pytest.raises(grpc.RpcError) as caught:
                call()
            assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED, name
            assert "authorization: Bearer <token>" in caught.value.details(), name
    assert TOKEN not in server_log.text and WRONG not in server_log.text
    assert "bearer token" in server_log.text  # the refusals are logged, without the token


def test_the_right_token_works(token_server, server_log):
    with Client(f"127.0.0.1:{token_server.port}", token=TOKEN, timeout=CALL_S) as client:
        assert {m.name for m in client.list_models()} == {"tiny", "tiny2"}
        assert client.explain(IMAGE, targets=[2])[0].class_index == 2
        assert [len(e) for e in client.explain_stream([IMAGE, IMAGE])] == [1, 1]
    with Client(f"127.0.0.1:{token_server.port}", timeout=CALL_S,
                metadata=[("authorization", f"bearer {TOKEN}")]) as client:  # scheme: any case
        assert client.get_model("tiny2").name == "tiny2"
    assert TOKEN not in server_log.text


def test_health_and_reflection_need_no_token(token_server):
    with grpc.insecure_channel(f"127.0.0.1:{token_server.port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "camserve.v1.Explainer", "tiny"):
            status = health.Check(health_pb2.HealthCheckRequest(service=service),
                                  timeout=CALL_S).status
            assert status == health_pb2.HealthCheckResponse.SERVING
        services = set(ProtoReflectionDescriptorDatabase(channel).get_services())
        assert "camserve.v1.Explainer" in services
    with Client(f"127.0.0.1:{token_server.port}", timeout=CALL_S) as client:
        assert client.health("tiny2") == "SERVING"


def test_interceptor_compares_the_whole_credential():
    guard = TokenAuthInterceptor("abc")
    assert guard.authorized([("authorization", "Bearer abc")])
    assert guard.authorized([("x-other", "1"), ("authorization", "BEARER  abc ")])
    assert guard.authorized([("authorization", "Bearer nope"), ("authorization", "Bearer abc")])
    for bad in ([], [("authorization", "Bearer ab")], [("authorization", "Bearer abcd")],
                [("authorization", "Bearer")], [("authorization", "abc")],
                [("x-authorization", "Bearer abc")]):
        assert not guard.authorized(bad), bad
    with pytest.raises(ValueError):
        TokenAuthInterceptor("")


def test_token_file_is_read_stripped_and_checked(tmp_path):
    good = tmp_path / "good"
    good.write_text("\n tok-123 \n")
    assert read_token(good) == "tok-123"
    empty = tmp_path / "empty"
    empty.write_text(" \n\t\n")
    two = tmp_path / "two"
    two.write_text("one\ntwo\n")
    for path, says in ((tmp_path / "missing", "does not exist"), (empty, "is empty"),
                       (two, "one token")):
        with pytest.raises(CamserveError, match=says):
            read_token(path)


@pytest.mark.parametrize("flags, says", [
    (["--auth-token-file", "{tmp}/missing"], "--auth-token-file '{tmp}/missing' does not exist"),
    (["--auth-token-file", "{tmp}/empty"], "is empty"),
    (["--tls-cert", "{tmp}/cert.pem"], "needs both --tls-cert and --tls-key"),
    (["--tls-client-ca", "{tmp}/cert.pem"], "needs --tls-cert and --tls-key"),
    (["--tls-cert", "{tmp}/empty", "--tls-key", "{tmp}/empty"], "is not a PEM file"),
    (["--tls-cert", "{tmp}/nope.pem", "--tls-key", "{tmp}/empty"], "does not exist"),
], ids=["token-missing", "token-empty", "cert-without-key", "ca-without-cert", "not-pem",
        "cert-missing"])
def test_serve_refuses_to_start_with_bad_security_files(models_dir, tmp_path, capsys, flags,
                                                        says):
    (tmp_path / "empty").write_text("\n")
    (tmp_path / "cert.pem").write_text("")
    argv = ["serve", "--models", str(models_dir), "--port", "0", "--device", "cpu",
            *[f.format(tmp=tmp_path) for f in flags]]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "camserve serve: error:" in err and says.format(tmp=tmp_path) in err, err
