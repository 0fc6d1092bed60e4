"""A real Mosquitto broker on 127.0.0.1, started and stopped (by PID) by the test.

Each broker gets its own config, password file and log in tmp_path; nothing system-wide is
touched. Tests that need it skip with a reason when the Debian package ``mosquitto`` is not
installed (listed in ``scripts/programs.txt``, so ``scripts/ensure-programs`` -- run by
``.ci/run`` and ``scripts/test`` -- installs it where root and apt are available).
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from support.programs import require_program


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Broker:
    folder: Path
    port: int
    users: dict[str, str] = field(default_factory=dict)
    tls: dict[str, Path] | None = None  # {"ca", "cert", "key", ...} for a TLS listener
    require_certificate: bool = False  # mutual TLS: clients need a certificate from the CA
    proc: subprocess.Popen | None = None
    exe: str = "mosquitto"

    @property
    def url(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://127.0.0.1:{self.port}"

    def start(self) -> Broker:
        """Start (or restart, on the same port) the broker; returns once it listens."""
        self.folder.mkdir(parents=True, exist_ok=True)
        lines = [f"listener {self.port} 127.0.0.1", "persistence false",
                 f"log_dest file {self.folder / 'mosquitto.log'}", "log_type all",
                 f"allow_anonymous {'false' if self.users else 'true'}"]
        if os.geteuid() == 0:
            # As root, mosquitto would drop to the 'mosquitto' user and could not read the
            # test's 0700 tmp folders (mosquitto.conf(5), "user").
            lines.append("user root")
        if self.users:
            pw = self.folder / "passwd"
            pw.write_text("")
            passwd = str(Path(self.exe).with_name("mosquitto_passwd"))
            if not Path(passwd).exists():
                passwd = "mosquitto_passwd"
            for user, password in self.users.items():
                subprocess.run([passwd, "-b", str(pw), user, password],
                               check=True, capture_output=True)
            pw.chmod(0o600)
            lines.append(f"password_file {pw}")
        if self.tls:
            lines += [f"cafile {self.tls['ca']}", f"certfile {self.tls['cert']}",
                      f"keyfile {self.tls['key']}"]
            if self.require_certificate:
                lines.append("require_certificate true")
        conf = self.folder / "mosquitto.conf"
        conf.write_text("\n".join(lines) + "\n")
        self.proc = subprocess.Popen([self.exe, "-c", str(conf)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        for _ in range(200):
            if self.proc.poll() is not None:
                raise RuntimeError(f"mosquitto exited: {self.proc.stderr.read().decode()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return self
            except OSError:
                time.sleep(0.025)
        self.stop()
        raise RuntimeError("mosquitto did not start listening")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc is not None and self.proc.stderr is not None:
            self.proc.stderr.close()
        self.proc = None


def make_tls_files(folder: Path) -> dict[str, Path]:
    """A throwaway CA, a server certificate for 127.0.0.1 and a client certificate
    (cryptography), PEM files: ca, cert, key, client_cert, client_key."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    folder.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(name("edgepack test CA"))
          .issuer_name(name("edgepack test CA")).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(minutes=5))
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder().subject_name(name("127.0.0.1")).issuer_name(ca.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    client_key = ec.generate_private_key(ec.SECP256R1())
    client = (x509.CertificateBuilder().subject_name(name("edgepack-device"))
              .issuer_name(ca.subject).public_key(client_key.public_key())
              .serial_number(x509.random_serial_number())
              .not_valid_before(now - datetime.timedelta(minutes=5))
              .not_valid_after(now + datetime.timedelta(days=1))
              .sign(ca_key, hashes.SHA256()))
    paths = {"ca": folder / "ca.pem", "cert": folder / "server.pem", "key": folder / "server.key",
             "client_cert": folder / "client.pem", "client_key": folder / "client.key"}
    paths["client_cert"].write_bytes(client.public_bytes(serialization.Encoding.PEM))
    paths["client_key"].write_bytes(client_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    paths["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths["cert"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths["key"].write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                               serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
    return paths


@pytest.fixture
def mosquitto(tmp_path) -> Iterator:
    """``broker = mosquitto(users=None, tls=False)`` starts a real Mosquitto; stopped after."""
    exe = require_program("mosquitto")
    started: list[Broker] = []

    def start(*, users: dict[str, str] | None = None, tls: bool = False,
              require_certificate: bool = False) -> Broker:
        folder = tmp_path / f"mosquitto-{len(started)}"
        b = Broker(folder, _free_port(), users or {},
                   make_tls_files(folder / "tls") if tls else None, require_certificate,
                   exe=exe)
        started.append(b)
        return b.start()

    yield start
    for b in started:
        b.stop()
