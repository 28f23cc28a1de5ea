"""lm-evaluation-harness against `ernie serve`, checked against lm-evaluation-harness's own `hf` model.

Writes a tiny random ERNIE 4.5 MoE checkpoint (float32, the real tokenizer from ../shared) and a
small local loglikelihood task (no dataset download), starts `ernie serve` on it, and runs the task
twice through lm_eval's Python entry point (the same as `lm_eval --model ... --tasks ...`): once with
`local-completions` against the server (prompts sent as token ids, scored from `echo` + `logprobs`),
once with `hf` (transformers in float32). Each sample's loglikelihood must agree within 1e-3, and its
is-greedy flag exactly.

    pip install lm_eval
    python benchmarks/lm_eval_check.py [--work DIR] [--tokenizer ../shared/ernie-tokenizer]

Not run in CI (lm_eval and its dependencies are not test dependencies).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
TOLERANCE = 1e-3
DOCS = [
    ("The capital of France is", " Paris"), ("One, two, three,", " four"), ("The sun rises in the", " east"),
    ("Water boils at 100 degrees", " Celsius"), ("今天的天气", "很好"), ("She opened the door and", " walked in"),
    ("def add(a, b):\n    return", " a + b"), ("The quick brown fox jumps over the lazy", " dog"),
    ("Monday, Tuesday,", " Wednesday"), ("E = m c", "^2"), ("To be or not to be, that is the", " question"),
    ("Roses are red, violets are", " blue"), ("🌧️ It is raining, take an", " umbrella ☂️"), ("1 + 1 =", " 2"),
    ("The largest planet in the solar system is", " Jupiter"), ("Knowledge is", " power"),
]
TASK = """task: ernie_local_ll
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood
doc_to_text: "{{{{context}}}}"
doc_to_target: "{{{{continuation}}}}"
metric_list:
  - metric: perplexity
    aggregation: perplexity
    higher_is_better: false
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


def write_model(path: Path, tokenizer: Path) -> None:
    sys.path.insert(0, str(HERE.parent / "tests"))
    from tiny_models import write_checkpoint

    write_checkpoint(path, "moe", vocab_size=103424, hidden_size=32, num_attention_heads=2, num_key_value_heads=1,
                     max_position_embeddings=2048)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json"):
        shutil.copy(tokenizer / name, path / name)


def write_task(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / "data.jsonl"
    data.write_text("".join(json.dumps({"context": c, "continuation": t}, ensure_ascii=False) + "\n" for c, t in DOCS))
    (folder / "ernie_local_ll.yaml").write_text(TASK.format(data=data))


def start_server(model: Path) -> tuple[subprocess.Popen, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.Popen([sys.executable, "-m", "ernie_cli", "serve", "-m", str(model), "--port", "0", "--dtype", "float32"],
                            stderr=subprocess.PIPE, env=env)
    for raw in proc.stderr:
        line = raw.decode()
        sys.stderr.write(line)
        m = re.search(r"on (http://\S+)/v1 ", line)
        if m:
            return proc, m.group(1)
    raise SystemExit("error: the server did not start")


def loglikelihoods(model_name: str, model_args: str, tasks: Path) -> dict[int, tuple[float, bool]]:
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    out = simple_evaluate(model=model_name, model_args=model_args, tasks=["ernie_local_ll"],
                          task_manager=TaskManager(include_path=str(tasks)), log_samples=True, batch_size=4)
    return {s["doc_id"]: (float(s["resps"][0][0][0]), bool(s["resps"][0][0][1])) for s in out["samples"]["ernie_local_ll"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, help="folder for the model and the task (default: a temporary one)")
    ap.add_argument("--tokenizer", type=Path, default=HERE.parents[1] / "shared" / "ernie-tokenizer")
    args = ap.parse_args()
    os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    work = args.work or Path(tempfile.mkdtemp(prefix="ernie-lm-eval-"))
    model, tasks = work / "tiny-ernie", work / "tasks"
    if not (model / "config.json").is_file():
        write_model(model, args.tokenizer)
    write_task(tasks)
    proc, url = start_server(model)
    try:
        started = time.perf_counter()
        served = loglikelihoods("local-completions", f"model={model},base_url={url}/v1/completions,tokenizer={model},"
                                "tokenized_requests=True,num_concurrent=4,max_retries=1", tasks)
        served_s = time.perf_counter() - started
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(60)
    started = time.perf_counter()
    reference = loglikelihoods("hf", f"pretrained={model},dtype=float32,device=cpu", tasks)
    hf_s = time.perf_counter() - started

    worst = 0.0
    print("| doc | served ll | hf ll | diff | greedy (served / hf) |\n|---:|---:|---:|---:|---|")
    for doc in sorted(reference):
        (a, ga), (b, gb) = served[doc], reference[doc]
        worst = max(worst, abs(a - b))
        print(f"| {doc} | {a:.6f} | {b:.6f} | {abs(a - b):.2e} | {ga} / {gb} |")
    same_greedy = all(served[d][1] == reference[d][1] for d in reference)
    ok = set(served) == set(reference) and worst <= TOLERANCE and same_greedy and code == 0
    print(f"\n{len(reference)} samples; max |diff| {worst:.2e} (tolerance {TOLERANCE}); is-greedy equal: {same_greedy}; "
          f"server exit {code}; local-completions {served_s:.1f} s, hf {hf_s:.1f} s: {'PASS' if ok else 'FAIL'}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
