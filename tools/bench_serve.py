"""Serving benchmark for models deployed with ``fp-export deploy`` (any running Triton server).

For each model and each concurrency level (default 1, 8, 32), C client threads each hold a gRPC
stream to the generation model and send requests back to back: one random prompt of
``--prompt-len`` token ids (fixed seed) and ``max_tokens`` = ``--max-tokens``, greedy. Measured
per request: latency from send to the final response and, with ``--stream``, time to the first
token. Per level: requests/s and generated tokens/s over the level's wall time, p50/p99 latency.
Each level runs ``--repeats`` times; the report gives the median and the min..max spread. With
several ``--model``s the first is the baseline and the others get ratios measured in the same run.

    python tools/bench_serve.py --url 127.0.0.1:8001 --model w4a8 --model bf16 \
        --device "NVIDIA H100 80GB HBM3" --out benchmarks/serve_h100

writes ``<out>.json`` and ``<out>.md``.
"""

from __future__ import annotations

import argparse
import json
import platform
import queue
import statistics
import subprocess
import threading
import time
from pathlib import Path

import numpy as np


def one_client(url: str, model: str, prompts: list[list[int]], max_tokens: int, stream: bool, timeout: float) -> list[dict]:
    """Send ``prompts`` one after another on one gRPC stream; per request latency, ttft, tokens."""
    import tritonclient.grpc as tg

    q: queue.Queue = queue.Queue()
    client = tg.InferenceServerClient(url)
    client.start_stream(callback=lambda result, error: q.put((result, error, time.perf_counter())))
    out = []
    try:
        for p in prompts:
            ids = np.array([p], dtype=np.int64)
            ins = [tg.InferInput("input_ids", list(ids.shape), "INT64"), tg.InferInput("max_tokens", [1, 1], "INT32"),
                   tg.InferInput("stream", [1, 1], "BOOL")]
            ins[0].set_data_from_numpy(ids)
            ins[1].set_data_from_numpy(np.array([[max_tokens]], dtype=np.int32))
            ins[2].set_data_from_numpy(np.array([[stream]], dtype=bool))
            t0 = time.perf_counter()
            client.async_stream_infer(model, ins, enable_empty_final_response=True)
            first, tokens = None, 0
            while True:
                result, error, t = q.get(timeout=timeout)
                if error is not None:
                    raise RuntimeError(f"{model}: request failed: {error}")
                ids_out = result.as_numpy("output_ids")
                if ids_out is not None and ids_out.size:
                    tokens += ids_out.shape[-1]
                    first = first if first is not None else t - t0
                if result.get_response().parameters["triton_final_response"].bool_param:
                    out.append({"latency_s": t - t0, "ttft_s": first, "tokens": tokens})
                    break
    finally:
        client.stop_stream()
        client.close()
    return out


def run_level(url: str, model: str, concurrency: int, requests_per_client: int, prompt_len: int, vocab: int,
              max_tokens: int, stream: bool, seed: int, timeout: float) -> dict:
    rng = np.random.default_rng(seed)
    prompts = rng.integers(0, vocab, size=(concurrency, requests_per_client, prompt_len)).tolist()
    results: list[list[dict]] = [[] for _ in range(concurrency)]
    errors: list[BaseException] = []

    def work(c: int) -> None:
        try:
            results[c] = one_client(url, model, prompts[c], max_tokens, stream, timeout)
        except BaseException as e:  # reported after join
            errors.append(e)

    threads = [threading.Thread(target=work, args=(c,)) for c in range(concurrency)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if errors:
        raise errors[0]
    reqs = [r for rs in results for r in rs]
    lat = np.array([r["latency_s"] for r in reqs])
    ttft = [r["ttft_s"] for r in reqs if r["ttft_s"] is not None]
    return {"requests": len(reqs), "wall_s": wall, "requests_per_s": len(reqs) / wall,
            "tokens_per_s": sum(r["tokens"] for r in reqs) / wall,
            "p50_ms": float(np.percentile(lat, 50) * 1e3), "p99_ms": float(np.percentile(lat, 99) * 1e3),
            "ttft_p50_ms": float(np.percentile(ttft, 50) * 1e3) if stream and ttft else None}


def server_counts(url: str, model: str) -> tuple[int, int]:
    """Triton's statistics of ``model`` so far: (requests executed, model executions); their
    difference over a level gives the mean batch size the server's dynamic batcher formed."""
    import tritonclient.grpc as tg

    client = tg.InferenceServerClient(url)
    try:
        st = client.get_inference_statistics(model).model_stats[0]
    finally:
        client.close()
    return st.inference_count, st.execution_count


def summarize(runs: list[dict]) -> dict:
    keys = ["requests_per_s", "tokens_per_s", "p50_ms", "p99_ms", "ttft_p50_ms"]
    out = {}
    for k in keys:
        vals = [r[k] for r in runs if r[k] is not None]
        if vals:
            out[k] = {"median": statistics.median(vals), "min": min(vals), "max": max(vals)}
    return out


def device_name(given: str | None) -> str:
    if given:
        return given
    try:
        r = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                           text=True, timeout=10)
        if r.returncode == 0 and r.stdout.strip():
            return r.stdout.strip().splitlines()[0] + " (local nvidia-smi; the server's GPU if it runs here)"
    except (OSError, subprocess.SubprocessError):
        pass
    return f"unspecified ({platform.processor() or platform.machine()}; pass --device)"


def markdown(report: dict) -> str:
    a = report["args"]
    lines = [f"# Triton serving benchmark ({report['device']})", "",
             f"Server {report['server']}; prompt {a['prompt_len']} random token ids, {a['max_tokens']} generated "
             f"tokens (greedy), {a['requests_per_client']} requests per client, stream={a['stream']}; "
             f"median of {a['repeats']} runs with [min..max].", "",
             f"Ratios: each model's median over the baseline's ({report['models'][0]}) median at the same concurrency "
             "(tokens/s: higher is better; latency: lower is better).", "",
             "| model | concurrency | requests/s | tokens/s | p50 ms | p99 ms | first token p50 ms | tokens/s vs baseline "
             "| p50 vs baseline | p99 vs baseline | mean server batch |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    base = report["models"][0]
    for m in report["models"]:
        for c, s in report["results"][m].items():
            def cell(k):
                v = s.get(k)
                return f"{v['median']:.1f} [{v['min']:.1f}..{v['max']:.1f}]" if v else "-"
            def ratio(k):
                return f"{s[k]['median'] / report['results'][base][c][k]['median']:.2f}x"
            batch = f"{s['mean_server_batch']:.1f}" if "mean_server_batch" in s else "-"
            lines.append(f"| {m} | {c} | {cell('requests_per_s')} | {cell('tokens_per_s')} | {cell('p50_ms')} | "
                         f"{cell('p99_ms')} | {cell('ttft_p50_ms')} | {ratio('tokens_per_s')} | {ratio('p50_ms')} | "
                         f"{ratio('p99_ms')} | {batch} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", default="127.0.0.1:8001", help="gRPC endpoint host:port")
    ap.add_argument("--model", action="append", required=True, help="generation model name (first = baseline)")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--requests-per-client", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--vocab", type=int, default=1000, help="prompt ids are drawn from [0, vocab)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=2, help="requests per model before measuring")
    ap.add_argument("--stream", action="store_true", help="one response per token (measures time to first token)")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for any one response")
    ap.add_argument("--device", default=None, help="what the server runs on, for the report")
    ap.add_argument("--out", type=Path, required=True, help="writes <out>.json and <out>.md")
    a = ap.parse_args(argv)
    if len(set(a.model)) != len(a.model):
        ap.error(f"--model names repeat ({', '.join(a.model)}): give each model once")
    import tritonclient.grpc as tg

    client = tg.InferenceServerClient(a.url)
    meta = client.get_server_metadata()
    for m in a.model:
        if not client.is_model_ready(m):
            raise SystemExit(f"error: model {m!r} is not ready on {a.url}")
    client.close()
    results: dict = {}
    for m in a.model:
        run_level(a.url, m, 1, a.warmup, a.prompt_len, a.vocab, a.max_tokens, a.stream, 999, a.timeout)
        results[m] = {}
        for c in a.concurrency:
            before = server_counts(a.url, m)
            runs = [run_level(a.url, m, c, a.requests_per_client, a.prompt_len, a.vocab, a.max_tokens, a.stream,
                              1000 * r + c, a.timeout) for r in range(a.repeats)]
            after = server_counts(a.url, m)
            inferences, executions = after[0] - before[0], after[1] - before[1]
            results[m][str(c)] = summarize(runs) | {"runs": runs, "server_inferences": inferences,
                                                    "server_executions": executions,
                                                    "mean_server_batch": inferences / max(executions, 1)}
            s = results[m][str(c)]
            print(f"{m} c={c}: {s['tokens_per_s']['median']:.1f} tok/s, p50 {s['p50_ms']['median']:.1f} ms, "
                  f"p99 {s['p99_ms']['median']:.1f} ms, mean server batch {s['mean_server_batch']:.1f}", flush=True)
    report = {"device": device_name(a.device), "server": f"{meta.name} {meta.version}", "models": a.model,
              "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(a).items()}, "results": results}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{a.out}.json").write_text(json.dumps(report, indent=2) + "\n")
    Path(f"{a.out}.md").write_text(markdown(report))
    return report


if __name__ == "__main__":
    main()
