"""MQTT broker settings shared by the agent's reports and the fleet view: URL parsing, topics,
and a configured paho-mqtt client (TLS, username/password).

Any MQTT 3.1.1 broker works (Mosquitto on a gateway, EMQX, a cloud IoT broker); edgepack runs
no server of its own. Topics (DESIGN.md, "Additions"): ``edgepack/<fleet>/<device-id>/state``
(retained JSON, the last will marks it offline) and ``edgepack/<fleet>/<device-id>/events``.

Device side: paho-mqtt (the ``agent`` extra), imported only when a client is made.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

from edgepack.errors import ConfigError, UsageError

TOPIC_ROOT = "edgepack"
_SCHEMES = {"mqtt": (1883, False), "tcp": (1883, False), "mqtts": (8883, True),
            "ssl": (8883, True)}
# MQTT wildcards and the level separator cannot appear inside one topic level.
_LEVEL = re.compile(r"^[^/+#\x00]{1,128}$")


def check_level(value: str, what: str) -> str:
    if not _LEVEL.match(value or ""):
        raise UsageError(f"{what} {value!r} cannot be an MQTT topic level",
                         hint="use 1-128 characters without '/', '+' or '#'")
    return value


def state_topic(fleet: str, device_id: str) -> str:
    return f"{TOPIC_ROOT}/{fleet}/{device_id}/state"


def events_topic(fleet: str, device_id: str) -> str:
    return f"{TOPIC_ROOT}/{fleet}/{device_id}/events"


def device_of(topic: str) -> tuple[str, str, str] | None:
    """(fleet, device id, kind) of an edgepack topic, else None."""
    parts = topic.split("/")
    if len(parts) == 4 and parts[0] == TOPIC_ROOT and parts[3] in ("state", "events"):
        return parts[1], parts[2], parts[3]
    return None


@dataclass(frozen=True)
class BrokerConfig:
    host: str
    port: int
    tls: bool = False
    username: str | None = None
    password: str | None = None
    ca_file: str | None = None  # TLS: CA bundle (default: the system's)
    cert_file: str | None = None  # TLS client certificate (mutual TLS)
    key_file: str | None = None
    fleet: str = "default"
    keepalive: int = 30  # seconds; the broker sends the last will ~1.5x after silence

    def describe(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"


def parse_broker(url: str, *, fleet: str = "default", username: str | None = None,
                 password: str | None = None, ca_file: str | None = None,
                 cert_file: str | None = None, key_file: str | None = None,
                 keepalive: int = 30) -> BrokerConfig:
    """``mqtt://[user[:password]@]host[:port]`` or ``mqtts://...`` (TLS, port 8883). Options
    given apart win over the URL's user info. Raises UsageError naming a bad URL."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as e:
        raise UsageError(f"broker URL {url!r} is not valid: {e}",
                         hint="e.g. mqtt://gateway.local:1883 or mqtts://broker:8883") from e
    if parts.scheme not in _SCHEMES or not parts.hostname:
        raise UsageError(
            f"broker URL {url!r} is not an MQTT URL",
            hint="use mqtt://HOST[:1883] or mqtts://HOST[:8883] (TLS), with user:password@ "
            "or --broker-username/--broker-password")
    default_port, tls = _SCHEMES[parts.scheme]
    if (cert_file is None) != (key_file is None):
        raise UsageError("--broker-cert and --broker-key go together",
                         hint="give both for mutual TLS, or neither")
    if (ca_file or cert_file) and not tls:
        raise UsageError(f"TLS files given for {url!r}, which is not TLS",
                         hint="use an mqtts:// URL")
    if keepalive < 5:
        raise UsageError(f"keepalive {keepalive} s is too short", hint="use 5 s or more")
    return BrokerConfig(
        host=parts.hostname, port=port or default_port, tls=tls,
        username=username if username is not None else
        (unquote(parts.username) if parts.username else None),
        password=password if password is not None else
        (unquote(parts.password) if parts.password else None),
        ca_file=ca_file, cert_file=cert_file, key_file=key_file,
        fleet=check_level(fleet, "fleet"), keepalive=keepalive)


def make_client(config: BrokerConfig, client_id: str) -> Any:
    """A paho-mqtt client with the config's credentials and TLS, not yet connected."""
    try:
        import paho.mqtt.client as mqtt
    except ImportError as e:
        raise ConfigError(
            "MQTT reporting needs paho-mqtt, which is not installed",
            hint="pip install 'edgepack[agent]' (it brings paho-mqtt)") from e
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id,
                         clean_session=True)
    if config.username is not None:
        client.username_pw_set(config.username, config.password)
    if config.tls:
        try:
            client.tls_set(ca_certs=config.ca_file, certfile=config.cert_file,
                           keyfile=config.key_file)
        except (OSError, ValueError) as e:
            raise ConfigError(f"cannot set up TLS for {config.describe()}: {e}",
                              hint="check --broker-ca/--broker-cert/--broker-key") from e
    # Reconnects back off up to 30 s, so a broker that returns is found again quickly.
    client.reconnect_delay_set(min_delay=1, max_delay=30)
    return client


def close_client(client: Any) -> None:
    """Disconnect, stop the network thread and close every socket of a paho client.

    paho-mqtt 2.x leaves the socket pair it uses to wake its loop open when the loop ends
    without a clean disconnect (a refused login, a broker that went away), so its private
    ``_reset_sockets`` is called after the thread is gone; guarded, should it change.
    """
    try:
        client.disconnect()
    except Exception:  # noqa: BLE001 - closing is best effort
        pass
    client.loop_stop()
    reset = getattr(client, "_reset_sockets", None)
    if callable(reset):
        try:
            reset()
        except Exception:  # noqa: BLE001
            pass
