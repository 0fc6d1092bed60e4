"""STAND-IN for the service manager (``systemctl restart edgepack-server``) in agent tests.

systemd cannot run in the test container, so this script does what the agent relies on from
``systemctl restart`` of a ``Type=notify`` unit: stop the running server (SIGTERM, wait for
it to exit: it drains), then start ``edgepack serve STATE/current`` -- the REAL server, on a
fixed port, detached like a service -- and wait until it is ready (systemd waits for
READY=1, which the server sends after its warm-up) or has exited. What it did goes to
``DIR/events.log`` (one ``<monotonic time> <event> <pid> <bundle>`` line each), so tests can
check the order: the old server stopped before the new one started.

    python service_manager.py restart|stop DIR --state STATE --port P [--timeout S]

The agent runs it as ``--restart-command`` and checks the server at ``--serve-url``.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path


def _event(folder: Path, what: str, pid: int, bundle: str) -> None:
    with open(folder / "events.log", "a", encoding="utf-8") as f:
        f.write(f"{time.monotonic():.3f} {what} {pid} {bundle}\n")


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split()[2]
    except OSError:
        return False
    return state != "Z"


def stop(folder: Path, timeout: float) -> None:
    pidfile = folder / "server.pid"
    if not pidfile.exists():
        return
    pid_text, _, bundle = pidfile.read_text().partition(" ")
    pid = int(pid_text)
    if _alive(pid):
        _event(folder, "stop", pid, bundle.strip())
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if _alive(pid):  # systemd's TimeoutStopSec ends in SIGKILL too
            os.kill(pid, signal.SIGKILL)
            while _alive(pid):
                time.sleep(0.05)
        _event(folder, "stopped", pid, bundle.strip())
    pidfile.unlink()


def start(folder: Path, state: Path, port: int, timeout: float) -> int:
    bundle = os.path.realpath(state / "current")
    with open(folder / "server.log", "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "edgepack", "serve", str(state / "current"),
             "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,  # a service: it outlives this script
        )
    (folder / "server.pid").write_text(f"{proc.pid} {bundle}")
    _event(folder, "start", proc.pid, bundle)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            _event(folder, f"exited:{proc.returncode}", proc.pid, bundle)
            # Like systemctl: say that the start failed (here with the server's own error).
            lines = (folder / "server.log").read_text(errors="replace").splitlines()
            errors = [ln for ln in lines if ln.startswith("error:")]
            print(f"edgepack-server failed: exit status {proc.returncode}"
                  + (f", {errors[-1]}" if errors else ""), file=sys.stderr)
            return 1
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as r:
                if r.status == 200:
                    _event(folder, "ready", proc.pid, bundle)
                    return 0
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.05)
    print(f"edgepack-server not ready within {timeout:g} s", file=sys.stderr)
    return 1


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("action", choices=["restart", "stop"])
    ap.add_argument("folder", type=Path)
    ap.add_argument("--state", type=Path, required=True)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--timeout", type=float, default=60.0)
    args = ap.parse_args(argv)
    args.folder.mkdir(parents=True, exist_ok=True)
    stop(args.folder, args.timeout)
    if args.action == "stop":
        return 0
    return start(args.folder, args.state, args.port, args.timeout)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
