"""Throughput and latency of `ernie serve` at several concurrencies.

Each level runs CONCURRENCY clients at once, each streaming one completion of -n tokens from a
prompt of -p random token ids (temperature 0, the end-of-text token ignored), ROUNDS times. Reported
per level: aggregate decode tok/s (all generated tokens / the level's wall time), time to first
token p50/p99, inter-token latency p50/p99 (gaps between a stream's token chunks), and the
aggregate against the concurrency-1 row of the same run.

Against a running server:        python benchmarks/serve_bench.py --url http://127.0.0.1:8000 -c 1,8,64
Random weights, served in-process (the same app, scheduler and engine on a loopback port):
    python benchmarks/serve_bench.py --config benchmarks/configs/ERNIE-4.5-21B-A3B-Base-PT.json --layers 8 \\
        --quantize int4 --tokenizer ../shared/ernie-tokenizer -c 1,4 -p 128 -n 64
"""

from __future__ import annotations

import argparse
import http.client
import json
import multiprocessing
import random
import sys
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q / 100 * (len(s) - 1))))]


def stream_one(url: str, prompt: list[int], n: int, key: str | None) -> tuple[float, list[float], int]:
    """(time to first token, inter-token gaps, tokens) of one streamed completion."""
    u = urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=3600)
    body = {"prompt": prompt, "max_tokens": n, "temperature": 0, "ignore_eos": True, "stream": True, "return_token_ids": True}
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    start = time.perf_counter()
    conn.request("POST", "/v1/completions", body=json.dumps(body), headers=headers)
    r = conn.getresponse()
    if r.status != 200:
        raise SystemExit(f"error: the server answered {r.status}: {r.read()[:300]!r}")
    first, last, gaps, tokens = None, None, [], 0
    for line in r:
        line = line.strip()
        if not line.startswith(b"data: ") or line == b"data: [DONE]":
            continue
        chunk = json.loads(line[6:])
        got = sum(len(c.get("token_ids") or []) for c in chunk["choices"])
        if not got:
            continue
        now = time.perf_counter()
        if first is None:
            first = now - start
        else:
            gaps.extend([(now - last) / got] * got)
        last, tokens = now, tokens + got
    conn.close()
    return first or float("nan"), gaps, tokens


def run_level(url: str, concurrency: int, rounds: int, p: int, n: int, vocab: int, key: str | None) -> dict:
    rng = random.Random(concurrency)
    ttft, itl, tokens, errors = [], [], 0, []
    lock = threading.Lock()

    def client(i: int) -> None:
        nonlocal tokens
        try:
            for _ in range(rounds):
                prompt = [rng.randrange(1000, vocab) for _ in range(p)]
                first, gaps, count = stream_one(url, prompt, n, key)
                with lock:
                    ttft.append(first)
                    itl.extend(gaps)
                    tokens += count
        except BaseException as exc:  # noqa: BLE001 - reported after the level
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(concurrency)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    if errors:
        raise errors[0]
    return {"concurrency": concurrency, "requests": concurrency * rounds, "tokens": tokens, "wall_s": wall, "tok_s": tokens / wall,
            "ttft_p50_ms": 1000 * percentile(ttft, 50), "ttft_p99_ms": 1000 * percentile(ttft, 99),
            "itl_p50_ms": 1000 * percentile(itl, 50), "itl_p99_ms": 1000 * percentile(itl, 99)}


def levels(url: str, args, vocab: int) -> list[dict]:
    """One warm-up request, then each concurrency level in turn."""
    stream_one(url, [1000] * args.prompt, args.warmup, args.api_key)
    return [run_level(url, c, args.rounds, args.prompt, args.gen, vocab, args.api_key) for c in args.concurrency]


def serve_random(args) -> tuple[str, int, str, object]:
    """Random weights of --config served in-process on a free loopback port: (url, vocab, what,
    state). The caller runs state.scheduler on its main thread, as `ernie serve` does."""
    import torch

    from ernie_cli.model.config import parse_config
    from ernie_cli.quant.spec import QuantSpec
    from ernie_cli.serve import server
    from ernie_cli.text.tokenizer import load_tokenizer
    from ernie_cli.runtime.decoder import step_mode
    from ernie_cli.weights.loader import prepare_for_decoding, random_model, resolve_device, resolve_dtype

    raw = json.loads(Path(args.config).read_text())
    cfg = parse_config(raw)
    if args.layers:
        cfg = cfg.replace(num_hidden_layers=args.layers, moe_layer_end_index=min(cfg.moe_layer_end_index, args.layers - 1))
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, cfg, device)
    spec = QuantSpec.make(args.quantize) if args.quantize else None
    started = time.perf_counter()
    model = prepare_for_decoding(random_model(cfg, device, dtype, quantize=spec), step_mode("auto", device))  # as `ernie serve` loads
    print(f"built {cfg.num_hidden_layers} layers of {Path(args.config).name} ({args.quantize or dtype}) in "
          f"{time.perf_counter() - started:.0f} s", file=sys.stderr)
    tokenizer = load_tokenizer(Path(args.tokenizer))
    name = f"{Path(args.config).stem} random, {cfg.num_hidden_layers} layers, {args.quantize or str(dtype).removeprefix('torch.')}"
    opts = server.Options(name, Path("."), max_batch=max(args.concurrency), max_context=args.prompt + args.gen + 16,
                          max_queue=4 * max(args.concurrency))
    state = server.make_state(model, tokenizer, opts, frozenset({name}), {}, frozenset({tokenizer.eos_token_id}))
    sock = server.listen("127.0.0.1", 0)
    uv = server.uvicorn_server(state)
    server.serve_in_thread(uv, state.scheduler, sock)
    while not uv.started:
        time.sleep(0.05)
    what = f"{name}, torch threads {torch.get_num_threads()}"
    return f"http://127.0.0.1:{sock.getsockname()[1]}", cfg.vocab_size, what, state


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", help="a running server")
    ap.add_argument("--config", help="serve random weights of this config.json in-process instead")
    ap.add_argument("--layers", type=int)
    ap.add_argument("--quantize", choices=["int8", "int4"])
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--tokenizer", default=str(Path(__file__).resolve().parents[2] / "shared" / "ernie-tokenizer"))
    ap.add_argument("-c", "--concurrency", default="1,8,64", type=lambda s: [int(x) for x in s.split(",")])
    ap.add_argument("-p", "--prompt", type=int, default=128, help="prompt tokens")
    ap.add_argument("-n", "--gen", type=int, default=256, help="new tokens per request")
    ap.add_argument("-r", "--rounds", type=int, default=1, help="requests per client per level")
    ap.add_argument("--warmup", type=int, default=8, help="tokens of one warm-up request before the levels")
    ap.add_argument("--api-key")
    args = ap.parse_args()
    if (args.url is None) == (args.config is None):
        raise SystemExit("error: pass exactly one of --url or --config.")
    if args.url:
        url, what = args.url.rstrip("/").removesuffix("/v1"), args.url
        u = urlsplit(url)
        conn = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
        conn.request("GET", "/v1/models", headers={"Authorization": f"Bearer {args.api_key}"} if args.api_key else {})
        what = json.loads(conn.getresponse().read())["data"][0]["id"]
        vocab, state = 100_000, None
    else:
        url, vocab, what, state = serve_random(args)
    if state is None:
        rows = levels(url, args, vocab)
    else:
        # The engine on the main thread, as `ernie serve` runs it; the clients in a process of their
        # own, as a harness would be: as threads here they took the engine's GIL at every token.
        with multiprocessing.get_context("spawn").Pool(1) as pool:
            result = pool.apply_async(levels, (url, args, vocab))
            threading.Thread(target=lambda: (result.wait(), state.scheduler.stop(0)), daemon=True).start()
            state.scheduler.run()
            rows = result.get()
    base = next((r["tok_s"] for r in rows if r["concurrency"] == 1), None)
    print(f"{what}; prompt {args.prompt}, {args.gen} new tokens per request, {args.rounds} round(s)\n")
    print("| concurrency | requests | aggregate tok/s | vs 1 | TTFT p50 ms | TTFT p99 ms | ITL p50 ms | ITL p99 ms |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        ratio = f"{r['tok_s'] / base:.2f}x" if base else "-"
        print(f"| {r['concurrency']} | {r['requests']} | {r['tok_s']:.2f} | {ratio} | {r['ttft_p50_ms']:.0f} | {r['ttft_p99_ms']:.0f} "
              f"| {r['itl_p50_ms']:.1f} | {r['itl_p99_ms']:.1f} |")


if __name__ == "__main__":
    main()
