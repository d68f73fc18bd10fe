"""Shared fixtures: small explainer graphs exported by the tests, and live servers on loopback."""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path

import pytest
import torch
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

ROOT = Path(__file__).resolve().parents[2]
SAMPLES = ROOT / "samples"


class TinyNet(torch.nn.Module):
    """A 10-class CNN small enough to export in a second: [B,3,64,64] -> [B,10]."""

    def __init__(self) -> None:
        super().__init__()
        self.features = torch.nn.Sequential(
            torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
            torch.nn.MaxPool2d(2),
            torch.nn.Conv2d(8, 16, 3, padding=1), torch.nn.BatchNorm2d(16), torch.nn.ReLU())
        self.pool = torch.nn.AdaptiveAvgPool2d(1)
        self.fc = torch.nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


@pytest.fixture(scope="session")
def tiny_model() -> TinyNet:
    torch.manual_seed(0)
    model = TinyNet().eval()
    with torch.no_grad():  # non-trivial batch-norm statistics
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.2, 0.2)
                module.running_var.uniform_(0.5, 1.5)
    return model


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory, tiny_model) -> Path:
    """A models folder with ``tiny.onnx`` (one layer) and ``tiny2.onnx`` (two layers)."""
    from camserve.export import export_explainer

    folder = tmp_path_factory.mktemp("models")
    labels = [f"thing {i}" for i in range(10)]
    export_explainer(tiny_model, folder / "tiny.onnx", input_size=64, labels=labels,
                     architecture="tinynet")
    export_explainer(tiny_model, folder / "tiny2.onnx", input_size=64, labels=labels,
                     target_layers=["features.2", "features.6"], architecture="tinynet")
    return folder


@pytest.fixture(scope="session")
def server(models_dir):
    """A live server on a free loopback port, serving ``models_dir``."""
    from camserve.server.app import start
    from camserve.server.config import ServerConfig

    running = start(ServerConfig(models=models_dir, port=0, device="cpu",
                                 intra_op_threads=1, default_model="tiny"))
    yield running
    running.stop(grace=1)


@pytest.fixture(scope="session")
def lite0_dir(tmp_path_factory) -> Path:
    """A models folder with the pretrained EfficientNet-Lite0 explainer."""
    from camserve.export import export_explainer
    from camserve.export.models import load

    folder = tmp_path_factory.mktemp("lite0")
    loaded = load("efficientnet_lite0")
    export_explainer(loaded.module, folder / "efficientnet_lite0.onnx", labels=loaded.labels,
                     preprocess=loaded.preprocessing, input_size=loaded.preprocessing.crop,
                     architecture=loaded.architecture)
    return folder


# --- certificates (TLS tests) ------------------------------------------------------------
def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _certificate(cn: str, key, issuer=None, *, ca: bool = False, sans=(), usage=None):
    """A certificate for ``key``, signed by ``issuer`` = (certificate, key) or self-signed."""
    now = datetime.datetime.now(datetime.timezone.utc)
    issuer_cert, issuer_key = issuer if issuer else (None, key)
    builder = (x509.CertificateBuilder()
               .subject_name(_name(cn))
               .issuer_name(issuer_cert.subject if issuer_cert else _name(cn))
               .public_key(key.public_key())
               .serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(hours=1))
               .not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if ca:
        builder = builder.add_extension(x509.KeyUsage(
            digital_signature=True, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
            encipher_only=False, decipher_only=False), critical=True)
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
    if usage:
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _write(folder: Path, stem: str, cert, key) -> tuple[Path, Path]:
    cert_path, key_path = folder / f"{stem}.crt", folder / f"{stem}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


@pytest.fixture(scope="session")
def pki(tmp_path_factory) -> dict[str, Path]:
    """PEM files: ca, server (127.0.0.1, localhost), client (signed by ca), rogue_ca and
    rogue_client (a client certificate from another CA)."""
    folder = tmp_path_factory.mktemp("pki")
    files: dict[str, Path] = {}
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _certificate("camserve test CA", ca_key, ca=True)
    files["ca"], _ = _write(folder, "ca", ca, ca_key)
    server_key = ec.generate_private_key(ec.SECP256R1())
    server = _certificate("localhost", server_key, (ca, ca_key),
                          sans=[x509.DNSName("localhost"),
                                x509.IPAddress(ipaddress.ip_address("127.0.0.1"))],
                          usage=ExtendedKeyUsageOID.SERVER_AUTH)
    files["server_cert"], files["server_key"] = _write(folder, "server", server, server_key)
    client_key = ec.generate_private_key(ec.SECP256R1())
    client = _certificate("camserve client", client_key, (ca, ca_key),
                          usage=ExtendedKeyUsageOID.CLIENT_AUTH)
    files["client_cert"], files["client_key"] = _write(folder, "client", client, client_key)
    rogue_key = ec.generate_private_key(ec.SECP256R1())
    rogue_ca = _certificate("some other CA", rogue_key, ca=True)
    files["rogue_ca"], _ = _write(folder, "rogue_ca", rogue_ca, rogue_key)
    intruder_key = ec.generate_private_key(ec.SECP256R1())
    intruder = _certificate("intruder", intruder_key, (rogue_ca, rogue_key),
                            usage=ExtendedKeyUsageOID.CLIENT_AUTH)
    files["rogue_client_cert"], files["rogue_client_key"] = _write(folder, "rogue_client",
                                                                   intruder, intruder_key)
    return files
