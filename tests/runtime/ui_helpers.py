"""A stream running in a thread of the test process (run_stream with its servers), and loopback HTTP."""
import contextlib
import json
import re
import shutil
import threading
import time
import urllib.error
import urllib.request

from runtime.stream import run_stream
from tests.strip_model import SIM


def defect_uri(rate: float, every: int = 200, n: int = 400, lines: int = 32, extra: str = "") -> str:
    """The test strip with a defect every `every` lines (columns spread across the width)."""
    defects = ";".join(f"{150 + every * i}:{40 + (53 * i) % 170}:6" for i in range(n))
    return SIM + f"&rate={rate}&lines={lines}&defects={defects}{extra}"


@contextlib.contextmanager
def streaming(engine, uri, **kw):
    """Yield {"pipe", "ui", "console", "summary" (after exit)} while run_stream runs in a thread."""
    stop, got, lines = threading.Event(), {}, []
    started = threading.Event()

    def on_start(pipe):
        got["pipe"] = pipe
        started.set()

    def run():
        try:
            got["summary"] = run_stream(engine, uri, stop_event=stop, on_start=on_start, console=lines.append,
                                        status_every_s=3600, **kw)
        except BaseException as e:     # reported by the test
            got["error"] = e
            started.set()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    assert started.wait(60), "stream did not start"
    if "error" in got:
        raise got["error"]
    got["console"] = lines
    for line in lines:
        m = re.match(r"ui: (http://\S+?/)(#token=(\S+))?", line)
        if m:
            got["ui"], got["token"] = m.group(1), m.group(3)
    try:
        yield got
    finally:
        stop.set()
        t.join(30)
    assert not t.is_alive(), "stream did not stop"
    if "error" in got:
        raise got["error"]


def http(method: str, url: str, body=None, token=None, timeout=10):
    """(status, parsed JSON or bytes) of one loopback request."""
    data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    if token is not None:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            raw, status, ctype = r.read(), r.status, r.headers.get("Content-Type", "")
    except urllib.error.HTTPError as e:
        raw, status, ctype = e.read(), e.code, e.headers.get("Content-Type", "")
    return status, (json.loads(raw) if "json" in ctype else raw)


def wait_for(cond, timeout=20.0, step=0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = cond()
        if v:
            return v
        time.sleep(step)
    return cond()


def copy_artifact(artifact, folder):
    """The artifact and its sidecar in `folder` (tests that write the runtime section)."""
    folder.mkdir(parents=True, exist_ok=True)
    dst = folder / artifact.name
    shutil.copy(artifact, dst)
    shutil.copy(artifact.with_name(artifact.name + ".json"), folder / (artifact.name + ".json"))
    return dst
