"""The server over the embedded default model: one chat completion through the openai client."""

from __future__ import annotations

import pytest

pytest.importorskip("openai")
pytest.importorskip("uvicorn")

from serving import start_server  # noqa: E402

from uncomp_cli.serve.server import ServeSettings  # noqa: E402

pytestmark = pytest.mark.slow


def test_a_chat_completion_on_the_embedded_model(embedded):
    handle = start_server(embedded, ServeSettings(method="snapkv", method_options={"budget": "10%"}))
    try:
        client = handle.client()
        model = client.models.list().data[0].id
        reply = client.chat.completions.create(
            model=model, max_tokens=12, temperature=0,
            messages=[{"role": "user", "content": "What is the capital of France?"}])
    finally:
        handle.stop()
    assert "Paris" in reply.choices[0].message.content
    assert reply.usage.prompt_tokens > 5 and reply.usage.completion_tokens >= 1
    assert reply.model_extra["uncomp"]["method"] == "snapkv"
