"""The pure parts of ``scripts/bench_serve.py``'s mixed mode: the workload, the measures, stream parsing."""

from __future__ import annotations

import importlib.util
import json
import statistics
import sys
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[2] / "scripts" / "bench_serve.py"
_SPEC = importlib.util.spec_from_file_location("bench_serve", _PATH)
bench = sys.modules["bench_serve"] = importlib.util.module_from_spec(_SPEC)  # dataclasses look it up
_SPEC.loader.exec_module(bench)


def data(event: dict | str) -> str:
    return "data: " + (event if isinstance(event, str) else json.dumps(event))


def chunk(content: str | None = None, finish: str | None = None, role: bool = False) -> str:
    delta = {"role": "assistant", "content": ""} if role else ({"content": content} if content else {})
    return data({"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": delta,
                                                                  "finish_reason": finish}]})


def usage(completion: int, prompt: int = 100, **extra) -> str:
    return data({"choices": [], "usage": {"prompt_tokens": prompt, "completion_tokens": completion,
                                          "total_tokens": prompt + completion}} | extra)


def timed(*lines: str, step: float = 1.0) -> list[tuple[float, str]]:
    """Lines as a server sends them (blank separators between events), one second apart."""
    out = []
    for i, line in enumerate(lines):
        out += [(10.0 + i * step, line), (10.0 + i * step, "")]
    return out


# --- the workload ---------------------------------------------------------------------------------------------------

def test_workload_is_seeded_and_lengths_stay_in_their_ranges():
    plan = bench.plan_workload(500, rate=0.5, seed=3)
    assert plan == bench.plan_workload(500, rate=0.5, seed=3)
    assert plan != bench.plan_workload(500, rate=0.5, seed=4)
    assert all(200 <= p.prompt_tokens <= 3500 and 16 <= p.max_tokens <= 256 for p in plan)
    assert [p.index for p in plan] == list(range(500))
    # the ranges are covered, not a corner of them
    assert min(p.prompt_tokens for p in plan) < 400 and max(p.prompt_tokens for p in plan) > 3300
    assert min(p.max_tokens for p in plan) < 30 and max(p.max_tokens for p in plan) > 240


def test_lengths_do_not_depend_on_the_rate():
    slow, fast = bench.plan_workload(50, rate=0.05, seed=0), bench.plan_workload(50, rate=2.0, seed=0)
    assert [(p.prompt_tokens, p.max_tokens) for p in slow] == [(p.prompt_tokens, p.max_tokens) for p in fast]
    assert slow[-1].arrival > fast[-1].arrival


def test_arrivals_are_a_poisson_process():
    plan = bench.plan_workload(4000, rate=0.25, seed=1)
    gaps = [b.arrival - a.arrival for a, b in zip(plan, plan[1:])]
    assert plan[0].arrival == 0 and all(g >= 0 for g in gaps)
    assert statistics.mean(gaps) == pytest.approx(4.0, rel=0.06)  # 1 / rate
    # exponential gaps: standard deviation = mean, and P(gap > mean) = 1/e
    assert statistics.stdev(gaps) == pytest.approx(statistics.mean(gaps), rel=0.08)
    assert sum(g > 4.0 for g in gaps) / len(gaps) == pytest.approx(0.368, abs=0.03)


def test_custom_ranges():
    plan = bench.plan_workload(100, rate=1, seed=0, prompt_range=(64, 64), answer_range=(1, 4))
    assert {p.prompt_tokens for p in plan} == {64} and {p.max_tokens for p in plan} <= {1, 2, 3, 4}
    assert bench.length_range("200:3500") == (200, 3500) and bench.length_range("7") == (7, 7)
    with pytest.raises(Exception, match="LOW:HIGH"):
        bench.length_range("300:200")


def test_spans_are_distinct_stretches_of_the_text():
    lengths = [300, 50, 1000, 7]
    got = bench.spans(10_000, lengths)
    assert [end - start for start, end in got] == lengths
    assert got == [(0, 300), (300, 350), (350, 1350), (1350, 1357)]


def test_spans_wrap_round_when_the_text_is_short():
    got = bench.spans(1000, [400] * 6)
    assert all(0 <= start and end <= 1000 and end - start == 400 for start, end in got)
    assert len(set(got)) == len(got)
    with pytest.raises(SystemExit):
        bench.spans(100, [101])


# --- parsing a stream -----------------------------------------------------------------------------------------------

def test_read_stream_takes_times_tokens_and_usage():
    lines = timed(chunk(role=True), chunk("Hello"), chunk(" world"), chunk("!"), chunk(finish="length"),
                  usage(5, prompt=42, uncomp={"batch_size": 3}), "data: [DONE]")
    got = bench.read_stream(lines)
    assert got["first"] == 11.0 and got["last"] == 13.0  # the role chunk carries no text
    assert got["completion_tokens"] == 5 and got["prompt_tokens"] == 42 and got["usage"]
    assert got["finish_reason"] == "length" and got["batch_size"] == 3


def test_read_stream_without_usage_counts_text_chunks():
    got = bench.read_stream(timed(chunk("a"), chunk("b"), chunk(finish="stop"), "data: [DONE]"))
    assert got["completion_tokens"] == 2 and got["prompt_tokens"] is None and not got["usage"]
    assert got["batch_size"] is None


def test_read_stream_skips_comments_and_usage_nulls():
    vllm_style = data({"choices": [{"index": 0, "delta": {"content": "x"}, "finish_reason": None}], "usage": None})
    got = bench.read_stream(timed(": keep-alive", vllm_style, chunk(finish="stop"), usage(1), "data:[DONE]"))
    assert got["completion_tokens"] == 1 and got["finish_reason"] == "stop"


@pytest.mark.parametrize("lines, error, kind", [
    ([chunk("a"), chunk(finish="stop")], bench.MalformedStream, "malformed"),  # no [DONE]
    ([chunk("a"), "data: [DONE]"], bench.MalformedStream, "malformed"),  # no finish_reason
    ([chunk("a"), "data: {not json", "data: [DONE]"], bench.MalformedStream, "malformed"),
    ([chunk("a"), data({"error": {"message": "boom", "type": "server_error"}}), "data: [DONE]"],
     bench.RequestFailed, "error"),
])
def test_broken_streams_are_refused(lines, error, kind):
    with pytest.raises(error) as caught:
        bench.read_stream(timed(*lines))
    assert bench.lost_kind(caught.value) == kind


def test_lost_kinds():
    assert bench.lost_kind(TimeoutError("limit")) == "timeout"
    assert bench.lost_kind(bench.httpx.ReadTimeout("slow")) == "timeout"
    assert bench.lost_kind(bench.httpx.ConnectError("refused")) == "error"


# --- the measures ---------------------------------------------------------------------------------------------------

def outcome(sent: float, first: float | None, last: float | None, tokens: int, finish: str = "length") -> dict:
    return {"sent": sent, "first": first, "last": last, "completion_tokens": tokens, "prompt_tokens": 100,
            "finish_reason": finish, "batch_size": None, "usage": True}


def test_ttft_and_tpot():
    done = outcome(sent=1.0, first=3.5, last=13.5, tokens=11)
    assert bench.ttft(done) == pytest.approx(2.5)
    assert bench.tpot(done) == pytest.approx(1.0)  # 10 s over the 10 tokens after the first
    assert bench.tpot(outcome(1.0, 2.0, 2.0, 1)) is None  # one token: no time per output token
    assert bench.tpot(outcome(1.0, None, None, 0)) is None
    assert bench.ttft(outcome(1.0, None, None, 0)) == 0.0


def test_percentiles():
    values = list(range(1, 101))  # 1..100
    assert bench.percentile(values, 0.5) in (50, 51) and bench.percentile(values, 0.95) in (95, 96)
    assert bench.percentile([7.0], 0.95) == 7.0
    assert bench.percentile([5, 1, 3], 0.5) == 3  # unsorted input
    assert bench.quantiles([1.0, 2.0, 3.0], "ttft") == {"ttft_p50": 2.0, "ttft_p95": 3.0}
    assert bench.quantiles([], "tpot") == {"tpot_p50": None, "tpot_p95": None}


def test_summary_counts_lost_requests_and_achieved_lengths():
    plan = bench.plan_workload(5, rate=1, seed=0, answer_range=(10, 10))
    outcomes = [outcome(0, 1, 10, 10), outcome(1, 2, 6, 5, "stop"), TimeoutError("limit"),
                bench.MalformedStream("no [DONE]")]  # the fifth was never sent
    got = bench.summarise(plan, outcomes, wall=10.0)
    assert got["requests"] == 5 and got["completed"] == 2 and got["lost"] == 2 and got["not_sent"] == 1
    assert got["lost_by_kind"] == {"timeout": 1, "malformed": 1}
    assert got["output_tokens"] == 15 and got["output_tokens_per_second"] == 1.5
    assert got["answer_tokens_asked"] == 20 and got["reached_max_tokens"] == 1 and got["output_over_asked"] == 0.75
    assert got["finish_reasons"] == {"length": 1, "stop": 1}
    assert got["ttft_p50"] == 1.0 and got["tpot_p50"] == 1.0


# --- the server side ------------------------------------------------------------------------------------------------

def test_running_requests_gauge_from_metrics_text():
    uncomp = "# HELP uncomp_running_requests x\n# TYPE uncomp_running_requests gauge\nuncomp_running_requests 7.0\n"
    assert bench.running_requests(uncomp) == ("uncomp_running_requests", 7.0)
    vllm = ('vllm:num_requests_running{engine="0",model_name="bench"} 3.0\n'
            'vllm:num_requests_running_total 99\n'  # another metric whose name starts alike
            'vllm:num_requests_waiting{engine="0",model_name="bench"} 5.0\n')
    assert bench.running_requests(vllm) == ("vllm:num_requests_running", 3.0)
    assert bench.running_requests("other_metric 1\n") is None


def test_in_flight_keeps_the_most():
    in_flight = bench.InFlight()
    with in_flight:
        with in_flight:
            pass
        with in_flight:
            assert in_flight.now == 2
    assert in_flight.now == 0 and in_flight.most == 2


def test_only_loopback_urls():
    assert bench.check_loopback("http://127.0.0.1:8011/v1/") == "http://127.0.0.1:8011"
    assert bench.check_loopback("http://localhost:8000") == "http://localhost:8000"
    assert bench.check_loopback("http://[::1]:8000") == "http://[::1]:8000"
    for url in ("http://10.0.0.2:8000", "https://api.openai.com/v1", "http://example.com"):
        with pytest.raises(SystemExit):
            bench.check_loopback(url)


def test_chat_body_sends_ignore_eos_only_when_asked():
    body = bench.chat_body("bench", "text", 32, ignore_eos=False)
    assert body["max_tokens"] == 32 and body["temperature"] == 0 and body["stream"] and "stop" not in body
    assert body["stream_options"] == {"include_usage": True} and "ignore_eos" not in body
    assert bench.chat_body("bench", "text", 32, ignore_eos=True)["ignore_eos"] is True


# --- the HTTP side, on a transport that answers in process ----------------------------------------------------------

def fake_server(refuses_extra_fields: bool, stream: list[str] | None = None, status: int = 200):
    def answer(request):
        body = json.loads(request.content)
        if refuses_extra_fields and "ignore_eos" in body:
            return bench.httpx.Response(400, json={"error": {"message": "unknown field ignore_eos"}})
        if status != 200:
            return bench.httpx.Response(status, json={"error": {"message": "queue full"}})
        return bench.httpx.Response(200, text="".join(line + "\n\n" for line in stream or []),
                                    headers={"content-type": "text/event-stream"})
    return bench.httpx.Client(transport=bench.httpx.MockTransport(answer))


def test_ignore_eos_is_asked_once():
    assert not bench.takes_ignore_eos(fake_server(refuses_extra_fields=True), "http://x", "bench")
    assert bench.takes_ignore_eos(fake_server(refuses_extra_fields=False), "http://x", "bench")


def test_send_reads_the_stream_and_refuses_error_statuses():
    lines = [chunk("a"), chunk("b"), chunk(finish="length"), usage(2), "data: [DONE]"]
    body = bench.chat_body("bench", "text", 2, ignore_eos=False)
    got = bench.send(fake_server(True, lines), "http://x", body, deadline=bench.time.perf_counter() + 60)
    assert got["completion_tokens"] == 2 and got["sent"] <= got["first"] <= got["last"]
    with pytest.raises(bench.RequestFailed, match="HTTP 429"):
        bench.send(fake_server(True, status=429), "http://x", body, deadline=bench.time.perf_counter() + 60)
    with pytest.raises(TimeoutError):
        bench.send(fake_server(True, lines), "http://x", body, deadline=bench.time.perf_counter() - 1)


def test_worker_seconds_by_phase():
    text = ('uncomp_worker_seconds_total{phase="prefill"} 12.5\n'
            'uncomp_worker_seconds_total{phase="decode"} 3.25\n'
            'uncomp_running_requests 2.0\n')
    assert bench.worker_seconds(text) == {"prefill": 12.5, "decode": 3.25}
    assert bench.worker_seconds("vllm:num_requests_running 1\n") is None
