"""MQTT sink (`runtime.stream --mqtt mqtt://127.0.0.1:1883/TOPIC`, paho-mqtt): verdicts where the MES
listens.

Messages (JSON, QoS 1):
  TOPIC/event     one per defect event: the event dict (seq 1, 2, ... per stream, line range,
                  columns, mm, peak, t_capture / t_verdict in Unix seconds) + "reject_line" (the
                  line index at which an ejector --reject-offset-lines downstream must fire)
  TOPIC/status    every `status_every_s` while connected, retained: the live figures (lines in /
                  scored / dropped by reason, events, thresholds, paused, latency percentiles)
  TOPIC/control   each operator action (threshold change, pause, resume, save)

Delivery: paho keeps every QoS 1 message until the broker acknowledges it (PUBACK) and sends it
again after a reconnect (the client reconnects by itself, 0.1 s .. 2 s backoff). Its outbox is
bounded (`outbox`, messages not yet acknowledged): a publish into a full outbox is dropped and
counted (`dropped`). The sink's counters: `published` (handed to paho), `acked` (the broker has
it), `unacked` (in the outbox),
and, at close, what the broker never acknowledged within the deadline (`abandoned`). So every event
is acked, dropped, failed or abandoned - counted, never lost silently. A subscriber that must not
miss events across a broker restart uses a persistent session (clean_session=False, QoS 1) and a
broker with persistence; `seq` lets it find gaps and duplicates (QoS 1 is at-least-once).
"""
from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from typing import Optional, Tuple
from urllib.parse import unquote, urlsplit

from .sinks import Sink, SinkOverflow

try:
    import paho.mqtt.client as paho
except ImportError:    # optional stack: pip install "edge-ad[plant]"
    paho = None

log = logging.getLogger("runtime.mqtt")
STATUS_KEYS = ("elapsed_s", "lines_in", "lines_scored", "lines_dropped", "dropped", "events", "tiles_scored",
               "tiles_anomalous", "lines_per_s", "latency_ms", "pixel_threshold", "image_threshold", "paused",
               "last_verdict", "reconnects", "engine_errors")


def _require_paho():
    if paho is None:
        raise ValueError('--mqtt needs paho-mqtt: pip install "edge-ad[plant]"')


def parse_mqtt_url(url: str) -> Tuple[str, int, str]:
    """mqtt://HOST[:PORT]/TOPIC -> (host, port, topic); ValueError naming --mqtt."""
    try:
        u = urlsplit(url)
        port = u.port or 1883
    except ValueError as e:
        raise ValueError(f"--mqtt {url!r}: {e}") from None
    topic = unquote(u.path.lstrip("/")).rstrip("/")
    if u.scheme != "mqtt" or not u.hostname or not topic:
        raise ValueError(f"--mqtt {url!r}: expected mqtt://HOST[:PORT]/TOPIC (e.g. mqtt://127.0.0.1:1883/line1)")
    if any(c in topic for c in "+#\0") or "#" in url or u.query:
        raise ValueError(f"--mqtt {url!r}: the topic may not contain + # ? or NUL")
    return u.hostname, port, topic


class MqttSink(Sink):
    name = "mqtt"
    accepts = ("event", "status", "control")
    queue_size = 1024
    retries = 0

    def __init__(self, url: str, outbox: int = 10_000, status_every_s: float = 1.0,
                 reject_offset_lines: int = 0, client_id: Optional[str] = None, close_timeout_s: float = 1.0):
        _require_paho()
        self.host, self.port, self.topic = parse_mqtt_url(url)
        if outbox < 1:
            raise ValueError(f"--mqtt-outbox {outbox!r}: expected a positive number of messages")
        self.status_every_s, self.reject_offset_lines = float(status_every_s), int(reject_offset_lines)
        self.close_timeout_s = float(close_timeout_s)
        self.client = paho.Client(paho.CallbackAPIVersion.VERSION2,
                                  client_id=client_id or f"edge-ad-{uuid.uuid4().hex[:12]}", clean_session=True)
        self.client.max_queued_messages_set(int(outbox))
        self.client.max_inflight_messages_set(100)
        self.client.reconnect_delay_set(min_delay=0.1, max_delay=2)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_publish = self._on_publish
        self.connected = threading.Event()
        # message ids handed to paho and not acknowledged yet, and acknowledgements that came
        # before their publish() returned. Never held while calling paho (paho calls on_publish
        # holding its own outbox lock).
        self._lock = threading.Lock()
        self._pending, self._early = set(), set()
        self.counts = {"published": 0, "acked": 0, "unacked": 0, "connects": 0, "disconnects": 0,
                       "status_skipped": 0}
        self._last_status = 0.0
        self._closing = False
        self.client.connect_async(self.host, self.port, keepalive=10)
        self.client.loop_start()

    # paho's network thread ------------------------------------------------------------------
    def _on_connect(self, client, userdata, flags, reason_code, properties):
        if not reason_code.is_failure:
            self.counts["connects"] += 1
            self.connected.set()
        else:
            log.warning("mqtt %s:%d refused the connection: %s", self.host, self.port, reason_code)

    def _on_publish(self, client, userdata, mid, reason_code, properties):
        with self._lock:
            if mid in self._pending:
                self._pending.discard(mid)
                self.counts["acked"] += 1
            else:
                self._early.add(mid)

    def _on_disconnect(self, client, userdata, flags, reason_code, properties):
        if self.connected.is_set() and not self._closing:
            self.counts["disconnects"] += 1
            log.warning("mqtt %s:%d disconnected (%s); reconnecting", self.host, self.port, reason_code)
        self.connected.clear()

    # the sink's lane thread -------------------------------------------------------------------
    def _publish(self, sub: str, payload: dict, retain: bool = False) -> None:
        info = self.client.publish(f"{self.topic}/{sub}", json.dumps(payload, default=str), qos=1, retain=retain)
        if info.rc == paho.MQTT_ERR_QUEUE_SIZE:
            raise SinkOverflow(f"mqtt outbox full ({self.client._max_queued_messages} unacknowledged messages)")
        if info.rc not in (paho.MQTT_ERR_SUCCESS, paho.MQTT_ERR_NO_CONN):   # NO_CONN: queued, sent on connect
            raise OSError(f"mqtt publish failed: {paho.error_string(info.rc)}")
        with self._lock:
            self.counts["published"] += 1
            if info.mid in self._early:
                self._early.discard(info.mid)
                self.counts["acked"] += 1
            else:
                self._pending.add(info.mid)

    def write(self, record):
        kind = record["type"]
        if kind == "event":
            ev = dict(record["event"])
            ev["reject_line"] = ev["line_start"] + self.reject_offset_lines
            self._publish("event", ev)
        elif kind == "control":
            self._publish("control", record["control"])
        elif kind == "status":
            now = time.monotonic()
            if now - self._last_status < self.status_every_s:
                return
            self._last_status = now
            if not self.connected.is_set():      # never fill the outbox with stale figures
                self.counts["status_skipped"] += 1
                return
            s = record["status"]
            self._publish("status", {k: s.get(k) for k in STATUS_KEYS if k in s} | {"time": time.time()},
                          retain=True)

    def counters(self):
        with self._lock:
            self.counts["unacked"] = len(self._pending)
            return dict(self.counts, connected=int(self.connected.is_set()))

    def unacked(self) -> int:
        return self.counters()["unacked"]

    def close(self):
        """Wait up to close_timeout_s for the broker to acknowledge what is in flight; what is
        still unacknowledged then is counted `abandoned` (counters()['abandoned_unacked'])."""
        deadline = time.monotonic() + self.close_timeout_s
        while self.unacked() and time.monotonic() < deadline:
            time.sleep(0.02)
        self.counts["abandoned_unacked"] = self.unacked()
        self._closing = True
        self.client.disconnect()
        self.client.loop_stop()
