"""Start a real ``fleetlm serve`` process for a test and stop it afterwards."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """``with ServerProcess(["--dtype", "float32"]) as srv: httpx.get(srv.url + "/health")``.
    Entering waits until the server is ready (``/health/ready`` answers 200)."""

    def __init__(self, args: list[str], model: str | Path = "smollm2-135m-instruct", env: dict | None = None,
                 api_key: str | None = None, start_timeout: float = 300) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.api_key = api_key
        self.cmd = [sys.executable, "-m", "fleetlm.entrypoints.cli", "serve", str(model), "--port", str(self.port), *args]
        self.env = {**os.environ, **(env or {})}
        self.start_timeout = start_timeout
        self.proc: subprocess.Popen | None = None
        self.log_path: Path | None = None

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def __enter__(self) -> ServerProcess:
        import tempfile

        fd, name = tempfile.mkstemp(prefix="fleetlm-serve-", suffix=".log")
        self.log_path = Path(name)
        self.proc = subprocess.Popen(self.cmd, env=self.env, stdout=fd, stderr=subprocess.STDOUT)
        os.close(fd)
        self.wait_ready()
        return self

    def wait_ready(self) -> None:
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(self.url + "/health/ready", timeout=30).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"server not ready after {self.start_timeout} s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path else ""

    def metric(self, name: str) -> float:
        """Sum of a metric's samples in /metrics (e.g. ``fleetlm:kv_cache_free_blocks``)."""
        text = httpx.get(self.url + "/metrics", headers=self.headers, timeout=30).text
        total, found = 0.0, False
        for line in text.splitlines():
            if line.startswith(name + "{") or line.startswith(name + " "):
                total += float(line.rsplit(" ", 1)[1])
                found = True
        if not found:
            raise KeyError(name)
        return total

    def terminate(self, timeout: float = 60) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def __exit__(self, *exc) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)
        if self.log_path is not None:
            self.log_path.unlink(missing_ok=True)
