"""The fleet view: what the devices reported to the MQTT broker, read back by an operator.

``collect_states`` subscribes to ``edgepack/<fleet>/+/state`` and gathers the retained
messages (one per device: its last state, or its last will once it went offline);
``watch`` streams states and events as they come. Control never goes through the broker:
devices trust only the signed repository (``repo rollout``, ``repo rollback``).

Operator side; paho-mqtt through ``edgepack.ota.agent.broker``.
"""

from __future__ import annotations

import fnmatch
import json
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from edgepack.errors import FetchError
from edgepack.ota.agent.broker import BrokerConfig, close_client, device_of, make_client


def _connect(config: BrokerConfig, client_id: str, timeout: float):
    client = make_client(config, client_id)
    connected = threading.Event()
    refused: list[str] = []

    def on_connect(c, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            refused.append(str(reason_code))
        connected.set()

    client.on_connect = on_connect
    try:
        client.connect(config.host, config.port, config.keepalive)
    except (OSError, ValueError) as e:
        close_client(client)
        raise FetchError(f"cannot connect to MQTT broker {config.describe()}: {e}",
                         hint="check --broker and that the broker runs and is reachable") from e
    client.loop_start()
    if not connected.wait(timeout) or refused:
        close_client(client)
        raise FetchError(
            f"MQTT broker {config.describe()} "
            + (f"refused the connection: {refused[0]}" if refused else
               f"did not answer within {timeout:g} s"),
            hint="check --broker-username/--broker-password and the broker's ACL")
    return client


def collect_states(config: BrokerConfig, *, wait: float = 10.0, quiet: float = 1.0,
                   client_id: str = "edgepack-fleet-status") -> dict[str, dict[str, Any]]:
    """{device id: its retained state}. Returns ``quiet`` seconds after the last message
    (retained messages arrive in a burst right after subscribing), at most ``wait`` s."""
    states: dict[str, dict[str, Any]] = {}
    lock = threading.Lock()
    last = [time.monotonic()]
    subscribed = threading.Event()

    def on_message(c, userdata, msg) -> None:
        where = device_of(msg.topic)
        if where is None or where[2] != "state" or not msg.payload:
            return
        try:
            data = json.loads(msg.payload)
        except ValueError:
            data = {"error": "unreadable state message"}
        with lock:
            states[where[1]] = data if isinstance(data, dict) else {"error": "not an object"}
            last[0] = time.monotonic()

    def on_subscribe(c, userdata, mid, reason_codes, properties) -> None:
        last[0] = time.monotonic()
        subscribed.set()

    client = _connect(config, client_id, timeout=min(wait, 10.0))
    try:
        client.on_message = on_message
        client.on_subscribe = on_subscribe
        client.subscribe(f"edgepack/{config.fleet}/+/state", qos=1)
        start = time.monotonic()
        while time.monotonic() - start < wait:
            time.sleep(0.05)
            with lock:
                idle = time.monotonic() - last[0]
            if subscribed.is_set() and idle >= quiet:
                break
    finally:
        close_client(client)
    return states


@dataclass(frozen=True)
class DeviceRow:
    device: str
    channel: str | None
    version: Any
    state: str
    last_seen: str | None
    last_result: str | None
    last_rollback: str | None

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def rows(states: dict[str, dict[str, Any]]) -> list[DeviceRow]:
    out = []
    for dev, st in sorted(states.items()):
        rb = st.get("last_rollback") or {}
        out.append(DeviceRow(
            device=dev, channel=st.get("channel"), version=st.get("installed"),
            state="online" if st.get("online") else "offline",
            last_seen=st.get("reported_at") or st.get("at"),
            last_result=st.get("last_result"),
            last_rollback=(f"version {rb.get('version')}: {rb.get('reason')}"
                           if rb else None)))
    return out


def select(items: Iterable[DeviceRow], *, channel: str | None = None,
           state: str | None = None, version: str | None = None,
           device: str | None = None, result: str | None = None) -> list[DeviceRow]:
    """Filter rows; ``device`` is a shell pattern (``pi-*``)."""
    return [r for r in items
            if (channel is None or r.channel == channel)
            and (state is None or r.state == state)
            and (version is None or str(r.version) == str(version))
            and (device is None or fnmatch.fnmatchcase(r.device, device))
            and (result is None or r.last_result == result)]


def watch(config: BrokerConfig, on_message: Callable[[dict[str, Any]], None],
          stop: threading.Event, *, client_id: str = "edgepack-fleet-watch") -> None:
    """Call ``on_message`` with every state and event message until ``stop`` is set.
    Each message is ``{"device", "kind": state|events, "retained", "payload"}``."""

    def handle(c, userdata, msg) -> None:
        where = device_of(msg.topic)
        if where is None:
            return
        try:
            payload = json.loads(msg.payload) if msg.payload else None
        except ValueError:
            payload = {"error": "unreadable message"}
        on_message({"device": where[1], "kind": where[2], "retained": bool(msg.retain),
                    "payload": payload})

    client = _connect(config, client_id, timeout=10.0)
    try:
        client.on_message = handle
        client.subscribe([(f"edgepack/{config.fleet}/+/state", 1),
                          (f"edgepack/{config.fleet}/+/events", 1)])
        stop.wait()
    finally:
        close_client(client)
