"""``edgepack fleet status`` and ``fleet watch``: the fleet as its devices report it over MQTT
(``edgepack agent run --broker``). Parse, call ``edgepack.ota.fleet``, render."""

from __future__ import annotations

import json
import signal
import threading
from typing import Any

import click


def _broker_options(f):
    options = [
        click.option("--broker", required=True, envvar="EDGEPACK_BROKER_URL", show_envvar=True,
                     help="mqtt://[user:pass@]host[:1883] or mqtts://host[:8883]."),
        click.option("--fleet", "fleet_name", default="default", show_default=True,
                     envvar="EDGEPACK_FLEET", show_envvar=True,
                     help="Fleet name in the topics edgepack/FLEET/DEVICE/..."),
        click.option("--broker-username", default=None, envvar="EDGEPACK_BROKER_USERNAME",
                     show_envvar=True, help="MQTT username."),
        click.option("--broker-password", default=None, envvar="EDGEPACK_BROKER_PASSWORD",
                     show_envvar=True, help="MQTT password (prefer the variable)."),
        click.option("--broker-ca", default=None,
                     type=click.Path(exists=True, dir_okay=False),
                     help="CA file for mqtts:// (default: the system's)."),
        click.option("--broker-cert", default=None,
                     type=click.Path(exists=True, dir_okay=False),
                     help="Client certificate for mutual TLS (with --broker-key)."),
        click.option("--broker-key", default=None,
                     type=click.Path(exists=True, dir_okay=False),
                     help="Client key for mutual TLS."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def _config(broker: str, fleet_name: str, username, password, ca, cert=None, key=None):
    from edgepack.ota.agent.broker import parse_broker

    return parse_broker(broker, fleet=fleet_name, username=username, password=password,
                        ca_file=ca, cert_file=cert, key_file=key)


@click.group("fleet")
def fleet() -> None:
    """See the fleet: device states and update events reported over MQTT."""


@fleet.command("status")
@_broker_options
@click.option("--channel", default=None, help="Only devices following this channel.")
@click.option("--state", type=click.Choice(["online", "offline"]), default=None,
              help="Only online or only offline devices.")
@click.option("--version", "version", default=None, help="Only devices running this version.")
@click.option("--device", default=None, help="Only device ids matching this pattern (pi-*).")
@click.option("--result", default=None,
              help="Only devices whose last outcome is this (e.g. rolled-back, failed).")
@click.option("--wait", default=10.0, show_default=True, type=click.FloatRange(0.1),
              help="Longest time to gather the devices' retained states, in seconds.")
@click.option("--json", "as_json", is_flag=True, help="Every device's full state as JSON.")
def fleet_status(broker: str, fleet_name: str, broker_username, broker_password, broker_ca,
                 broker_cert, broker_key, channel, state, version, device, result,
                 wait: float, as_json: bool) -> None:
    """Table of devices: channel, version, online/offline, last seen, last outcome and the
    last rollback's reason. Exit 4 when the broker cannot be reached."""
    from edgepack.ota.fleet import collect_states, rows, select

    cfg = _config(broker, fleet_name, broker_username, broker_password, broker_ca,
                  broker_cert, broker_key)
    states = collect_states(cfg, wait=wait)
    chosen = select(rows(states), channel=channel, state=state, version=version,
                    device=device, result=result)
    if as_json:
        click.echo(json.dumps({"fleet": cfg.fleet, "broker": cfg.describe(),
                               "devices": [dict(r.to_dict(), report=states[r.device])
                                           for r in chosen]},
                              indent=2, sort_keys=True, default=str))
        return
    head = ("DEVICE", "CHANNEL", "VERSION", "STATE", "LAST SEEN", "LAST RESULT",
            "LAST ROLLBACK")
    table = [head] + [(r.device, r.channel or "-", str(r.version if r.version is not None
                                                       else "-"),
                       r.state, r.last_seen or "-", r.last_result or "-",
                       (r.last_rollback or "-")[:80]) for r in chosen]
    widths = [max(len(row[i]) for row in table) for i in range(len(head) - 1)]
    for row in table:
        cells = [c.ljust(w) for c, w in zip(row[:-1], widths, strict=True)]
        click.echo("  ".join([*cells, row[-1]]))
    online = sum(r.state == "online" for r in chosen)
    click.echo(f"{len(chosen)} devices ({online} online) in fleet {cfg.fleet!r}")


@fleet.command("watch")
@_broker_options
@click.option("--count", default=None, type=click.IntRange(1),
              help="Stop after this many messages.")
@click.option("--timeout", default=None, type=click.FloatRange(0.1),
              help="Stop after this many seconds.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
def fleet_watch(broker: str, fleet_name: str, broker_username, broker_password, broker_ca,
                broker_cert, broker_key, count: int | None, timeout: float | None,
                as_json: bool) -> None:
    """Print device states and update events live (retained states first). Ctrl-C or
    SIGTERM stops it (exit 0)."""
    from edgepack.ota.fleet import watch

    cfg = _config(broker, fleet_name, broker_username, broker_password, broker_ca,
                  broker_cert, broker_key)
    stop = threading.Event()
    seen = [0]
    lock = threading.Lock()

    def show(msg: dict[str, Any]) -> None:
        with lock:
            if stop.is_set():
                return
            if as_json:
                click.echo(json.dumps(msg, sort_keys=True, default=str))
            else:
                click.echo(_line(msg))
            seen[0] += 1
            if count is not None and seen[0] >= count:
                stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    if timeout is not None:
        timer = threading.Timer(timeout, stop.set)
        timer.daemon = True
        timer.start()
    watch(cfg, show, stop)


def _line(msg: dict[str, Any]) -> str:
    p = msg.get("payload") or {}
    if msg["kind"] == "state":
        state = "online" if p.get("online") else "offline"
        return (f"{p.get('reported_at') or p.get('at') or '-'} {msg['device']} state {state} "
                f"version {p.get('installed')} {p.get('last_result') or ''}"
                + (f" ({p.get('offline_reason')})" if not p.get("online") else "")).rstrip()
    extra = " ".join(f"{k}={v}" for k, v in sorted(p.items())
                     if k not in ("event", "device_id", "at") and v is not None)
    return f"{p.get('at', '-')} {msg['device']} {p.get('event')} {extra}".rstrip()


COMMANDS = (fleet,)
