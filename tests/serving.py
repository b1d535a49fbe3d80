"""Start ``uncomp serve``'s application on a free port in this process (a thread), for tests."""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass

import httpx
import openai
import uvicorn

from uncomp_cli.serve.app import create_app
from uncomp_cli.serve.server import ServeSettings

MODEL = "tiny"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Running:
    url: str
    app: object
    server: object
    thread: threading.Thread

    def client(self, **kwargs):
        return openai.OpenAI(base_url=self.url + "/v1", api_key="unused", max_retries=0, **kwargs)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(60)


def start_server(loaded, settings: ServeSettings, profile=None) -> Running:
    app = create_app(loaded, settings, profile)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    return Running(f"http://127.0.0.1:{port}", app, server, thread)


def metric(running, name: str) -> float:
    """A metric's value (summed over its labels) from GET /metrics."""
    text = httpx.get(running.url + "/metrics").text
    return sum(float(line.split()[-1]) for line in text.splitlines()
               if line.startswith(name) and line[len(name)] in " {")
