"""`ernie serve` through the official `openai` client (and raw HTTP where the client cannot go), on a
tiny random model over loopback.

References: transformers (greedy generate, float64 log-softmax of its logits) and the shipped
tokenizer.json through the `tokenizers` library; OpenAI's published shapes for the error body.
"""

from __future__ import annotations

import http.client
import json
import signal
import subprocess
import sys
import threading
import time
from urllib.parse import urlsplit

import openai
import pytest
import torch
from serve_fixtures import ENV, Server
from tiny_models import load_reference

PROMPT = "The capital of France is"
CONTEXT = 256


@pytest.fixture(scope="module")
def server(served_model):
    s = Server(served_model, "--max-context", str(CONTEXT), "--max-batch", "8")
    yield s
    s.stop(signal.SIGKILL)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base, api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def reference(served_model):
    from tokenizers import Tokenizer

    return load_reference(served_model), Tokenizer.from_file(str(served_model / "tokenizer.json"))


def ids_of(reference, text):
    return reference[1].encode(text, add_special_tokens=False).ids


def log_softmax(reference, ids):
    with torch.no_grad():
        return torch.log_softmax(reference[0](torch.tensor([ids])).logits[0].double(), dim=-1)


def raw(server, method, path, body=None, headers=None):
    """(status, headers, decoded JSON or text) of one plain HTTP request."""
    u = urlsplit(server.url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=60)
    data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
    conn.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
    r = conn.getresponse()
    text = r.read().decode()
    conn.close()
    try:
        return r.status, r.headers, json.loads(text)
    except ValueError:
        return r.status, r.headers, text


# ---- answers ------------------------------------------------------------------------------------------


def test_greedy_text_ids_and_logprobs_equal_transformers(client, reference):
    ids = ids_of(reference, PROMPT)
    with torch.no_grad():
        out = reference[0].generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False, eos_token_id=2, pad_token_id=0)
    expected = out[0, len(ids):].tolist()
    r = client.completions.create(model=_model(client), prompt=PROMPT, max_tokens=12, temperature=0, logprobs=3,
                                  extra_body={"return_token_ids": True, "return_tokens_as_token_ids": True})
    choice = r.choices[0]
    assert r.object == "text_completion" and r.id.startswith("cmpl-") and r.model == _model(client)
    assert choice.token_ids == expected and choice.prompt_token_ids == ids
    assert choice.text == reference[1].decode([t for t in expected if t != 2], skip_special_tokens=False)
    assert choice.finish_reason == ("stop" if expected[-1] == 2 else "length")
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == len(expected)
    lp = log_softmax(reference, ids + expected)
    for i, (name, value, top) in enumerate(zip(choice.logprobs.tokens, choice.logprobs.token_logprobs, choice.logprobs.top_logprobs)):
        row = lp[len(ids) - 1 + i]
        assert name == f"token_id:{expected[i]}" and abs(value - row[expected[i]].item()) < 1e-4
        values, idx = torch.topk(row, 3)
        assert [int(k.split(":")[1]) for k in top] == idx.tolist()


def _model(client):
    return client.models.list().data[0].id


def test_models_and_health(server, client, served_model):
    models = client.models.list().data
    assert [m.id for m in models] == [str(served_model)] and models[0].object == "model"
    assert raw(server, "GET", "/health")[0] == 200


def test_stream_is_the_same_text_in_pieces(client, reference):
    """UTF-8 safe: byte-fallback characters arrive whole, and the pieces add up to the ids' decode."""
    args = dict(model=_model(client), prompt="今天的天气 🌧️ 很", max_tokens=40, temperature=1.0, seed=4,
                extra_body={"ignore_eos": True, "return_token_ids": True})
    whole = client.completions.create(**args)
    pieces, finish = [], None
    for chunk in client.completions.create(stream=True, **args):
        for c in chunk.choices:
            pieces.append(c.text)
            finish = c.finish_reason or finish
    assert "\ufffd" not in "".join(pieces)
    assert "".join(pieces) == whole.choices[0].text == reference[1].decode(whole.choices[0].token_ids, skip_special_tokens=False)
    assert finish == "length" and len(pieces) > 5


def test_stream_usage_and_done(server):
    u = urlsplit(server.url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=60)
    body = {"prompt": PROMPT, "max_tokens": 3, "stream": True, "stream_options": {"include_usage": True}}
    conn.request("POST", "/v1/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
    r = conn.getresponse()
    assert r.status == 200 and r.getheader("content-type").startswith("text/event-stream")
    events = [line[6:] for line in r.read().decode().split("\n\n") if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    usage = json.loads(events[-2])
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 3


def test_stop_string_across_tokens(client, reference):
    base = client.completions.create(model=_model(client), prompt=PROMPT, max_tokens=24, temperature=0,
                                     extra_body={"ignore_eos": True, "return_token_ids": True})
    pieces = [reference[1].decode([t]) for t in base.choices[0].token_ids]
    full = "".join(pieces)
    for i in range(len(pieces) - 1):
        left, right = pieces[i], pieces[i + 1]
        stop = left[-2:] + right[:2]
        if len(left) >= 2 and len(right) >= 2 and full.find(stop) == len("".join(pieces[: i + 1])) - 2:
            break
    else:
        pytest.skip("no token pair long enough in this sample")
    for stream in (False, True):
        r = client.completions.create(model=_model(client), prompt=PROMPT, max_tokens=24, temperature=0, stop=["NEVER", stop],
                                      stream=stream, extra_body={"ignore_eos": True})
        chunks = list(r) if stream else [r]
        text = "".join(c.text for chunk in chunks for c in chunk.choices)
        last = [c for chunk in chunks for c in chunk.choices][-1]
        assert text == full[: full.find(stop)]
        assert last.finish_reason == "stop" and last.model_extra["stop_reason"] == stop


def test_echo_with_max_tokens_0_gives_prompt_logprobs(client, reference):
    """How lm-evaluation-harness scores loglikelihood: the first token's logprob is null."""
    prompt = "The quick brown fox jumps over the lazy dog"
    ids = ids_of(reference, prompt)
    r = client.completions.create(model=_model(client), prompt=prompt, max_tokens=0, echo=True, logprobs=2)
    choice = r.choices[0]
    assert choice.text == prompt and choice.finish_reason == "length" and r.usage.completion_tokens == 0
    lp = choice.logprobs
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None and len(lp.token_logprobs) == len(ids)
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
    expected = log_softmax(reference, ids)
    for i in range(1, len(ids)):
        assert abs(lp.token_logprobs[i] - expected[i - 1, ids[i]].item()) < 1e-4
        assert len(lp.top_logprobs[i]) == 2 and abs(max(lp.top_logprobs[i].values()) - expected[i - 1].max().item()) < 1e-4


def test_echo_of_token_ids_and_several_prompts(client, reference):
    prompts = [ids_of(reference, "Hello world"), ids_of(reference, "One two three four")]
    r = client.completions.create(model=_model(client), prompt=prompts, max_tokens=2, echo=True, logprobs=0, temperature=0)
    assert [c.index for c in r.choices] == [0, 1]
    for ids, choice in zip(prompts, r.choices):
        assert choice.text.startswith(reference[1].decode(ids))
        assert len(choice.logprobs.token_logprobs) == len(ids) + 2
        expected = log_softmax(reference, ids)
        assert abs(choice.logprobs.token_logprobs[len(ids) - 1] - expected[len(ids) - 2, ids[-1]].item()) < 1e-4


def test_n_and_seeds(client, reference):
    args = dict(model=_model(client), prompt=PROMPT, max_tokens=10, temperature=1.0, top_p=0.95, extra_body={"ignore_eos": True})
    many = client.completions.create(n=3, seed=7, **args)
    assert sorted(c.index for c in many.choices) == [0, 1, 2]
    texts = [c.text for c in sorted(many.choices, key=lambda c: c.index)]
    # choice j draws with seed + j: the same texts one by one
    assert texts == [client.completions.create(seed=7 + j, **args).choices[0].text for j in range(3)]
    assert len(set(texts)) > 1
    assert many.usage.completion_tokens == 3 * 10 and many.usage.prompt_tokens == len(ids_of(reference, PROMPT))  # the prompt counted once


# ---- errors --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("body, param", [
    ({"prompt": PROMPT, "temperature": "hot"}, "temperature"),
    ({"prompt": PROMPT, "temperature": -1}, "temperature"),
    ({"prompt": PROMPT, "top_p": 0}, "top_p"),
    ({"prompt": PROMPT, "max_tokens": -1}, "max_tokens"),
    ({"prompt": PROMPT, "max_tokens": 0}, "max_tokens"),
    ({"prompt": PROMPT, "max_tokens": True}, "max_tokens"),
    ({"prompt": PROMPT, "logprobs": 21}, "logprobs"),
    ({"prompt": PROMPT, "n": 0}, "n"),
    ({"prompt": PROMPT, "seed": -1}, "seed"),
    ({"prompt": PROMPT, "stop": [1, 2]}, "stop"),
    ({"prompt": PROMPT, "suffix": "!"}, "suffix"),
    ({"prompt": PROMPT, "best_of": 3, "n": 1}, "best_of"),
    ({"prompt": PROMPT, "logit_bias": {"1": 5}}, "logit_bias"),
    ({"prompt": PROMPT, "frobnicate": 1}, "frobnicate"),
    ({"prompt": []}, "prompt"),
    ({"prompt": [[1, 2], "x"]}, "prompt"),
    ({"prompt": [5, 10**9]}, "prompt"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": "word " * 400}, "prompt"),
    ({"prompt": list(range(3, 3 + CONTEXT))}, "prompt"),
    ({"max_tokens": 3}, "prompt"),
])
def test_bad_requests_are_400_with_openai_error_body(server, body, param):
    status, _, answer = raw(server, "POST", "/v1/completions", body)
    assert status == 400, answer
    error = answer["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    assert error["param"] == param and error["message"]


def test_bad_json_and_huge_body_are_400_and_the_server_goes_on(server, client):
    for body in (b"{not json", b"[1, 2]", b'{"prompt": "x", "temperature": NaN}'):
        status, _, answer = raw(server, "POST", "/v1/completions", body)
        assert status == 400 and answer["error"]["type"] == "invalid_request_error"
    huge = json.dumps({"prompt": "x" * (10 * 1024 * 1024 + 10)}).encode()
    status, _, answer = raw(server, "POST", "/v1/completions", huge)
    assert status == 400 and "limit" in answer["error"]["message"]
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=_model(client), prompt=PROMPT, best_of=2)
    assert info.value.status_code == 400 and info.value.body["param"] == "best_of"
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="some-other-model", prompt=PROMPT, max_tokens=1)
    assert raw(server, "GET", "/v1/nothing")[0] == 404
    assert client.completions.create(model=_model(client), prompt=PROMPT, max_tokens=2).choices[0].finish_reason


def test_max_tokens_past_the_context_is_cut_to_it(client):
    r = client.completions.create(model=_model(client), prompt=PROMPT, max_tokens=10_000, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert r.choices[0].finish_reason == "length" and r.usage.total_tokens == CONTEXT


# ---- security, limits, stopping ------------------------------------------------------------------------


def test_api_key(start_server):
    server = start_server(env=dict(ENV, ERNIE_API_KEY="sekrit"))
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "sekrit"}):
        status, _, answer = raw(server, "POST", "/v1/completions", {"prompt": PROMPT, "max_tokens": 1}, headers)
        assert status == 401 and answer["error"]["code"] == "invalid_api_key"
    assert raw(server, "GET", "/v1/models")[0] == 401
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.base, api_key="wrong", max_retries=0).completions.create(model="x", prompt="x", max_tokens=1)
    ok = openai.OpenAI(base_url=server.base, api_key="sekrit", max_retries=0)
    assert ok.completions.create(model=_model(ok), prompt=PROMPT, max_tokens=2).choices[0].text is not None
    assert "127.0.0.1" in server.url


def _stream(server, body):
    u = urlsplit(server.url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=60)
    conn.request("POST", "/v1/completions", body=json.dumps({**body, "stream": True}), headers={"Content-Type": "application/json"})
    return conn, conn.getresponse()


def _events(response):
    for line in response:
        line = line.decode().strip()
        if line.startswith("data: "):
            if line == "data: [DONE]":
                return
            yield json.loads(line[6:])


LONG = {"prompt": PROMPT, "max_tokens": 4000, "temperature": 0, "ignore_eos": True}  # seconds of decoding


def test_queue_bound_and_cancellation_free_the_slot(start_server):
    """One slot, one place in the queue: of two more requests one waits and one is a 503 with
    Retry-After; a client that disconnects mid-stream frees its slot, and the waiting one runs at once."""
    server = start_server("--max-batch", "1", "--max-queue", "1")
    first, stream = _stream(server, LONG)
    events = _events(stream)
    next(events)
    next(events)  # it runs, holding the only slot
    answers = []
    threads = [threading.Thread(target=lambda: answers.append(raw(server, "POST", "/v1/completions", {"prompt": PROMPT, "max_tokens": 2})))
               for _ in range(2)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 10
    while not answers and time.monotonic() < deadline:
        time.sleep(0.01)
    assert answers, "the refusal did not come at once"
    status, headers, answer = answers[0]
    assert status == 503 and headers.get("Retry-After") == "1" and answer["error"]["code"] == "queue_full"
    start = time.monotonic()
    first.close()  # the client goes away mid-stream
    for t in threads:
        t.join(30)
    assert answers[1][0] == 200 and time.monotonic() - start < 3  # not after the first's 4000 tokens


def test_sigterm_stops_cleanly_aborting_what_is_in_flight(start_server):
    server = start_server()
    conn, stream = _stream(server, LONG)
    events = _events(stream)
    next(events)
    start = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)
    rest = list(events)
    assert rest[-1]["choices"][0]["finish_reason"] == "abort"  # the grace period is shorter than 4000 tokens
    assert server.proc.wait(30) == 0 and time.monotonic() - start < 15
    time.sleep(0.1)
    assert "Traceback" not in server.stderr and server.stdout == b""
    with pytest.raises(OSError):
        raw(server, "GET", "/health")


def test_ctrl_c_when_idle_exits_0_at_once(start_server):
    server = start_server()
    assert raw(server, "GET", "/health")[0] == 200
    server.proc.send_signal(signal.SIGINT)
    assert server.proc.wait(10) == 0
    time.sleep(0.1)
    assert "Traceback" not in server.stderr and server.stderr.rstrip().endswith("stopped")


# ---- ernie complete --server -----------------------------------------------------------------------------


def ernie(*args, env=None, stdin=b""):
    return subprocess.run([sys.executable, "-m", "ernie_cli", "complete", *args], input=stdin, capture_output=True,
                          env=env or ENV, timeout=120)


def test_complete_through_the_server_prints_what_a_local_run_prints(server, served_model):
    local_args = ["-m", str(served_model), "--dtype", "float32", "--max-context", str(CONTEXT)]
    for args in (["-t", "0", "-n", "12", "--json", "--logprobs", "3", "-q", PROMPT], ["-s", "5", "-n", "20", "--echo", "-q", "今天 🌧️"]):
        remote = ernie("--server", server.url, "-m", str(served_model), *args)
        local = ernie(*local_args, *args)
        assert remote.returncode == local.returncode == 0, remote.stderr.decode() + local.stderr.decode()
        if "--json" in args:
            a, b = json.loads(remote.stdout), json.loads(local.stdout)
            for key in ("model", "prompt", "text", "prompt_tokens", "tokens", "finish_reason", "usage"):
                assert a[key] == b[key], key
            assert [e["id"] for e in a["logprobs"]] == [e["id"] for e in b["logprobs"]]
            assert max(abs(x["logprob"] - y["logprob"]) for x, y in zip(a["logprobs"], b["logprobs"])) < 1e-4
            assert [[t for t, _ in e["top"]] for e in a["logprobs"]] == [[t for t, _ in e["top"]] for e in b["logprobs"]]
            assert set(a["timings"]) == set(b["timings"])
        else:
            assert remote.stdout == local.stdout


def test_complete_through_the_server_exit_codes(server):
    env = dict(ENV, ERNIE_SERVER=server.url)
    assert ernie("-n", "2", "-q", "x" * 5000, env=env).returncode == 1  # beyond the context: the server's 400
    bad, local_bad = ernie("--top-p", "2", "-q", PROMPT, env=env), ernie("--top-p", "2", "-q", PROMPT)
    assert bad.returncode == local_bad.returncode == 2 and bad.stderr == local_bad.stderr
    gone = ernie("--server", "http://127.0.0.1:9", "-q", PROMPT)
    assert gone.returncode == 1 and gone.stderr.decode().startswith("error: cannot reach the server")


def test_complete_client_does_not_import_torch(server):
    code = ("import sys; from ernie_cli.cli import main\n"
            "try:\n    main(['complete', '--server', sys.argv[1], '-n', '1', '-q', 'hi'])\n"
            "except SystemExit as e:\n    assert e.code == 0, e.code\n"
            "print('torch' in sys.modules, file=sys.stderr)")
    proc = subprocess.run([sys.executable, "-c", code, server.url], capture_output=True, env=ENV, timeout=60)
    assert proc.returncode == 0 and proc.stderr.decode().strip().endswith("False"), proc.stderr.decode()
