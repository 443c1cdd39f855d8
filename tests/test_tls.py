"""TLS: ``rediss://`` against a real TLS-enabled redis-server, with a CA, a server certificate and a
client certificate made here (``cryptography``). The server requires client certificates
(``tls-auth-clients yes``); agents, workers and the CLI connect with theirs, configured in the
URL's query; the server's certificate is verified (host name included) unless the URL says not."""

from __future__ import annotations

import datetime
import ipaddress
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis
from agents.testkit import agent_env, run

from agentwatch.embedded import find_server_binary

from conftest import _await, free_port
from notify_kit import receiver

x509 = pytest.importorskip("cryptography.x509", reason="the dev extra's cryptography makes the test CA")
from cryptography.hazmat.primitives import hashes, serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID  # noqa: E402


@dataclass(frozen=True)
class Tls:
    port: int
    dir: Path

    def url(self, *, ca: bool = True, client: bool = True, host: str = "127.0.0.1", extra: str = "") -> str:
        query = []
        if ca:
            query.append(f"ssl_ca_certs={self.dir / 'ca.pem'}")
        if client:
            query += [f"ssl_certfile={self.dir / 'client.pem'}", f"ssl_keyfile={self.dir / 'client.key'}"]
        if extra:
            query.append(extra)
        return f"rediss://{host}:{self.port}/0" + ("?" + "&".join(query) if query else "")


Key = ec.EllipticCurvePrivateKey


def _issue(
    name: str,
    key: Key,
    issuer: x509.Certificate | None,
    issuer_key: Key,
    *,
    ca: bool = False,
    server: bool = False,
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer.subject if issuer else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False
        ).add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
    elif not ca:
        builder = builder.add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
        )
    return builder.sign(issuer_key, hashes.SHA256())


def _write(directory: Path, name: str, cert: x509.Certificate, key: Key) -> None:
    (directory / f"{name}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    (directory / f"{name}.key").write_bytes(pem)
    (directory / f"{name}.key").chmod(0o600)


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tls]:
    binary = find_server_binary()
    directory = tmp_path_factory.mktemp("tls")
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _issue("agentwatch test CA", ca_key, None, ca_key, ca=True)
    _write(directory, "ca", ca, ca_key)
    for name, server in (("server", True), ("client", False)):
        key = ec.generate_private_key(ec.SECP256R1())
        _write(directory, name, _issue(f"test {name}", key, ca, ca_key, server=server), key)
    port = free_port()
    argv = [str(binary), "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1",
            "--tls-cert-file", str(directory / "server.pem"), "--tls-key-file", str(directory / "server.key"),
            "--tls-ca-cert-file", str(directory / "ca.pem"), "--tls-auth-clients", "yes",
            "--save", "", "--appendonly", "no", "--dir", str(directory)]  # fmt: skip
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    found = Tls(port, directory)
    try:
        _await(lambda: process.poll() is not None or _answers(found.url()), 10, "the TLS server")
        if process.poll() is not None:  # e.g. a server binary built without TLS support
            pytest.skip(f"{binary} cannot serve TLS: {process.communicate()[0].strip()[-300:]}")
        yield found
    finally:
        process.terminate()
        process.communicate(timeout=5)
        shutil.rmtree(directory, ignore_errors=True)


def _answers(url: str) -> bool:
    client = redis.Redis.from_url(url, socket_timeout=1, socket_connect_timeout=1)
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False
    finally:
        client.close()


def agentwatch(tmp_path: Path, url: str, *args: str, prefix: str) -> subprocess.CompletedProcess[str]:
    config = tmp_path / "pipeline.toml"
    config.write_text(f'[redis]\nurl = "{url}"\nprefix = "{prefix}"\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith("AGENTWATCH_")}
    where = [str(config)] if args[0] == "check-config" else ["--config", str(config)]
    return subprocess.run([sys.executable, "-m", "agentwatch", *args, *where],
                          capture_output=True, text=True, env=env, timeout=60)  # fmt: skip


def test_agents_workers_and_the_cli_connect_with_client_certificates(
    tls: Tls, tmp_path: Path, prefix: str
) -> None:
    url = tls.url()
    code, _, err = run("scripted.py", agent_env(url, prefix, "tls-bot", AW_BEATS=2), "raise")
    assert code == 1 and "Traceback" in err and "cannot deliver" not in err
    with receiver() as hook:
        config = tmp_path / "workers.toml"
        config.write_text(f'[redis]\nurl = "{url}"\nprefix = "{prefix}"\n[worker]\ntick = "50ms"\n'
                          f'[[notifiers]]\ntype = "webhook"\nurl = "{hook.url}"\n')  # fmt: skip
        env = {k: v for k, v in os.environ.items() if not k.startswith("AGENTWATCH_")}
        quiet = {"env": env, "stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
        argv = [sys.executable, "-m", "agentwatch", "worker"]
        workers = [subprocess.Popen([*argv, kind, "--config", str(config)], **quiet)  # type: ignore[call-overload]
                   for kind in ("detectors", "notifiers")]  # fmt: skip
        try:
            (request,) = hook.wait_requests(1, timeout=30)
        finally:
            for worker in workers:
                worker.terminate()
                worker.wait(15)
    assert b'"agent":"tls-bot"' in request.body and b'"detector":"exit"' in request.body
    status = agentwatch(tmp_path, url, "status", "--json", prefix=prefix)
    assert status.returncode == 0, status.stderr
    assert '"agent": "tls-bot"' in status.stdout


@pytest.mark.parametrize(
    ("case", "needle"),
    [("no CA: the server's certificate is not trusted", "certificate verify failed"),
     ("no client certificate", "does the server ask for a client certificate"),
     ("a name the certificate does not hold", "Hostname mismatch")],
)  # fmt: skip
def test_verification_is_on_by_default(tls: Tls, tmp_path: Path, prefix: str, case: str, needle: str) -> None:
    url = {
        "no CA: the server's certificate is not trusted": tls.url(ca=False),
        "no client certificate": tls.url(client=False),
        "a name the certificate does not hold": tls.url(host="localhost"),  # the certificate: 127.0.0.1 only
    }[case]
    if case.startswith("a name") and not _resolves_to_loopback_v4():
        pytest.skip("localhost does not resolve to 127.0.0.1 here")
    status = agentwatch(tmp_path, url, "status", prefix=prefix)
    assert needle in status.stderr, status.stderr
    if case == "no client certificate":  # the server hung up: it may want one, or be something else
        assert status.returncode == 1
    else:  # the URL's TLS settings do not fit the server's certificate: a configuration error
        assert status.returncode == 2 and "presented a certificate that does not verify" in status.stderr


def test_tls_settings_that_cannot_work_fail_check_config_naming_the_key(tls: Tls, tmp_path: Path) -> None:
    for url, why in (
        (tls.url(extra="ssl_ca_cert=/x"), "unknown option 'ssl_ca_cert' in the URL's query"),
        (
            tls.url().replace("ca.pem", "nope.pem"),
            f"ssl_ca_certs: no such file or directory: {tls.dir}/nope.pem",
        ),
        (f"redis://127.0.0.1:{tls.port}/0?ssl_ca_certs={tls.dir / 'ca.pem'}", "ssl_ca_certs need a TLS URL"),
    ):
        checked = agentwatch(tmp_path, url, "check-config", prefix="aw")
        assert checked.returncode == 2 and f"[redis] url: not a valid Redis URL: {why}" in checked.stderr, (
            checked.stderr
        )


def _resolves_to_loopback_v4() -> bool:
    import socket  # noqa: PLC0415

    try:
        return "127.0.0.1" in {info[4][0] for info in socket.getaddrinfo("localhost", None)}
    except OSError:
        return False
