"""HTTPS to a deployment: its certificate file is trusted as users mean it (a CA-issued leaf plus
intermediates, no root; a DNS name on a deployment reached at 127.0.0.1), checked against a real
TLS server on loopback."""

from __future__ import annotations

import datetime as dt
import http.server
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from mlflow_deploy_plugin.deployment_http import deployment_session


def _cert(subject: str, key: ec.EllipticCurvePrivateKey, issuer: x509.Certificate | None,
          issuer_key: ec.EllipticCurvePrivateKey | None, ca: bool, dns: str | None = None) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    now = dt.datetime.now(dt.UTC)
    builder = (x509.CertificateBuilder().subject_name(name)
               .issuer_name(issuer.subject if issuer else name).public_key(key.public_key())
               .serial_number(x509.random_serial_number())
               .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if dns:
        builder = builder.add_extension(x509.SubjectAlternativeName([x509.DNSName(dns)]), critical=False)
    return builder.sign(issuer_key or key, hashes.SHA256())


def _pem(*certs: x509.Certificate) -> bytes:
    return b"".join(cert.public_bytes(serialization.Encoding.PEM) for cert in certs)


@pytest.fixture(scope="module")
def served_chain(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, Path]]:
    """An HTTPS server on 127.0.0.1 presenting leaf (``churn.example.com``) + intermediate, the way a
    CA-issued certificate is served; the file holds exactly that chain, without its root. Beside it:
    ``root.pem`` (the private CA, as a user's CA bundle) and ``renewed.pem`` (a new leaf from the same
    intermediate, alone: the file after a renewal, before the server restarted)."""
    folder = tmp_path_factory.mktemp("tls")
    root_key, mid_key, leaf_key = (ec.generate_private_key(ec.SECP256R1()) for _ in range(3))
    root = _cert("Test Root CA", root_key, None, None, ca=True)
    intermediate = _cert("Test Intermediate CA", mid_key, root, root_key, ca=True)
    leaf = _cert("churn.example.com", leaf_key, intermediate, mid_key, ca=False, dns="churn.example.com")
    chain = folder / "chain.pem"
    chain.write_bytes(_pem(leaf, intermediate))
    (folder / "root.pem").write_bytes(_pem(root))
    renewed = _cert("churn.example.com", ec.generate_private_key(ec.SECP256R1()), intermediate, mid_key, ca=False,
                    dns="churn.example.com")
    (folder / "renewed.pem").write_bytes(_pem(renewed))
    key = folder / "key.pem"
    key.write_bytes(leaf_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))

    class Ok(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            body = b"ok"
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Ok)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(chain, key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1], chain
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


def test_a_partial_chain_with_another_host_name_is_trusted_on_loopback(served_chain: tuple[int, Path]) -> None:
    port, chain = served_chain
    url = f"https://127.0.0.1:{port}"
    # What `verify=tls_cert` alone does: refused (no root in the file, and the name is not 127.0.0.1).
    with pytest.raises(requests.exceptions.SSLError):
        requests.get(url, verify=str(chain), timeout=10)
    with deployment_session(url, str(chain)) as session:
        response = session.get(url, timeout=10)
    assert response.status_code == 200 and response.text == "ok"


def test_the_certificate_is_still_verified(served_chain: tuple[int, Path], tmp_path: Path) -> None:
    port, _ = served_chain
    url = f"https://127.0.0.1:{port}"
    stranger_key = ec.generate_private_key(ec.SECP256R1())
    stranger = tmp_path / "stranger.pem"
    stranger.write_bytes(_pem(_cert("Someone else", stranger_key, None, None, ca=True)))
    with deployment_session(url, str(stranger)) as session, pytest.raises(requests.exceptions.SSLError):
        session.get(url, timeout=10)


def test_host_names_are_checked_off_loopback(served_chain: tuple[int, Path]) -> None:
    _, chain = served_chain
    adapter = deployment_session("https://churn.internal:8443", str(chain)).get_adapter("https://churn.internal:8443")
    assert adapter._check_hostname and adapter._context.check_hostname
    loopback = deployment_session("https://127.0.0.1:8443", str(chain)).get_adapter("https://127.0.0.1:8443")
    assert not loopback._check_hostname
    # Plain http, or https without a certificate file: requests' own defaults.
    assert type(deployment_session("http://127.0.0.1:1", str(chain)).get_adapter("http://127.0.0.1:1")) is \
        requests.adapters.HTTPAdapter


def test_a_ca_bundle_the_user_trusts_is_honoured(served_chain: tuple[int, Path],
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A CA-issued certificate is trusted through the user's CAs too (as requests chooses them), not
    only pinned: the file renewed on disk no longer holds what the server still sends."""
    port, chain = served_chain
    url = f"https://127.0.0.1:{port}"
    renewed = str(chain.parent / "renewed.pem")
    monkeypatch.delenv("REQUESTS_CA_BUNDLE", raising=False)
    monkeypatch.delenv("CURL_CA_BUNDLE", raising=False)
    with deployment_session(url, renewed) as session, pytest.raises(requests.exceptions.SSLError):
        session.get(url, timeout=10)  # pinned only: the served leaf is not in the file, no CA knows it
    for variable in ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE"):
        monkeypatch.setenv(variable, str(chain.parent / "root.pem"))
        with deployment_session(url, renewed) as session:
            assert session.get(url, timeout=10).text == "ok", variable
        monkeypatch.delenv(variable)


def test_a_ca_bundle_does_not_trust_what_it_does_not_sign(served_chain: tuple[int, Path], tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    port, chain = served_chain
    url = f"https://127.0.0.1:{port}"
    stranger_key = ec.generate_private_key(ec.SECP256R1())
    other_ca = tmp_path / "other-ca.pem"
    other_ca.write_bytes(_pem(_cert("Another CA", stranger_key, None, None, ca=True)))
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(other_ca))
    with deployment_session(url, str(chain.parent / "renewed.pem")) as session, \
            pytest.raises(requests.exceptions.SSLError):
        session.get(url, timeout=10)
    # A bundle that cannot be read is an error naming it, not a silent fallback.
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(tmp_path / "missing.pem"))
    with pytest.raises(requests.exceptions.SSLError, match="missing.pem"):
        deployment_session(url, str(chain))
