"""``uncomp serve`` as users start it: a process on a port, refused settings before it starts, and a
clean exit on SIGTERM that lets the request in flight finish, answers the waiting ones with 503, and
answers a request still running at --shutdown-timeout with an error before it closes."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("uvicorn")

from serving import free_port  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from uncomp_cli.cli.app import app  # noqa: E402

UNCOMP = str(Path(sys.executable).with_name("uncomp"))


@pytest.mark.parametrize("args, message", [
    (["--method", "snapkv", "--sinks", "4"], "--sinks applies to streamingllm, not snapkv"),
    (["--method", "zip"], "unknown method"),
    (["--kv-cache-limit", "lots"], "invalid memory size 'lots'"),
    (["--max-body", "lots"], "invalid memory size 'lots'"),
    (["--context-dir", "/tmp/x", "--reuse-min-tokens", "0"], "--context-dir keeps documents for reuse"),
    (["--context-dir-limit", "lots"], "invalid memory size 'lots'"),
    (["--ray-address", "auto"], "--ray-address is for --replicas N"),
])
def test_bad_settings_are_one_error_line_before_anything_loads(args, message):
    result = CliRunner().invoke(app, ["serve", "-m", "/nonexistent/model", *args])
    assert result.exit_code == 2
    assert result.stderr.startswith("error: ") and message in result.stderr and result.stdout == ""


def _wait_until_healthy(url: str, process: subprocess.Popen) -> None:
    while True:
        assert process.poll() is None, process.stderr.read().decode()
        try:
            if httpx.get(url + "/health").status_code == 200:
                return
        except httpx.HTTPError:
            time.sleep(0.2)


def test_serve_answers_then_stops_cleanly_on_sigterm(tiny_model_dir):
    port = free_port()
    process = subprocess.Popen([UNCOMP, "serve", "-m", str(tiny_model_dir), "--port", str(port), "--method", "full",
                                "--served-model-name", "tiny"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_until_healthy(url, process)
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        reply = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hello"}],
                                               max_tokens=4, temperature=0)
        assert reply.usage.completion_tokens >= 1

        streamed: list[str] = []

        def long_request() -> None:
            for chunk in client.completions.create(model="tiny", prompt="hello", max_tokens=400, temperature=0,
                                                   stream=True):
                streamed.append(chunk.choices[0].finish_reason or "")

        thread = threading.Thread(target=long_request)
        thread.start()
        while not streamed:
            time.sleep(0.01)
        process.send_signal(signal.SIGTERM)
        thread.join()
        assert process.wait(120) == 0
    finally:
        if process.poll() is None:
            process.kill()
    assert streamed[-1] in ("stop", "length")  # the request in flight was finished, not cut
    assert process.stdout.read() == b""  # stdout carries no logs


def _gauge(url: str, name: str) -> float:
    text = httpx.get(url + "/metrics").text
    return next(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " "))


def test_on_sigterm_waiting_requests_get_503_running_ones_their_timeout_then_an_error_and_new_ones_no_connection(
        tiny_model_dir):
    port = free_port()
    process = subprocess.Popen([UNCOMP, "serve", "-m", str(tiny_model_dir), "--port", str(port), "--method", "full",
                                "--served-model-name", "tiny", "--max-batch", "1", "--shutdown-timeout", "0"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    body = {"model": "tiny", "prompt": "hello", "max_tokens": 1500, "temperature": 0, "ignore_eos": True}
    streamed: list[str] = []
    waited: list[httpx.Response] = []

    def running_stream() -> None:
        with httpx.stream("POST", url + "/v1/completions", json=body | {"stream": True}, timeout=60) as response:
            streamed.extend(line for line in response.iter_lines() if line)

    def waiting_request() -> None:
        waited.append(httpx.post(url + "/v1/completions", json=body, timeout=60))

    try:
        _wait_until_healthy(url, process)
        threads = [threading.Thread(target=running_stream), threading.Thread(target=waiting_request)]
        threads[0].start()
        while _gauge(url, "uncomp_running_requests") != 1:
            time.sleep(0.01)
        threads[1].start()
        while _gauge(url, "uncomp_queue_depth") != 1:  # the second waits behind the first (--max-batch 1)
            time.sleep(0.01)
        process.send_signal(signal.SIGTERM)
        stopped = time.monotonic()
        threads[1].join()
        with pytest.raises(httpx.ConnectError):  # the server stopped listening before it answered
            httpx.get(url + "/health")
        threads[0].join()
        assert process.wait(60) == 0
    finally:
        if process.poll() is None:
            process.kill()
    assert time.monotonic() - stopped < 10  # --shutdown-timeout 0: nothing waits for the long answer
    assert waited[0].status_code == 503 and waited[0].json()["error"]["code"] == "shutting_down"
    assert streamed[-1] == "data: [DONE]"
    error = json.loads(streamed[-2].removeprefix("data: "))["error"]
    assert error["code"] == "shutting_down" and "before the answer was finished" in error["message"]
    assert any('"text"' in line for line in streamed[:-2])  # it was answering when the server stopped
