"""Smoke passes of the benchmark scripts (`--quick`): they run and write what they promise."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_script(name: str, *args: str) -> None:
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / name), "--quick", *args], check=True, cwd=ROOT, timeout=600)


def test_memory_speed_quick(tmp_path):
    out = tmp_path / "memory_speed.json"
    run_script("memory_speed.py", "--no-peer", "--out", str(out))
    records = json.loads(out.read_text())
    assert records and all(r["ours_ms"] > 0 for r in records)
    assert {"dim", "chunk", "batch", "T", "ours_ms", "peer_ms", "speedup"} <= set(records[0])


def test_context_scaling_quick(tmp_path):
    out = tmp_path / "context_scaling.json"
    run_script("context_scaling.py", "--out", str(out))
    summary = json.loads(out.read_text())
    assert {r["model"] for r in summary["records"]} == {"mac", "lmm", "attention"}
    assert out.with_suffix(".png").exists()
