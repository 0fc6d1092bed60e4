"""What the agent tells the outside world: ``agent status`` and the MQTT device reports.

``device_status`` is the one description of a device (used by ``agent status`` and in the
MQTT state message). ``MqttReporter`` publishes it retained on
``edgepack/<fleet>/<device-id>/state`` with a last will that marks the device offline, and the
update's events on ``.../events``. Reporting is best effort by design: it runs on paho's own
network thread (and a short-lived thread of its own to re-arm the last will), never raises
into the agent, and never waits for the broker, so a broker that is down or slow cannot delay
or fail an update; the state is republished on every
(re)connect and events wait in a bounded queue until the broker is back.

Device side: standard library, paho-mqtt (through ``broker``), edgepack's agent modules.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
import time
import urllib.request
from collections import deque
from collections.abc import Callable
from typing import Any, Protocol

from edgepack import __version__
from edgepack.ota.agent.journal import Journal
from edgepack.ota.agent.state import StateDir, now_iso
from edgepack.ota.release import rollout_bucket

log = logging.getLogger("edgepack.agent")

MAX_PENDING_EVENTS = 256
# Seconds close() waits, once connected, for the broker to take the offline state.
ACK_TIMEOUT = 10.0
# Seconds a re-arm of the last will waits for earlier states to be acknowledged.
SETTLE_TIMEOUT = 2.0


class Reporter(Protocol):
    """Where the agent sends its events; implementations must never raise."""

    def event(self, name: str, fields: dict[str, Any]) -> None: ...

    def state_changed(self) -> None: ...


class _NoReports:
    def event(self, name: str, fields: dict[str, Any]) -> None:
        pass

    def state_changed(self) -> None:
        pass


NO_REPORTS: Reporter = _NoReports()


def device_status(state: StateDir, device_id: str | None = None) -> dict[str, Any]:
    """The device's update status from its state directory (no network)."""
    cur, prev = state.current_slot(), state.previous_slot()
    entry = Journal(state.journal_path).read()
    st = state.status()
    dev = device_id or state.device_id()
    return {
        "device_id": dev,
        "repo_url": st.get("repo_url"),
        "channel": st.get("channel"),
        "groups": st.get("groups", []),
        "cohort": st.get("cohort", rollout_bucket(dev)),
        "installed": state.installed_version(),
        "current_slot": str(cur) if cur else None,
        "previous": prev.name if prev else None,
        "pending": entry.version if entry else st.get("pending"),
        "pending_step": entry.step if entry else None,
        "last_check": st.get("last_check"),
        "last_result": st.get("last_result"),
        "reason": st.get("reason"),
        "at": st.get("at"),
        "last_rollback": st.get("last_rollback"),
        "blocked": state.blocked(),
        "switch": st.get("switch"),
        "agent_version": __version__,
    }


def health_figures(state_root: os.PathLike | str) -> dict[str, Any]:
    """A few cheap figures an operator wants beside the version (Linux /proc; None where
    unreadable)."""
    out: dict[str, Any] = {"disk_free_bytes": None, "mem_available_bytes": None,
                           "load1": None, "uptime_s": None}
    try:
        out["disk_free_bytes"] = shutil.disk_usage(state_root).free
    except OSError:
        pass
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    out["mem_available_bytes"] = int(line.split()[1]) * 1024
                    break
    except (OSError, ValueError):
        pass
    try:
        out["load1"] = os.getloadavg()[0]
    except OSError:
        pass
    try:
        with open("/proc/uptime", encoding="ascii") as f:
            out["uptime_s"] = int(float(f.read().split()[0]))
    except (OSError, ValueError):
        pass
    return out


def serving_readiness(serve_url: str | None, timeout: float = 2.0) -> dict[str, Any]:
    """The serving bundle's ``/readyz`` (ready, and the model it reports), if known."""
    if not serve_url:
        return {"url": None, "ready": None}
    try:
        with urllib.request.urlopen(f"{serve_url.rstrip('/')}/readyz", timeout=timeout) as r:
            body = json.loads(r.read() or b"{}")
            return {"url": serve_url, "ready": r.status == 200,
                    "model": body.get("model"), "version": body.get("version")}
    except urllib.error.HTTPError as e:
        return {"url": serve_url, "ready": False, "status": e.code}
    except (OSError, ValueError) as e:
        return {"url": serve_url, "ready": False, "error": str(e)[:200]}


def _will_key(data: dict[str, Any]) -> tuple:
    """What the last will says of a device's state: a new key needs a new will."""
    return (data.get("installed"), data.get("last_result"),
            json.dumps(data.get("last_rollback"), default=str))


def _done(info: Any) -> bool:
    """Whether a publish is acknowledged, or will never be sent (paho raises for those)."""
    try:
        return bool(info.is_published())
    except (ValueError, RuntimeError):
        return True


class MqttReporter:
    """Publishes the device's state and events to an MQTT broker (see module docstring)."""

    def __init__(self, config: Any, device_id: str, state_fn: Callable[[], dict[str, Any]],
                 *, max_pending: int = MAX_PENDING_EVENTS) -> None:
        from edgepack.ota.agent.broker import (
            check_level,
            events_topic,
            make_client,
            state_topic,
        )

        self.config = config
        self.device_id = check_level(device_id, "device id")
        self.state_topic = state_topic(config.fleet, device_id)
        self.events_topic = events_topic(config.fleet, device_id)
        self._state_fn = state_fn
        self._pending: deque[bytes] = deque(maxlen=max_pending)
        self._lock = threading.Lock()
        self._connected = False
        self._up = threading.Event()  # set while connected
        self._down = threading.Event()  # set by each disconnect the network thread sees
        self._rearming = False  # our own reconnect for a new will is under way
        self._rearmer: threading.Thread | None = None
        self._conn_will_key: tuple | None = None  # the will the current connection carries
        # State messages not yet acknowledged. paho sends them again after a reconnect, after
        # the new connection's own: an old "online" could then replace a newer state.
        self._unacked: deque[Any] = deque(maxlen=max_pending)
        self._closing: str | None = None  # why, once close() has begun
        self._will_key: tuple | None = None
        self.published = 0  # messages handed to the broker connection (for benchmarks)
        self.started_at = now_iso()
        self._client = make_client(config, f"edgepack-{config.fleet}-{device_id}"[:200])
        self._client.on_pre_connect = self._on_pre_connect
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._arm_will(self._state())

    # -- state ------------------------------------------------------------------------------

    def _state(self) -> dict[str, Any]:
        try:
            data = dict(self._state_fn())
        except Exception as e:  # noqa: BLE001 - a report must never break the agent
            data = {"device_id": self.device_id, "error": f"state unavailable: {e}"}
        data.update(fleet=self.config.fleet, online=True, state="online",
                    agent_started=self.started_at, reported_at=now_iso())
        return data

    def _offline(self, data: dict[str, Any], why: str) -> bytes:
        data = dict(data, online=False, state="offline", offline_reason=why)
        data.pop("reported_at", None)
        return json.dumps(data, sort_keys=True, default=str).encode()

    def _arm_will(self, data: dict[str, Any]) -> None:
        # The will carries the last known version and result, so a device that vanishes
        # still shows what it ran. It is set per connection, hence the re-arm below. The key
        # follows the will: a connect between the two then re-arms once more, never once less.
        self._client.will_set(self.state_topic, self._offline(data, "connection lost"),
                              qos=1, retain=True)
        self._will_key = _will_key(data)

    # -- connection -------------------------------------------------------------------------

    def start(self) -> MqttReporter:
        """Connect in the background (never blocks; retries while the broker is down)."""
        self._client.connect_async(self.config.host, self.config.port, self.config.keepalive)
        self._client.loop_start()
        return self

    def _on_pre_connect(self, client, userdata) -> None:
        self._conn_will_key = self._will_key  # paho sends the will it holds now

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            log.warning("MQTT broker %s refused the connection: %s", self.config.describe(),
                        reason_code)
            return
        with self._lock:
            self._connected = True
            self._rearming = False
            pending = list(self._pending)
            self._pending.clear()
            closing = self._closing
            # A result that changed while this connection was being made is not in its will.
            stale_will = closing is None and self._conn_will_key != self._will_key
        # A connection that completes while close() runs (or after it gave up waiting) must
        # not leave "online" retained for a device that has stopped.
        state = self._state()
        payload = self._offline(state, closing) if closing else \
            json.dumps(state, sort_keys=True, default=str).encode()
        self._up.set()
        self._publish(self.state_topic, payload, retain=True)
        for payload in pending:
            self._publish(self.events_topic, payload)
        log.info("reporting to MQTT broker %s as %s", self.config.describe(), self.state_topic)
        if stale_will:
            self._rearm()

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        with self._lock:
            self._connected = False
        self._up.clear()
        self._down.set()

    def _publish(self, topic: str, payload: bytes, retain: bool = False) -> None:
        try:
            info = self._client.publish(topic, payload, qos=1, retain=retain)
            if info.rc == 0:
                self.published += 1
            if retain:
                self._unacked.append(info)
        except Exception as e:  # noqa: BLE001 - never into the agent
            log.debug("MQTT publish failed: %s", e)

    # -- the Reporter protocol ----------------------------------------------------------------

    def event(self, name: str, fields: dict[str, Any]) -> None:
        payload = json.dumps({"event": name, "device_id": self.device_id, "at": now_iso(),
                              **fields}, sort_keys=True, default=str).encode()
        with self._lock:
            connected = self._connected
            if not connected:
                self._pending.append(payload)
        if connected:
            self._publish(self.events_topic, payload)

    def state_changed(self) -> None:
        try:
            data = self._state()
            if _will_key(data) != self._will_key:
                self._arm_will(data)
                self._rearm()
            elif self._connected:
                self._publish(self.state_topic, json.dumps(data, sort_keys=True,
                                                           default=str).encode(), retain=True)
        except Exception as e:  # noqa: BLE001 - never into the agent
            log.debug("MQTT state report failed: %s", e)

    def _rearm(self) -> None:
        """Reconnect so the broker holds the new will (on_connect republishes the state);
        while disconnected, the next connect uses it anyway. Done on a thread of its own, so
        the agent never waits for the broker: earlier states must be acknowledged first, or
        paho would send them again after the new connection's and an old "online" could
        replace a newer state. (The new state is not sent on the old connection either, for
        the same reason.)"""
        with self._lock:
            if not self._connected or self._rearming or self._closing is not None:
                return  # a connect under way checks its will in on_connect
            self._rearming = True
            self._rearmer = threading.Thread(target=self._reconnect_for_will,
                                             name="edgepack-mqtt-rearm", daemon=True)
            self._rearmer.start()

    def _reconnect_for_will(self) -> None:
        from edgepack.ota.agent.broker import close_client

        try:
            self._settle(time.monotonic() + SETTLE_TIMEOUT)  # nothing old left to send again
            with self._lock:
                if self._closing is not None:  # close() sends the offline state on this one
                    self._rearming = False
                    return
                self._connected = False
            close_client(self._client)  # a clean disconnect: the broker discards the old will
            self._up.clear()
            self.start()
        except Exception as e:  # noqa: BLE001 - never into the agent
            log.debug("MQTT re-arm failed: %s", e)
            with self._lock:
                self._rearming = False

    def _settle(self, deadline: float) -> None:
        """Wait (until ``deadline``) for the broker to acknowledge every state sent so far."""
        while time.monotonic() < deadline:
            while self._unacked and _done(self._unacked[0]):
                self._unacked.popleft()
            if not self._unacked:
                return
            time.sleep(0.01)

    def close(self, why: str = "agent stopped", timeout: float = 3.0) -> None:
        """Mark the device offline (retained) and disconnect. Waits at most ``timeout`` s for
        a connection still being made (``agent run --once`` is over in well under a second),
        ``ACK_TIMEOUT`` s for a reconnect of ours for a new will (the broker was there a moment
        ago; on a loaded machine it took CI over 3 s); once connected,
        up to ``ACK_TIMEOUT`` s for the broker to acknowledge the offline state and for the
        disconnect to go out behind it, so queued reports go out when the broker is there and
        exit is never held up for long when it is not."""
        try:
            with self._lock:
                self._closing = why
                rearmer = self._rearmer
            if rearmer is not None:
                rearmer.join(SETTLE_TIMEOUT + ACK_TIMEOUT)
            with self._lock:
                rearming = self._rearming
            self._up.wait(max(timeout, ACK_TIMEOUT) if rearming else timeout)
            if not self._connected:
                log.warning("MQTT broker %s not connected at exit: the device's state there "
                            "may not say it stopped", self.config.describe())
            else:
                deadline = time.monotonic() + ACK_TIMEOUT
                # States sent again after a reconnect go out before this one, not after it.
                self._settle(deadline)
                info = self._client.publish(self.state_topic,
                                            self._offline(self._state(), why), qos=1,
                                            retain=True)
                while not info.is_published() and time.monotonic() < deadline:
                    time.sleep(0.02)
                # Let the network thread send DISCONNECT behind the offline state and see the
                # connection end: stopping the loop first can drop both, and the broker would
                # keep the retained "online" state of a device that stopped cleanly.
                self._down.clear()
                self._client.disconnect()
                self._down.wait(max(0.0, deadline - time.monotonic()))
        except Exception as e:  # noqa: BLE001
            log.debug("MQTT close failed: %s", e)
        from edgepack.ota.agent.broker import close_client

        close_client(self._client)
