"""The engine benchmark script runs end to end and ends with its JSON summary (figures are not judged here)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_bench_engine_prints_the_summary_keys():
    out = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench_engine.py"), "--requests", "6", "--rate", "50",
         "--steps", "5", "--rounds", "1", "--ratios", "0", "--sampling-steps", "1"],
        capture_output=True, text=True, timeout=300, check=True,
    )
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    for key in ("raw_tok_s", "engine_tok_s", "engine_over_raw", "insert_tok_s", "rebuild_tok_s",
                "insert_over_rebuild", "p99_ttft_ms_insert", "p99_ttft_ms_rebuild"):
        assert summary[key] > 0, key
    assert summary["host_sampling_ms"] and all(case["ours"] > 0 and case["transformers"] > 0
                                               for case in summary["host_sampling_ms"].values())
