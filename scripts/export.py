#!/usr/bin/env python
"""Compile a hub or local model for Inferentia2 into a directory (`/data/<name>`), ready to serve.

    python scripts/export.py meta-llama/Meta-Llama-3-8B-Instruct --batch-size 4 --sequence-length 4096 \\
        --num-cores 2 --dtype bf16 --out /data/llama3-8b-b4-s4096-tp2

Runs optimum-neuron's export (the Neuron model cache on the hub is used when it has the artifacts),
saves the compiled model with its tokenizer, and prints its neuron config and the `serve_config.yaml`
args that serve it. It needs an inf2/trn1 host with the Neuron SDK and says so clearly elsewhere.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path

from neuron_serve.backends.neuron import neuron_model_class
from neuron_serve.backends.neuron_models import DTYPES, ExportPlan, export_model

SUMMARY_FIELDS = ("batch_size", "sequence_length", "max_context_length", "tp_degree", "torch_dtype",
                  "continuous_batching", "on_device_sampling", "target")


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="hub id or local directory of a standard (not yet compiled) model")
    parser.add_argument("--batch-size", type=int, default=1, help="static batch (rows of the KV cache)")
    parser.add_argument("--sequence-length", type=int, default=4096, help="tokens per row, prompt + generated")
    parser.add_argument("--num-cores", type=int, default=2, help="NeuronCores (tensor-parallel degree)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--revision", default=None)
    parser.add_argument("--token", default=None, help="HF token for gated models (default: HF_TOKEN)")
    parser.add_argument("--out", required=True, help="directory to write the compiled model to, e.g. /data/<name>")
    return parser.parse_args(argv)


def with_progress(label: str, work):
    """Run `work()` while printing the elapsed time: compiling a large model takes tens of minutes."""
    done = threading.Event()
    start = time.monotonic()

    def tick():
        while not done.wait(5.0):
            print(f"  {label}: {time.monotonic() - start:.0f}s elapsed", file=sys.stderr, flush=True)

    ticker = threading.Thread(target=tick, daemon=True)
    ticker.start()
    try:
        return work()
    finally:
        done.set()
        print(f"  {label}: done in {time.monotonic() - start:.0f}s", file=sys.stderr, flush=True)


def main(argv=None, model_class=None) -> int:
    args = parse_args(argv)
    if model_class is None:
        try:
            model_class = neuron_model_class()
        except ImportError as e:
            print(f"export.py: cannot compile here: {e}", file=sys.stderr)
            return 2
    plan = ExportPlan(args.model, args.batch_size, args.sequence_length, args.num_cores, DTYPES[args.dtype])
    print(f"compiling {plan.model_id}: batch {plan.batch_size} x {plan.sequence_length} tokens, "
          f"{plan.num_cores} cores, {plan.dtype}", file=sys.stderr)
    model = with_progress("export", lambda: export_model(model_class, plan, token=args.token, revision=args.revision))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with_progress("save", lambda: model.save_pretrained(str(out)))
    from transformers import AutoTokenizer, GenerationConfig

    AutoTokenizer.from_pretrained(args.model, token=args.token, revision=args.revision).save_pretrained(str(out))
    try:  # its end-of-sequence ids, which the server stops at (from the hub as from a folder)
        GenerationConfig.from_pretrained(args.model, token=args.token, revision=args.revision).save_pretrained(str(out))
    except OSError:  # the model has none
        pass

    nc = json.loads((out / "neuron_config.json").read_text())
    print(f"\nwrote {out}")
    for field in SUMMARY_FIELDS:
        print(f"  {field:22} {nc.get(field)}")
    print("\nserve it with these serve_config.yaml args:")
    print(f"  model_id: {out}\n  backend: neuron\n  cores_per_replica: {nc['tp_degree']}\n"
          f"  max_batch_size: {nc['batch_size']}\n  max_total_tokens: {nc['sequence_length']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
