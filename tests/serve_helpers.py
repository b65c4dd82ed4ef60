"""Helpers of the serving tests (tests/runtime/test_serve.py, tests/deploy/test_remote.py): free
loopback ports, the served artifact, `python -m runtime.serve` in a subprocess, and checks that
it leaves no process behind."""
from __future__ import annotations

import importlib.util
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
# the serving tests' marks: tallied under the `serve` stack, skipped without PyTriton / tritonclient
SERVE_STACK = [pytest.mark.stack("serve"),
               pytest.mark.skipif(not all(importlib.util.find_spec(m) for m in ("pytriton", "tritonclient")),
                                  reason="nvidia-pytriton / tritonclient not installed (pip install 'edge-ad[serve]')")]
MAX_BATCH = 4
START_TIMEOUT_S = 120


def free_ports(n: int):
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


def exported_artifact(checkpoint, tmp_path_factory) -> pathlib.Path:
    """The fitted test model (tests/strip_model.py's padim checkpoint) exported with
    export.onnx.export_onnx: uint8 Mono8 frames in, the artifact contract out. Exported once per
    session (reused by test_serve.py and test_remote.py)."""
    from export.onnx import export_onnx

    out_dir = tmp_path_factory.getbasetemp() / "deploy_served_artifact"
    path = out_dir / "model.onnx"
    if not path.is_file():
        out_dir.mkdir(exist_ok=True)
        path = export_onnx(checkpoint, out_dir, frame_channels=1, check=False, quiet=True).path
    return path


def descendants(pid: int):
    """[(pid, name)] of every process below `pid` (psutil, else `ps`)."""
    try:
        import psutil
    except ImportError:
        psutil = None
    if psutil is not None:
        try:
            return [(c.pid, c.name()) for c in psutil.Process(pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            return []
    out = subprocess.run(["ps", "-eo", "pid=,ppid=,comm="], capture_output=True, text=True).stdout
    kids, found, frontier = {}, [], [pid]
    for line in out.splitlines():
        p, pp, name = line.split(None, 2)
        kids.setdefault(int(pp), []).append((int(p), name.strip()))
    while frontier:
        for child in kids.get(frontier.pop(), []):
            found.append(child)
            frontier.append(child[0])
    return found


def alive(pid: int) -> bool:
    try:
        import psutil

        try:
            return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False
    except ImportError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True


def wait_gone(procs, timeout=30.0):
    """Wait until every (pid, name) has exited; returns those still alive after `timeout`.
    (Python-backend stubs' multiprocessing helpers exit a moment after their stub.)"""
    deadline = time.monotonic() + timeout
    left = [(p, n) for p, n in procs if alive(p)]
    while left and time.monotonic() < deadline:
        time.sleep(0.5)
        left = [(p, n) for p, n in left if alive(p)]
    return left


class ServerProcess:
    """`python -m runtime.serve` in a subprocess on loopback ports."""

    def __init__(self, artifact, log_path, max_batch=MAX_BATCH, extra=()):
        self.http_port, self.grpc_port, self.metrics_port = free_ports(3)
        self.log_path = pathlib.Path(log_path)
        self.log = open(self.log_path, "w")
        cmd = [sys.executable, "-m", "runtime.serve", "--engine", str(artifact),
               "--http-port", str(self.http_port), "--grpc-port", str(self.grpc_port),
               "--metrics-port", str(self.metrics_port), "--max-batch", str(max_batch), *extra]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT)
        self.wait_ready()

    def wait_ready(self):
        import tritonclient.http as httpclient

        deadline = time.monotonic() + START_TIMEOUT_S
        client = httpclient.InferenceServerClient(f"127.0.0.1:{self.http_port}")
        try:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"runtime.serve exited with {self.proc.returncode}:\n{self.tail()}")
                try:
                    if client.is_server_ready() and client.is_model_ready("edge_ad") \
                            and client.is_model_ready("edge_ad_metadata"):
                        return
                except Exception:
                    pass
                time.sleep(0.5)
        finally:
            client.close()
        self.terminate()
        raise RuntimeError(f"runtime.serve not ready after {START_TIMEOUT_S} s:\n{self.tail()}")

    def tail(self, n=4000):
        self.log.flush()
        return self.log_path.read_text()[-n:]

    def terminate(self, timeout=60):
        """SIGTERM; returns (exit code, [(pid, name)] of the server's descendants before)."""
        kids = descendants(self.proc.pid)
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        self.log.close()
        return code, kids
