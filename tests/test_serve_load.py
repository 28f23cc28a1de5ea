"""A bounded load test on loopback: 200 requests from 32 concurrent clients, streaming and not, some
cancelled mid-stream, some invalid. Every request has a timeout; every valid one must get a whole
answer, every invalid one its 400; the server's memory must come back to where it was."""

from __future__ import annotations

import http.client
import json
import random
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit

import pytest
from serve_fixtures import Server

REQUESTS, CLIENTS, TIMEOUT_S = 200, 32, 60
PROMPTS = ["The capital of France is", "今天的天气", "1, 2, 3,", "Once upon a time", "def f(x):", "🌧️ rain"]
RSS_SLACK = 48 * 1024 * 1024  # what allocator caches and interpreter free lists may keep


@pytest.fixture(scope="module")
def server(served_model):
    s = Server(served_model, "--max-batch", "8", "--max-context", "512")
    yield s
    assert s.stop() == 0


def one(server, i: int) -> str:
    """Run request i; returns what happened ("ok", "cancelled", "invalid") or raises."""
    rng = random.Random(i)
    kind = ("invalid", "cancel", "stream", "stream", "stream", "plain", "plain", "plain", "plain", "stream")[i % 10]
    body = {"prompt": rng.choice(PROMPTS), "max_tokens": rng.randint(1, 40), "temperature": rng.choice([0, 0.8]),
            "seed": i, "logprobs": rng.choice([None, 2]), "n": rng.choice([1, 1, 2])}
    if kind == "invalid":
        body[rng.choice(["temperature", "top_p", "n"])] = -5
    stream = kind in ("stream", "cancel")
    if stream:
        body["stream"] = True
        if kind == "cancel":
            body.update(max_tokens=400, ignore_eos=True)
    u = urlsplit(server.url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=TIMEOUT_S)
    try:
        conn.request("POST", "/v1/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
        r = conn.getresponse()
        if kind == "invalid":
            assert r.status == 400 and json.loads(r.read())["error"]["type"] == "invalid_request_error"
            return "invalid"
        assert r.status == 200, r.read()
        if not stream:
            answer = json.loads(r.read())
            assert len(answer["choices"]) == body["n"] and all(c["finish_reason"] in ("stop", "length") for c in answer["choices"])
            return "ok"
        finished, done = set(), False
        for line in r:
            line = line.decode().strip()
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                break
            chunk = json.loads(line[6:])
            if kind == "cancel":
                return "cancelled"  # closed after the first chunk
            finished |= {c["index"] for c in chunk["choices"] if c["finish_reason"] in ("stop", "length")}
        assert done and finished == set(range(body["n"]))
        return "ok"
    finally:
        conn.close()


def _load(server, count):
    with ThreadPoolExecutor(CLIENTS) as pool:
        return list(pool.map(lambda i: one(server, i), range(count), timeout=TIMEOUT_S * 4))


def test_200_requests_from_32_clients(server):
    _load(server, 40)  # warm: the allocator's and torch's first-use caches
    before = server.rss()
    outcomes = _load(server, REQUESTS)
    assert outcomes.count("invalid") == REQUESTS // 10 and outcomes.count("cancelled") == REQUESTS // 10
    assert outcomes.count("ok") == REQUESTS - 2 * (REQUESTS // 10)
    after = server.rss()
    assert after - before < RSS_SLACK, (before, after)
    assert one(server, 2) == "ok"  # and it still serves
