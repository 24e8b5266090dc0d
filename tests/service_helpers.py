"""Helpers of the service and client tests: configs, images, certificates, metrics, subprocesses."""

from __future__ import annotations

import datetime
import io
import ipaddress
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import numpy.typing as npt
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from service.config import ServeConfig
from service.server_process import ServerProcess

ROOT = Path(__file__).resolve().parent.parent


def serve_config(bundle: Path, **changes: Any) -> ServeConfig:
    """A config for a test server: loopback, free ports, CPU."""
    options: dict[str, Any] = {
        "bundle": bundle,
        "host": "127.0.0.1",
        "port": 0,
        "metrics_port": 0,
        "device": "cpu",
        "threads": 1,
        **changes,
    }
    return ServeConfig(**options)


def png_bytes(pixels: npt.NDArray[np.uint8]) -> bytes:
    """Encode an (H, W) or (H, W, C) uint8 array as PNG."""
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def random_pixels(seed: int, size: int = 40, channels: int = 3) -> npt.NDArray[np.uint8]:
    """Random 8-bit pixels (H, W, C)."""
    return np.random.default_rng(seed).integers(0, 256, (size, size, channels), dtype=np.uint8)


def demo_test_images(data_dir: Path) -> list[Path]:
    """The test images of a demo dataset, in the order ``training evaluate`` reads them."""
    test_dir = data_dir / "test"
    return [
        path
        for kind in sorted(p.name for p in test_dir.iterdir() if p.is_dir())
        for path in sorted((test_dir / kind).glob("*.png"))
    ]


# Request bodies that are no valid protobuf message of any type, as a hostile client sends them.
UNPARSEABLE: dict[str, bytes] = {
    # A ScoreBatchRequest whose image id holds bytes that are not UTF-8.
    "non-utf8-id": b"\x0a\x04\x0a\x02\xff\xfe",
    # A varint that never ends.
    "endless-varint": b"\x08" + b"\xff" * 12,
    # A length prefix past the end of the message.
    "truncated": b"\x0a\x7f\x0a\x02id",
    # Groups nested far deeper than the parser's recursion limit.
    "deep-groups": b"\x0b" * 2000 + b"\x0c" * 2000,
}
METHOD = "/anomaly.v1.AnomalyDetector/"


def raw_unary(channel: grpc.Channel, method: str) -> grpc.UnaryUnaryMultiCallable:
    """Call an AnomalyDetector method with request bytes as given, replies as bytes."""
    return channel.unary_unary(METHOD + method)


def raw_stream(channel: grpc.Channel, method: str) -> grpc.StreamStreamMultiCallable:
    """Open an AnomalyDetector stream with request messages as given bytes, replies as bytes."""
    return channel.stream_stream(METHOD + method)


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a /metrics endpoint: {(name, sorted labels): value}."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def sample(port: int, name: str, **labels: str) -> float | None:
    """One sample of a /metrics endpoint, None if absent."""
    return scrape(port).get((name, tuple(sorted(labels.items()))))


def wait_until(condition: Any, what: str, timeout: float = 30.0) -> None:
    """Poll ``condition()`` until it is true; fail saying ``what`` did not happen."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


# --- certificates ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Certs:
    """PEM files of a throwaway PKI: a CA, a server and a client it signed, and a rogue client."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    rogue_cert: Path
    rogue_key: Path


def write_certs(folder: Path) -> Certs:
    """Generate the PKI of :class:`Certs` into ``folder`` (EC keys, valid for a day)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)

    def name(common: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])

    def issue(
        subject: str,
        key: ec.EllipticCurvePrivateKey,
        issuer: tuple[x509.Name, ec.EllipticCurvePrivateKey] | None,
        *,
        ca: bool = False,
        san: list[x509.GeneralName] | None = None,
    ) -> x509.Certificate:
        issuer_name, issuer_key = issuer or (name(subject), key)
        builder = (
            x509.CertificateBuilder()
            .subject_name(name(subject))
            .issuer_name(issuer_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if san:
            builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
        return builder.sign(issuer_key, hashes.SHA256())

    def save(
        stem: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey
    ) -> tuple[Path, Path]:
        cert_path, key_path = folder / f"{stem}.crt", folder / f"{stem}.key"
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        return cert_path, key_path

    folder.mkdir(parents=True, exist_ok=True)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = issue("test CA", ca_key, None, ca=True)
    server_key = ec.generate_private_key(ec.SECP256R1())
    server_cert = issue(
        "localhost",
        server_key,
        (ca_cert.subject, ca_key),
        san=[x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))],
    )
    client_key = ec.generate_private_key(ec.SECP256R1())
    client_cert = issue("client", client_key, (ca_cert.subject, ca_key))
    rogue_ca_key = ec.generate_private_key(ec.SECP256R1())
    rogue_ca = issue("rogue CA", rogue_ca_key, None, ca=True)
    rogue_key = ec.generate_private_key(ec.SECP256R1())
    rogue_cert = issue("rogue", rogue_key, (rogue_ca.subject, rogue_ca_key))
    ca_path, _ = save("ca", ca_cert, ca_key)
    return Certs(
        ca_path,
        *save("server", server_cert, server_key),
        *save("client", client_cert, client_key),
        *save("rogue", rogue_cert, rogue_key),
    )


# --- the server as a subprocess ---------------------------------------------------------------

SERVE_ARGS = ("--host", "127.0.0.1", "--device", "cpu", "--port", "0", "--metrics-port", "0")


def serve_process(*args: str) -> ServerProcess:
    """``python -m service`` on loopback, free ports and CPU, with ``args``; not waited for."""
    return ServerProcess([*SERVE_ARGS, *args])
