"""The plant's protocols against real peers on 127.0.0.1: the MQTT sink through a Mosquitto broker the
test starts (and restarts mid-stream: every event arrives, none lost silently), the bounded outbox
when no broker answers, and the OPC UA server read by an asyncua client, checked against the
stream's own events (reject line = line_start + --reject-offset-lines)."""
import asyncio
import getpass
import json
import os
import shutil
import socket
import subprocess
import threading
import time

import pytest

from deploy import load_engine
from tests.runtime.ui_helpers import defect_uri, streaming, wait_for

MOSQUITTO = shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if os.path.exists("/usr/sbin/mosquitto") else None)
OFFSET = 500


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Broker:
    """Debian's mosquitto on 127.0.0.1:port with persistence (what a plant broker keeps over a restart)."""

    def __init__(self, folder, port):
        self.port, self.folder, self.proc = port, folder, None
        self.conf = folder / "mosquitto.conf"
        # `user`: run as whoever runs the test (as root mosquitto would switch to its own user, which
        # cannot write the test's folder: no persistence, no log)
        self.conf.write_text(f"user {getpass.getuser()}\nlistener {port} 127.0.0.1\nallow_anonymous true\npersistence true\n"
                             f"persistence_location {folder}/\nlog_dest file {folder}/mosquitto.log\n")

    def start(self):
        self.proc = subprocess.Popen([MOSQUITTO, "-c", str(self.conf)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)

        def up():
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return True
            except OSError:
                return False
        assert wait_for(up, 10), (self.folder / "mosquitto.log").read_text() if (self.folder / "mosquitto.log").exists() else "no log"
        return self

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()            # SIGTERM: the broker saves its persistent sessions
            self.proc.wait(10)


class Subscriber:
    """A persistent-session QoS 1 subscriber (what an MES that must not miss events runs)."""

    def __init__(self, port, topic):
        import paho.mqtt.client as paho

        self.got, self.lock = [], threading.Lock()
        self.c = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="edge-ad-test-mes", clean_session=False)
        self.c.reconnect_delay_set(0.1, 1)
        self.c.on_connect = lambda c, u, f, rc, p: c.subscribe(f"{topic}/#", qos=1)
        self.c.on_message = self._on_message
        self.c.connect("127.0.0.1", port, keepalive=5)
        self.c.loop_start()

    def _on_message(self, c, u, msg):
        with self.lock:
            self.got.append((msg.topic, json.loads(msg.payload)))

    def messages(self, kind):
        with self.lock:
            return [p for t, p in self.got if t.endswith("/" + kind)]

    def close(self):
        self.c.disconnect()
        self.c.loop_stop()


@pytest.mark.stack("mqtt")
def test_mqtt_delivers_every_event_across_a_broker_restart(onnx_artifact, tmp_path):
    pytest.importorskip("paho.mqtt", reason='pip install -e ".[plant]"')
    if MOSQUITTO is None:
        pytest.skip("Debian's mosquitto not installed (apt-get install mosquitto; .ci/run does)")
    port = _free_port()
    broker = Broker(tmp_path, port).start()
    sub = Subscriber(port, "line1")
    try:
        assert wait_for(lambda: sub.c.is_connected(), 10)
        time.sleep(0.3)                                          # subscribed
        with streaming(load_engine(onnx_artifact), defect_uri(2000), tile=64, latency_budget_ms=None,
                       mqtt=f"mqtt://127.0.0.1:{port}/line1", reject_offset_lines=OFFSET) as got:
            pipe = got["pipe"]
            assert wait_for(lambda: len(sub.messages("event")) >= 3, 20)
            broker.stop()                                       # the broker goes away mid-stream ...
            n_down = pipe.stats.events
            assert wait_for(lambda: pipe.stats.events >= n_down + 5, 20)   # ... events keep coming
            broker.start()                                      # ... and comes back
            assert wait_for(lambda: pipe.stats.events >= n_down + 15, 20)
        s = got["summary"]
        n = s["events"]
        ok = wait_for(lambda: {e["seq"] for e in sub.messages("event")} >= set(range(1, n + 1)), 15)
        assert ok, (sorted(set(range(1, n + 1)) - {e["seq"] for e in sub.messages("event")}), str(s["sinks"]["mqtt"]), (tmp_path / "mosquitto.log").read_text()[-3000:])
    finally:
        sub.close()
        broker.stop()
    by_seq = {e["seq"]: e for e in sub.messages("event")}
    assert sorted(by_seq) == list(range(1, n + 1))             # every event, in the broker's order or not
    own = {e["seq"]: e for e in pipe.events}
    for k, e in by_seq.items():
        assert e["reject_line"] == e["line_start"] + OFFSET
        assert (e["line_start"], e["col_start"], e["line_end"]) == (own[k]["line_start"], own[k]["col_start"],
                                                                     own[k]["line_end"])
    m = s["sinks"]["mqtt"]
    assert m["disconnects"] >= 1 and m["connects"] >= 2, m
    assert m["dropped"] == m["failed"] == m["abandoned"] == m["abandoned_unacked"] == 0, m
    assert m["acked"] == m["published"] >= n, m                  # the broker acknowledged everything
    status = sub.messages("status")
    assert status and status[-1]["lines_in"] > 0 and "dropped" in status[-1]


def test_mqtt_outbox_is_bounded_and_counts_what_it_drops(onnx_artifact):
    pytest.importorskip("paho.mqtt", reason='pip install -e ".[plant]"')
    port = _free_port()                                        # nothing listens: the broker is down throughout
    with streaming(load_engine(onnx_artifact), defect_uri(0, extra="&total=3000"), tile=64,
                   mqtt=f"mqtt://127.0.0.1:{port}/line1", mqtt_outbox=5) as got:
        wait_for(lambda: not got["pipe"].running(), 60)
    s = got["summary"]
    m = s["sinks"]["mqtt"]
    assert s["events"] >= 10
    assert m["published"] == 5 and m["acked"] == 0 and m["abandoned_unacked"] == 5, m
    assert m["dropped"] == s["events"] - 5 and m["failed"] == 0, m      # every event counted
    assert m["connects"] == 0 and m["status_skipped"] >= 1


@pytest.mark.parametrize("url", ["http://127.0.0.1/x", "mqtt://127.0.0.1:1883", "mqtt://127.0.0.1:1883/a/#",
                                 "mqtt://127.0.0.1:99999/t"])
def test_bad_mqtt_url_is_one_clear_error(onnx_artifact, url, capsys):
    from runtime.stream import main

    rc = main(["--engine", str(onnx_artifact), "--source", defect_uri(0, extra="&total=64"), "--mqtt", url])
    err = capsys.readouterr().err
    assert rc == 2 and "--mqtt" in err and "Traceback" not in err


@pytest.mark.stack("opcua")
def test_opcua_serves_verdicts_events_and_reject_pulses(onnx_artifact):
    pytest.importorskip("asyncua", reason='pip install -e ".[plant]"')
    from asyncua import Client

    n_defects = 12
    uri = defect_uri(4000, n=n_defects)        # a live camera; defects at lines 150 .. 2350, then quiet

    async def client_run(endpoint, until):
        """Subscribe to LastEvent (a queue, so no change is coalesced) until `until()`; a second
        client connects, leaves after its first event and comes back to fill the gap from RecentEvents."""
        seen, second = [], {}

        class Handler:
            def datachange_notification(self, node, val, data):
                if val:
                    seen.append(json.loads(val))

        async with Client(endpoint) as c:
            idx = await c.get_namespace_index("urn:edge-ad:stream")
            obj = await c.nodes.objects.get_child([f"{idx}:Stream"])
            node = lambda name: obj.get_child([f"{idx}:{name}"])            # noqa: E731
            sub = await c.create_subscription(20, Handler())
            await sub.subscribe_data_change(await node("LastEvent"), queuesize=1000, sampling_interval=0)
            async with Client(endpoint) as c2:       # the one that goes away
                idx2 = await c2.get_namespace_index("urn:edge-ad:stream")
                o2 = await c2.nodes.objects.get_child([f"{idx2}:Stream"])
                while not await (await o2.get_child([f"{idx2}:LastEventSeq"])).read_value():
                    await asyncio.sleep(0.02)
                second["seq_before"] = await (await o2.get_child([f"{idx2}:LastEventSeq"])).read_value()
            while not until():
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.5)                 # the last notifications
            async with Client(endpoint) as c2:       # back: what was missed is in RecentEvents
                idx2 = await c2.get_namespace_index("urn:edge-ad:stream")
                o2 = await c2.nodes.objects.get_child([f"{idx2}:Stream"])
                second["recent"] = [json.loads(x) for x in await (await o2.get_child([f"{idx2}:RecentEvents"])).read_value()]
            # one node at a time while the stream runs: LinesScored before LinesIn, so that the two
            # monotonic counters compare as a snapshot would (the server writes LinesIn first)
            values = {k: await (await node(k)).read_value() for k in
                      ("RejectLine", "RejectSeq", "RejectLength", "Events", "LinesScored", "LinesIn",
                       "LastVerdictLine", "PixelThreshold", "ImageThreshold", "Paused")}
        return seen, second, values

    with streaming(load_engine(onnx_artifact), uri, tile=64, opcua="127.0.0.1:0", latency_budget_ms=None,
                   reject_offset_lines=OFFSET) as got:
        pipe = got["pipe"]
        endpoint = next(line.split(" ", 1)[1] for line in got["console"] if line.startswith("opcua: "))
        assert endpoint.startswith("opc.tcp://127.0.0.1:")
        seen, second, values = asyncio.run(client_run(
            endpoint, lambda: pipe.stats.lines_scored > 2350 + 600))
    s = got["summary"]
    own = list(pipe.events)
    assert s["events"] == len(own) >= n_defects // 2 and s["accounting_ok"]
    assert [e["seq"] for e in seen] == list(range(1, len(own) + 1))        # every event, in order
    for mine, theirs in zip(own, seen):
        assert theirs["line_start"] == mine["line_start"] and theirs["col_end"] == mine["col_end"]
        assert theirs["reject_line"] == mine["line_start"] + OFFSET
    last = own[-1]
    assert values["RejectLine"] == last["line_start"] + OFFSET and values["RejectSeq"] == len(own)
    assert values["RejectLength"] == last["line_end"] - last["line_start"] + 1
    assert values["Events"] == len(own) and values["LinesIn"] >= values["LinesScored"] > 2950
    assert values["PixelThreshold"] == pipe.engine.map_threshold and values["Paused"] is False
    assert values["LastVerdictLine"] > 2950
    # the client that went away recovers every event it missed, by seq
    missed = {e["seq"] for e in second["recent"]}
    assert set(range(second["seq_before"] + 1, len(own) + 1)) <= missed
