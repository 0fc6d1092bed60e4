"""systemd units for a bundle: the server and the update agent.

``render_units`` is pure (no files); the bundle writer stores its result under ``systemd/``.
Both services run as a dedicated system user ``edgepack`` (create it once per device, e.g.
``useradd --system --home-dir /var/lib/edgepack --shell /usr/sbin/nologin edgepack``): the
agent owns ``/var/lib/edgepack`` (slots, ``current``/``previous`` symlinks) and the server
reads it. The server gets no writable path at all (``ProtectSystem=strict`` and no
``ReadWritePaths``): it logs to the journal and keeps its state in memory.

Directives: https://www.freedesktop.org/software/systemd/man/latest/systemd.exec.html,
systemd.service.html and systemd.resource-control.html.
"""

from __future__ import annotations

import math

SERVER_UNIT = "edgepack-server.service"
AGENT_UNIT = "edgepack-agent.service"
STATE_DIR = "/var/lib/edgepack"
AGENT_ENV = "/etc/edgepack/agent.env"
SERVER_ENV = "/etc/edgepack/server.env"
_MIB = 1 << 20
# Python, uvicorn, starlette and llama-cpp-python's own allocations on top of what the plan
# counts (weights + KV cache + compute buffers): about 120 MiB RSS measured for the server
# with SmolLM2-135M beyond the model's bytes; 256 MiB leaves room for request buffers.
_RUNTIME_OVERHEAD = 256 * _MIB

_HARDENING = """\
NoNewPrivileges=yes
ProtectSystem=strict
ProtectHome=yes
PrivateTmp=yes
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectKernelLogs=yes
ProtectControlGroups=yes
ProtectClock=yes
ProtectHostname=yes
RestrictSUIDSGID=yes
RestrictRealtime=yes
RestrictNamespaces=yes
LockPersonality=yes
SystemCallArchitectures=native
CapabilityBoundingSet=
AmbientCapabilities=
UMask=0022
# Not MemoryDenyWriteExecute: ctypes callbacks (llama-cpp-python's log hook) need libffi
# closures, which map writable+executable memory."""


def memory_max_bytes(memory_bytes: int | None) -> int | None:
    """MemoryMax for the server: the plan's required memory plus 10% and the runtime's
    overhead, rounded up to a MiB; None when there is no (positive) figure."""
    if memory_bytes is None or memory_bytes <= 0:
        return None
    return math.ceil((memory_bytes * 1.1 + _RUNTIME_OVERHEAD) / _MIB) * _MIB


def render_units(
    bundle_dir_on_device: str = f"{STATE_DIR}/current",
    *,
    memory_bytes: int | None = None,
    gpu_offload: bool = False,
    executable: str = "/usr/local/bin/edgepack",
    host: str = "127.0.0.1",
    port: int = 8080,
    watchdog_seconds: int = 30,
    drain_seconds: int = 30,
    state_dir: str = STATE_DIR,
) -> dict[str, str]:
    """Return ``{unit file name: text}`` for the server and the agent.

    ``memory_bytes`` (the plan's ``memory.required_bytes``) sets ``MemoryMax``; a GPU
    offload keeps ``/dev`` visible for the accelerator's device nodes. ``executable`` and
    ``state_dir`` are where ``edgepack install`` put the venv and the bundles.
    """
    mem = memory_max_bytes(memory_bytes)
    gpu = gpu_offload
    memory_lines = (
        f"# The plan's required memory ({memory_bytes} bytes) + 10% + 256 MiB "
        f"for the Python runtime.\nMemoryMax={mem // _MIB}M\nMemorySwapMax=0"
        if mem else "# No planned memory figure, so no MemoryMax."
    )
    devices = (
        "# GPU offload: the accelerator's device nodes must stay visible.\n"
        "SupplementaryGroups=video render"
        if gpu else "PrivateDevices=yes"
    )
    # StateDirectory= names a folder under /var/lib only; another state dir is used as is.
    state_lines = (
        "StateDirectory=edgepack\nStateDirectoryMode=0755\n" if state_dir == STATE_DIR else ""
    )
    server = f"""\
[Unit]
Description=edgepack model server ({bundle_dir_on_device})
Documentation=https://github.com/edgepack/edgepack
After=network-online.target
Wants=network-online.target

[Service]
# READY=1 is sent after the model loaded and a warm-up inference passed; WATCHDOG=1 while
# the event loop runs and the engine is healthy.
Type=notify
NotifyAccess=main
WatchdogSec={watchdog_seconds}
User=edgepack
Group=edgepack
# EDGEPACK_API_KEY=... goes here (mode 0600), never on the command line.
EnvironmentFile=-{SERVER_ENV}
Environment=PYTHONUNBUFFERED=1
ExecStart={executable} serve {bundle_dir_on_device} --host {host} --port {port}
Restart=on-failure
RestartSec=2
# Loading reads the whole model from storage (slow SD cards): give it time.
TimeoutStartSec=300
# SIGTERM drains requests in flight for up to drain_seconds, then the process exits 0.
KillSignal=SIGTERM
TimeoutStopSec={drain_seconds + 15}
{memory_lines}
{devices}
{_HARDENING}

[Install]
WantedBy=multi-user.target
"""
    agent = f"""\
[Unit]
Description=edgepack update agent (over-the-air bundle updates)
Documentation=https://github.com/edgepack/edgepack
After=network-online.target
Wants=network-online.target

[Service]
Type=simple
User=edgepack
Group=edgepack
# {AGENT_ENV} sets the update source for this device, for example:
#   EDGEPACK_REPO_URL=https://updates.example.com/edgepack
#   EDGEPACK_CHANNEL=stable
#   EDGEPACK_DEVICE_ID=pi-0042
# and how the agent restarts and checks the server after a switch (`edgepack agent run
# --help`; without them the new bundle is served from the server's next restart):
#   EDGEPACK_RESTART_COMMAND=systemctl restart {SERVER_UNIT}
#   EDGEPACK_SERVE_URL=http://{host}:{port}
#   EDGEPACK_MEMORY_BUDGET_BYTES=...  (optional: forces stop-swap-start below it)
# The edgepack user needs a polkit rule allowing it to restart {SERVER_UNIT}.
EnvironmentFile={AGENT_ENV}
Environment=PYTHONUNBUFFERED=1
ExecStart={executable} agent run --repo-url ${{EDGEPACK_REPO_URL}} \
--state-dir {state_dir} --channel ${{EDGEPACK_CHANNEL}} --device-id ${{EDGEPACK_DEVICE_ID}}
Restart=on-failure
RestartSec=30
# The agent writes only its state directory (slots, current/previous, journal, chunks).
{state_lines}ReadWritePaths={state_dir}
PrivateDevices=yes
{_HARDENING}

[Install]
WantedBy=multi-user.target
"""
    return {SERVER_UNIT: server, AGENT_UNIT: agent}
