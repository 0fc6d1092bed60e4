"""A real nginx serving a folder on 127.0.0.1, started and stopped by the test.

nginx runs in the foreground (``daemon off``) with its own config, pid file and logs in
tmp_path; the access log records the body bytes of every response so benchmarks can count
what was served. Tests that need it skip with the reason when nginx is not installed
(support.programs.require_program; scripts/test installs it where it can).
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from support.programs import find_program, require_program

CONF = """
{user}worker_processes 2;
daemon off;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    log_format served '$status $body_bytes_sent $request_uri';
    access_log {prefix}/access.log served;
    client_body_temp_path {prefix}/tmp;
    proxy_temp_path {prefix}/tmp;
    fastcgi_temp_path {prefix}/tmp;
    uwsgi_temp_path {prefix}/tmp;
    scgi_temp_path {prefix}/tmp;
    types {{ application/json json; }}
    default_type application/octet-stream;
    sendfile on;
    keepalive_requests 100000;
    server {{
        listen 127.0.0.1:{port};
        root {root};
        {extra}
    }}
}}
"""


@dataclass
class Nginx:
    url: str
    prefix: Path
    proc: subprocess.Popen

    def bytes_served(self) -> int:
        log = self.prefix / "access.log"
        if not log.exists():
            return 0
        return sum(int(line.split()[1]) for line in log.read_text().splitlines() if line)

    def requests(self) -> int:
        log = self.prefix / "access.log"
        return len(log.read_text().splitlines()) if log.exists() else 0

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()  # SIGTERM: nginx fast shutdown
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stderr is not None:
            self.proc.stderr.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_nginx(root: Path, prefix: Path, extra: str = "") -> Nginx:
    exe = find_program("nginx")
    if exe is None:  # benchmarks call this outside pytest; tests ask require_program first
        raise RuntimeError("nginx is not on PATH: apt-get install nginx (scripts/ensure-programs)")
    prefix.mkdir(parents=True, exist_ok=True)
    (prefix / "tmp").mkdir(exist_ok=True)
    port = _free_port()
    conf = prefix / "nginx.conf"
    # As root, nginx's workers would drop to 'nobody' and could not read 0700 tmp folders.
    user = "user root root;\n" if os.geteuid() == 0 else ""
    conf.write_text(CONF.format(user=user, prefix=prefix, port=port, root=root, extra=extra))
    proc = subprocess.Popen([exe, "-c", str(conf), "-p", str(prefix)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    for _ in range(100):
        if proc.poll() is not None:
            raise RuntimeError(f"nginx exited: {proc.stderr.read().decode()}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                break
        except OSError:
            time.sleep(0.05)
    else:
        proc.kill()
        raise RuntimeError("nginx did not start listening")
    return Nginx(f"http://127.0.0.1:{port}", prefix, proc)


@pytest.fixture
def nginx(tmp_path) -> Iterator:
    """``server = nginx(folder)`` starts a real nginx serving ``folder``; stopped after."""
    require_program("nginx")
    started: list[Nginx] = []

    def start(root: Path, extra: str = "") -> Nginx:
        n = start_nginx(root, tmp_path / f"nginx-{len(started)}", extra)
        started.append(n)
        return n

    yield start
    for n in started:
        n.stop()
