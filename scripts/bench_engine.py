#!/usr/bin/env python
"""Measure the engine on the built-in model at batch 8, all in one run, and print ratios.

1. raw: the backend's own static-batch decode loop (argmax fed back), the ceiling;
2. engine: the engine in decode steady state on the same batch (sampling, detokenizing, stopping);
3. insert vs rebuild: both insertion policies under the same Poisson arrival trace with mixed prompt
   and output lengths — throughput and time to first token;
4. the prefill policy knob (`waiting_served_ratio`) under that trace with `insert`;
5. host sampling at a 128k vocabulary (Llama 3's), batch 8: the engine's sampler against transformers'
   warpers and `torch.multinomial`, on the same logits (Zipf-shaped, as a language model's are).

Prints a table, then one JSON object as the last line.

    python scripts/bench_engine.py [--requests 48] [--rate 12] [--seed 0] [--sampling-steps 20]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from collections import deque
from dataclasses import dataclass

import torch
from tqdm import tqdm
from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from neuron_serve.config import Config
from neuron_serve.engine import Engine
from neuron_serve.loading import open_torch_backend
from neuron_serve.model_files import eos_token_ids, load_tokenizer, resolve_model_dir
from neuron_serve.request import GenerationRequest, SamplingParams, StoppingParams, TokenEvent
from neuron_serve.sampler import RequestSampler, choose
from neuron_serve.scheduler import InsertionPolicy, PrefillPolicy
from neuron_serve.tiny_model import corpus_path

from bench import percentile  # scripts/bench.py, beside this file

BATCH = 8
SAMPLING_VOCAB = 128_256  # Llama 3's
SAMPLING_CASES = {  # what TGI clients send most
    "temperature 0.7": SamplingParams(do_sample=True, temperature=0.7),
    "temperature 0.7, top_p 0.9": SamplingParams(do_sample=True, temperature=0.7, top_p=0.9),
    "top_p 0.95": SamplingParams(do_sample=True, top_p=0.95),
    "top_k 50, top_p 0.95": SamplingParams(do_sample=True, top_k=50, top_p=0.95),
}


def make_engine(config: Config, model_dir, tokenizer, insertion="insert", ratio=0.0, max_waiting=20) -> Engine:
    backend, limits = open_torch_backend(config, model_dir)
    return Engine(backend, tokenizer, limits, eos_token_ids(model_dir, tokenizer),
                  insertion=InsertionPolicy(insertion), prefill_policy=PrefillPolicy(ratio, max_waiting))


def prompts(tokenizer, n: int, rng: random.Random, lo: int, hi: int) -> list[list[int]]:
    corpus = tokenizer(corpus_path().read_text(encoding="utf-8"),
                       add_special_tokens=False).input_ids
    out = []
    for _ in range(n):
        length = rng.randint(lo, hi)
        start = rng.randrange(0, len(corpus) - length)
        out.append([tokenizer.bos_token_id] + corpus[start : start + length - 1])
    return out


def greedy(rid, ids, max_new) -> GenerationRequest:
    return GenerationRequest(str(rid), tuple(ids), SamplingParams(), StoppingParams(max_new, ignore_eos=True))


def bench_raw(engine: Engine, batch_prompts, steps: int) -> float:
    backend = engine.backend
    rows = list(range(BATCH))
    with torch.inference_mode():
        last = backend.prefill(rows, batch_prompts).logits.argmax(-1).tolist()
        positions = [len(p) for p in batch_prompts]
        start = time.perf_counter()
        for _ in tqdm(range(steps), desc="raw decode loop", file=sys.stderr, leave=False):
            last = backend.decode(rows, last, positions).argmax(-1).tolist()
            positions = [p + 1 for p in positions]
        elapsed = time.perf_counter() - start
    return BATCH * steps / elapsed


def bench_engine_steady(engine: Engine, batch_prompts, steps: int) -> float:
    for i, p in enumerate(batch_prompts):
        engine.submit(greedy(f"steady{i}", p, steps + 1))
    engine.step()  # the prefill: all 8 rows in one call
    assert len(engine.batch.active()) == BATCH
    tokens = 0
    start = time.perf_counter()
    for _ in tqdm(range(steps), desc="engine decode steady state", file=sys.stderr, leave=False):
        tokens += len(engine.step())
    elapsed = time.perf_counter() - start
    assert not engine.has_work
    return tokens / elapsed


@dataclass
class TraceResult:
    tok_s: float
    p50_ttft_ms: float
    p99_ttft_ms: float
    tokens: int
    seconds: float


def zipf_logits(rows: int, vocab: int, seed: int) -> torch.Tensor:
    """Logits whose k-th likeliest token has probability proportional to k^-1.1, the ranks shuffled per row."""
    generator = torch.Generator().manual_seed(seed)
    ranked = -1.1 * torch.log(torch.arange(1, vocab + 1, dtype=torch.float32))
    return torch.stack([ranked[torch.randperm(vocab, generator=generator)] for _ in range(rows)])


def transformers_warpers(p: SamplingParams) -> LogitsProcessorList:
    warpers = [TemperatureLogitsWarper(p.temperature)] if p.temperature != 1.0 else []
    warpers += [TopKLogitsWarper(p.top_k)] if p.top_k else []
    warpers += [TopPLogitsWarper(p.top_p)] if p.top_p < 1.0 else []
    return LogitsProcessorList(warpers)


def transformers_choose(logits: torch.Tensor, warpers: LogitsProcessorList, generators: list[torch.Generator]) -> list[int]:
    """What `generate()` does at each step: transformers' warpers, then torch.multinomial, row by row."""
    chosen = []
    for i, generator in enumerate(generators):
        scores = warpers(None, logits[i : i + 1].clone())
        chosen.append(int(torch.multinomial(torch.softmax(scores, dim=-1)[0], 1, generator=generator)))
    return chosen


def bench_host_sampling(steps: int, seed: int) -> dict[str, tuple[float, float]]:
    """ms per step of BATCH rows, (ours, transformers'), for each of SAMPLING_CASES."""
    logits = zipf_logits(BATCH, SAMPLING_VOCAB, seed)
    history = [list(range(64))] * BATCH
    timings = {}
    for name, params in SAMPLING_CASES.items():
        samplers = [RequestSampler(params) for _ in range(BATCH)]
        warpers = transformers_warpers(params)
        generators = [torch.Generator().manual_seed(seed + i) for i in range(BATCH)]
        ours = theirs = 0.0
        for _ in range(steps):  # in turns: the machine's speed drifts
            start = time.perf_counter()
            choose(logits, samplers, history)
            middle = time.perf_counter()
            transformers_choose(logits, warpers, generators)
            ours, theirs = ours + middle - start, theirs + time.perf_counter() - middle
        timings[name] = (ours / steps * 1000, theirs / steps * 1000)
    return timings


def run_trace(engine: Engine, trace: list[tuple[float, GenerationRequest]], label: str) -> TraceResult:
    pending = deque(trace)
    arrival = {req.id: t for t, req in trace}
    ttft: dict[str, float] = {}
    tokens = 0
    bar = tqdm(total=len(trace), desc=label, file=sys.stderr, leave=False)
    start = time.perf_counter()
    while pending or engine.has_work:
        now = time.perf_counter() - start
        while pending and pending[0][0] <= now:
            engine.submit(pending.popleft()[1])
        if not engine.has_work:
            time.sleep(max(0.0, pending[0][0] - now))
            continue
        for event in engine.step():
            assert isinstance(event, TokenEvent), event
            tokens += 1
            if event.index == 1:
                ttft[event.request_id] = time.perf_counter() - start - arrival[event.request_id]
            if event.finish:
                bar.update()
    elapsed = time.perf_counter() - start
    bar.close()
    values = list(ttft.values())
    return TraceResult(tokens / elapsed, 1000 * percentile(values, 50), 1000 * percentile(values, 99), tokens, elapsed)


def make_trace(tokenizer, n: int, rate: float, seed: int) -> list[tuple[float, GenerationRequest]]:
    rng = random.Random(seed)
    ps = prompts(tokenizer, n, rng, 16, 256)
    t, trace = 0.0, []
    for i, p in enumerate(ps):
        t += rng.expovariate(rate)
        trace.append((t, greedy(f"trace{i}", p, rng.randint(32, 256))))
    return trace


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=48, help="requests in the arrival trace")
    parser.add_argument("--rate", type=float, default=12.0, help="Poisson arrival rate, requests per second")
    parser.add_argument("--steps", type=int, default=300, help="decode steps for the raw and steady-state runs")
    parser.add_argument("--rounds", type=int, default=3, help="alternating raw/engine rounds (medians are reported)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ratios", default="0,0.5,1.2", help="waiting_served_ratio values to compare (insert)")
    parser.add_argument("--sampling-steps", type=int, default=20, help="steps timed per host sampling case")
    args = parser.parse_args()

    config = Config(max_batch_size=BATCH)
    model_dir = resolve_model_dir(config)
    tokenizer = load_tokenizer(model_dir)
    rng = random.Random(args.seed)
    batch_prompts = prompts(tokenizer, BATCH, rng, 32, 128)
    torch.manual_seed(args.seed)

    engine = make_engine(config, model_dir, tokenizer)
    bench_raw(engine, batch_prompts, 20)  # warm-up
    # Alternate the two, several rounds, and take medians: the machine's speed drifts.
    raws, steadies = [], []
    for _ in range(args.rounds):
        raws.append(bench_raw(engine, batch_prompts, args.steps))
        steadies.append(bench_engine_steady(engine, batch_prompts, args.steps))
    raw, steady = statistics.median(raws), statistics.median(steadies)

    trace = make_trace(tokenizer, args.requests, args.rate, args.seed)
    results = {
        "insert": run_trace(make_engine(config, model_dir, tokenizer, "insert"), trace, "trace, insert"),
        "rebuild": run_trace(make_engine(config, model_dir, tokenizer, "rebuild"), trace, "trace, rebuild"),
    }
    knob = {}
    for ratio in [float(r) for r in args.ratios.split(",")]:
        knob[ratio] = run_trace(make_engine(config, model_dir, tokenizer, "insert", ratio), trace,
                                f"trace, insert, waiting_served_ratio={ratio}")

    sampling = bench_host_sampling(args.sampling_steps, args.seed)

    print(f"model {config.model_id} ({engine.backend.description}), batch {BATCH}, "
          f"trace: {args.requests} requests at {args.rate}/s, prompts 16-256, outputs 32-256 tokens")
    print(f"{'run':42} {'tok/s':>9} {'p50 TTFT ms':>12} {'p99 TTFT ms':>12}")
    print(f"{'raw static-batch decode loop':42} {raw:9.1f}")
    print(f"{'engine, decode steady state':42} {steady:9.1f}")
    for name, r in results.items():
        print(f"{'trace, insertion=' + name:42} {r.tok_s:9.1f} {r.p50_ttft_ms:12.1f} {r.p99_ttft_ms:12.1f}")
    for ratio, r in knob.items():
        print(f"{'trace, insert, waiting_served_ratio=' + str(ratio):42} {r.tok_s:9.1f} {r.p50_ttft_ms:12.1f} {r.p99_ttft_ms:12.1f}")
    print(f"host sampling, batch {BATCH}, vocabulary {SAMPLING_VOCAB}: ms a step, ours and transformers' warpers")
    for name, (ours, theirs) in sampling.items():
        print(f"  {name:40} {ours:8.2f} {theirs:8.2f}   {theirs / ours:5.1f}x")
    summary = {
        "raw_tok_s": round(raw, 1),
        "engine_tok_s": round(steady, 1),
        "engine_over_raw": round(steady / raw, 3),
        "insert_tok_s": round(results["insert"].tok_s, 1),
        "rebuild_tok_s": round(results["rebuild"].tok_s, 1),
        "insert_over_rebuild": round(results["insert"].tok_s / results["rebuild"].tok_s, 3),
        "p99_ttft_ms_insert": round(results["insert"].p99_ttft_ms, 1),
        "p99_ttft_ms_rebuild": round(results["rebuild"].p99_ttft_ms, 1),
        "waiting_served_ratio": {str(k): {"tok_s": round(v.tok_s, 1), "p50_ttft_ms": round(v.p50_ttft_ms, 1),
                                          "p99_ttft_ms": round(v.p99_ttft_ms, 1)} for k, v in knob.items()},
        "host_sampling_ms": {k: {"ours": round(o, 2), "transformers": round(t, 2), "transformers_over_ours": round(t / o, 1)}
                             for k, (o, t) in sampling.items()},
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
