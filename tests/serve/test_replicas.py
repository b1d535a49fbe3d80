"""``uncomp serve --replicas``: routing keys and rendezvous hashing, then two engine replicas of the
tiny model on a local Ray cluster: affinity, the shared context folder, a killed replica, SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("uvicorn")
ray = pytest.importorskip("ray")
pytest.importorskip("ray.serve")

from serving import free_port  # noqa: E402

from uncomp_cli.serve.replicas import document_key  # noqa: E402
from uncomp_cli.serve.routing import owner  # noqa: E402

UNCOMP = str(Path(sys.executable).with_name("uncomp"))


def chat_body(text: str, **extra) -> bytes:
    return json.dumps({"model": "tiny", "messages": [{"role": "user", "content": text}], **extra}).encode()


def test_the_document_key_is_the_first_user_message_before_its_last_paragraph_break():
    document = "A long report. " * 10
    key = document_key(chat_body(document + "\n\nWhat happened?"), min_chars=64)
    assert key is not None
    assert document_key(chat_body(document + "\n\nAnother question?"), 64) == key
    later_turn = json.dumps({"messages": [{"role": "system", "content": "Be brief."},
                                          {"role": "user", "content": document + "\n\nWhat happened?"},
                                          {"role": "assistant", "content": "Nothing."},
                                          {"role": "user", "content": "Sure?"}]}).encode()
    assert document_key(later_turn, 64) == key
    prompt = json.dumps({"prompt": document + "\n\nWhat happened?"}).encode()
    assert document_key(prompt, 64) == key
    assert document_key(chat_body(document.upper() + "\n\nWhat happened?"), 64) != key
    assert document_key(chat_body("short\n\nquestion"), 64) is None
    assert document_key(chat_body(document), 64) is None  # no paragraph break: nothing to keep
    assert document_key(b"not json", 64) is None and document_key(b"[1, 2]", 64) is None


def test_rendezvous_owners_move_only_for_a_removed_replica():
    keys = [f"document-{i}" for i in range(400)]
    three = {key: owner(key, ["a", "b", "c"]) for key in keys}
    assert {owner(key, ["c", "a", "b"]) for key in keys[:5]} == {three[key] for key in keys[:5]}  # order-free
    assert min(list(three.values()).count(r) for r in "abc") > 80  # spread over all three
    two = {key: owner(key, ["a", "c"]) for key in keys}
    assert all(two[key] == three[key] for key in keys if three[key] != "b")


@pytest.fixture(scope="module")
def app(tiny_model_dir, tmp_path_factory):
    """``uncomp serve --replicas 2`` as a user starts it; stopped with SIGTERM at the end."""
    folder = tmp_path_factory.mktemp("contexts")
    log = tmp_path_factory.mktemp("logs") / "serve.log"
    port = free_port()
    env = os.environ | {"RAY_USAGE_STATS_ENABLED": "0"}
    with log.open("w") as stderr:
        process = subprocess.Popen(
            [UNCOMP, "serve", "-m", str(tiny_model_dir), "--port", str(port), "--method", "snapkv", "--budget", "50%",
             "--replicas", "2", "--reuse-min-tokens", "64", "--context-dir", str(folder), "--served-model-name",
             "tiny", "--max-batch", "4", "--shutdown-timeout", "5"],
            stdout=subprocess.PIPE, stderr=stderr, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        while True:
            assert process.poll() is None, log.read_text()
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        _wait_until_both_replicas_answer(url)
        yield url, folder, process
        process.send_signal(signal.SIGTERM)
        assert process.wait(180) == 0, log.read_text()[-3000:]
        assert process.stdout.read() == b""  # logs on stderr only
    finally:
        if process.poll() is None:
            process.kill()


def _wait_until_both_replicas_answer(url: str) -> None:
    """Short requests in parallel until both replicas have answered: the front's router learns of
    the replicas shortly after the application is up, and documents routed before that would be
    routed again once it knows both."""
    seen: set[str] = set()

    def short() -> None:
        response = httpx.post(url + "/v1/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": 2},
                              timeout=120)
        seen.add(response.headers.get("x-uncomp-replica"))

    for _ in range(60):
        threads = [threading.Thread(target=short) for _ in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if len(seen - {None}) >= 2:
            return
    raise AssertionError(f"only {seen} answered")


def ask(url: str, document: str, question: str, **extra) -> httpx.Response:
    response = httpx.post(url + "/v1/chat/completions", content=chat_body(document + "\n\n" + question, max_tokens=4,
                                                                          temperature=0, **extra),
                          headers={"content-type": "application/json"}, timeout=120)
    assert response.status_code == 200, response.text
    return response


DOCUMENTS = [f"Report {d}. " + " ".join(f"Item {d}-{i} was shipped on day {i}." for i in range(12)) for d in range(8)]


def test_every_question_about_a_document_goes_to_the_replica_that_holds_it(app):
    url, _, _ = app
    replicas: dict[int, set[str]] = defaultdict(set)
    sources = []
    for turn, question in enumerate(["When was item 1 shipped?", "And item 2?", "Which items?"]):
        for d, document in enumerate(DOCUMENTS):
            response = ask(url, document, question)
            replicas[d].add(response.headers["x-uncomp-replica"])
            if turn:
                sources.append(response.json()["uncomp"]["context_from"])
    assert all(len(served) == 1 for served in replicas.values())
    assert sources == ["memory"] * len(sources)  # every later question hit in memory
    tags = sorted(set().union(*replicas.values()))
    if len(tags) == 2:  # the router's choice is rendezvous hashing over the replicas' ids
        for d, document in enumerate(DOCUMENTS):
            key = document_key(chat_body(document + "\n\nx"), 64)
            assert replicas[d] == {owner(key, tags)}
    short = {ask(url, "hi", "there").headers["x-uncomp-replica"] for _ in range(4)}  # no document: any replica
    assert short <= set(tags) or len(tags) < 2


def test_errors_come_back_as_the_engine_sends_them(app):
    url, _, _ = app
    wrong = httpx.post(url + "/v1/chat/completions", json={"model": "other", "messages": []}, timeout=60)
    assert wrong.status_code in (400, 404) and "error" in wrong.json()
    huge = httpx.post(url + "/v1/completions", content=b"x" * (65 << 20), timeout=60,
                      headers={"content-type": "application/json"})
    assert huge.status_code == 413


def _engine_actors() -> dict[str, str]:
    """Live engine replicas: replica id -> actor name."""
    return {a["name"].rsplit("#", 1)[-1]: a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
            if "#UncompEngine#" in a["name"]}


def test_a_killed_replica_fails_only_its_request_and_is_replaced(app):
    url, folder, _ = app
    ray.init(address="auto", namespace="serve", log_to_driver=False)
    try:
        owners = {ask(url, d, "When?").headers["x-uncomp-replica"]: d for d in DOCUMENTS}
        if len(owners) < 2:
            pytest.skip("every document went to one replica (rendezvous hashing over random replica ids)")
        (victim, doomed), (survivor, spared) = list(owners.items())[:2]
        assert set(_engine_actors()) >= {victim, survivor}
        events: list[str] = []

        def long_stream() -> None:
            body = chat_body(doomed + "\n\nTell me everything.", max_tokens=1500, stream=True, ignore_eos=True)
            with httpx.stream("POST", url + "/v1/chat/completions", content=body, timeout=120,
                              headers={"content-type": "application/json"}) as response:
                events.extend(line for line in response.iter_lines() if line)

        thread = threading.Thread(target=long_stream)
        thread.start()
        while len(events) < 3 and thread.is_alive():
            time.sleep(0.05)
        ray.kill(ray.get_actor(_engine_actors()[victim], namespace="serve"))
        other = ask(url, spared, "Still there?")
        thread.join(120)
        assert other.headers["x-uncomp-replica"] == survivor
        assert events[-1] == "data: [DONE]" and "replica_failed" in events[-2]
        assert not any('"finish_reason": "length"' in e or '"finish_reason":"length"' in e for e in events)
        for _ in range(240):  # Ray Serve starts a replica in the dead one's place
            if len(_engine_actors()) == 2 and victim not in _engine_actors():
                break
            time.sleep(0.5)
        assert len(_engine_actors()) == 2 and victim not in _engine_actors()
        again = ask(url, doomed, "When?")
        assert again.json()["uncomp"]["context_reused"] is True  # from the folder, or the survivor's memory
        assert any(folder.iterdir())
    finally:
        ray.shutdown()
