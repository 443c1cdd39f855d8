"""The webhook and PagerDuty notifiers' lean HTTP client (notifiers/httpclient.py), against real
servers on 127.0.0.1: TLS verified (and not, when told), keep-alive connections reused and a
connection the receiver closed while idle not used, credentials in the URL sent as Basic auth,
and httpx kept for a receiver behind a proxy. Deadlines, timeouts and answers are covered end to
end in tests/test_notify_webhook.py."""

from __future__ import annotations

import base64
import datetime
import ipaddress
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from notifiers import deadline, httpclient
from notifiers.http import HttpNotifier

from notify_kit import receiver

x509 = pytest.importorskip("cryptography.x509", reason="the dev extra's cryptography makes the test CA")
from cryptography.hazmat.primitives import hashes, serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402
from cryptography.x509.oid import NameOID  # noqa: E402


def client(url: str, *, verify_tls: bool = True) -> httpclient.Client:
    return httpclient.Client(url, connect_s=2.0, read_s=5.0, verify_tls=verify_tls, size=2, headers={})


def post(c: httpclient.Client, body: bytes = b"{}") -> httpclient.Answer:
    try:
        with deadline.attempt(10.0):
            return c.post(body, {"Content-Type": "application/json"})
    finally:
        c.close()


@pytest.fixture(scope="module")
def ca_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA and a server certificate for 127.0.0.1 it signed (ca.pem, server.pem, server.key)."""
    directory = tmp_path_factory.mktemp("https")
    now = datetime.datetime.now(datetime.UTC)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "agentwatch test CA")])
    ca = (
        x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )  # fmt: skip
    san = x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
    server = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "receiver")]))
        .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(san, critical=False).sign(ca_key, hashes.SHA256())
    )  # fmt: skip
    (directory / "ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    (directory / "server.pem").write_bytes(server.public_bytes(serialization.Encoding.PEM))
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    (directory / "server.key").write_bytes(pem)
    return directory


@contextmanager
def https_receiver(ca_dir: Path) -> Iterator[str]:
    """The test kit's receiver behind TLS (its certificate signed by the test CA)."""
    with receiver() as hook:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(ca_dir / "server.pem", ca_dir / "server.key")
        assert hook._server is not None
        hook._server.socket = context.wrap_socket(hook._server.socket, server_side=True)
        yield hook.url.replace("http://", "https://")


def test_tls_is_verified_against_the_trust_store_unless_verify_tls_is_off(
    ca_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with https_receiver(ca_dir) as url:
        with pytest.raises(httpclient.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
            post(client(url))  # certifi's bundle does not know the test CA
        assert post(client(url, verify_tls=False)).status == 200
        monkeypatch.setenv("SSL_CERT_FILE", str(ca_dir / "ca.pem"))  # as httpx: the env's store
        assert post(client(url)).status == 200
        wrong_host = url.replace("127.0.0.1", "localhost")  # the certificate names 127.0.0.1 only
        with pytest.raises(httpclient.ConnectError, match=r"CERTIFICATE_VERIFY_FAILED|match"):
            post(client(wrong_host))


@contextmanager
def closing_server(idle_close_s: float) -> Iterator[tuple[str, list[float]]]:
    """Answers each request on a keep-alive connection, then closes the connection after
    ``idle_close_s`` without a word (as servers with a short keep-alive timeout do). Yields its
    URL and the times it accepted connections at."""
    server = socket.create_server(("127.0.0.1", 0))
    accepted: list[float] = []
    stop = threading.Event()

    def handle(conn: socket.socket) -> None:
        conn.settimeout(idle_close_s)
        with conn:
            while not stop.is_set():
                try:
                    data = conn.recv(65536)
                except TimeoutError:
                    return  # idle too long: close
                if not data:
                    return
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")

    def serve() -> None:
        server.settimeout(0.1)
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            accepted.append(time.monotonic())
            threading.Thread(target=handle, args=(conn,), daemon=True).start()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.getsockname()[1]}/hook", accepted
    finally:
        stop.set()
        thread.join(5)
        server.close()


def test_connections_are_reused_and_one_closed_while_idle_is_replaced() -> None:
    with closing_server(idle_close_s=0.2) as (url, accepted):
        c = client(url)
        try:
            with deadline.attempt(10.0):
                for _ in range(5):
                    assert c.post(b"{}", {}).body == "ok"
            assert len(accepted) == 1  # one keep-alive connection for back-to-back requests
            time.sleep(0.8)  # the server closes it after 0.2 s idle; the pool checks after 0.5 s
            with deadline.attempt(10.0):
                assert c.post(b"{}", {}).body == "ok"
            assert len(accepted) == 2
        finally:
            c.close()


def test_credentials_in_the_url_go_as_basic_auth() -> None:
    with receiver() as hook:
        url = hook.url.replace("http://", "http://bot%40ops:s3cr%3At@")
        assert post(client(url)).status == 200
        (request,) = hook.requests
    expected = base64.b64encode(b"bot@ops:s3cr:t").decode()
    assert request.headers["authorization"] == f"Basic {expected}"
    assert request.path == "/hook"


def test_a_proxy_in_the_environment_keeps_httpx(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    assert not httpclient.proxied("http://hooks.example/x")
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.example:3128")
    assert httpclient.proxied("https://hooks.example/x") and not httpclient.proxied("http://hooks.example/x")
    monkeypatch.setenv("ALL_PROXY", "http://proxy.example:3128")
    assert httpclient.proxied("http://hooks.example/x")
    assert HttpNotifier.http is None  # the base has no httpx client until open() picks one
