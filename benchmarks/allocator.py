"""Training speed and memory of NeuralMemory against two knobs: `recompute_chunks` and glibc's malloc thresholds.

    .venv/bin/python benchmarks/allocator.py            # 278 s on this 2-core machine, idle
    .venv/bin/python benchmarks/allocator.py --quick    # smoke pass, seconds (the test suite runs it)

Every (point, setting) runs in a fresh process: forward + backward of NeuralMemory (heads 4, depth 2,
hidden 2 * head_dim, batch 32, 2 threads, fp32), one untimed step, then the median of `--repeats`
steps; peak RSS (`ru_maxrss`) and minor page faults per step come from `getrusage`. Settings:

- default: glibc's defaults. Blocks over its mmap threshold (at most 32 MB) are mapped afresh on
  every allocation and unmapped on free, so every such tensor is paid again in page faults.
- recompute: `NeuralMemory(recompute_chunks=8)`, i.e. gradient checkpointing over groups of 8 chunks.
- malloc: `MALLOC_MMAP_THRESHOLD_` and `MALLOC_TRIM_THRESHOLD_` set to 4 GiB, so freed blocks are
  reused instead of returned to the OS (the process keeps its high-water memory).
- malloc + recompute: both.

Results: `benchmarks/results/allocator.json` (one record per point and setting).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(4 << 30), "MALLOC_TRIM_THRESHOLD_": str(4 << 30)}
SETTINGS = {  # name: (extra environment, recompute_chunks)
    "default": ({}, None),
    "recompute": ({}, 8),
    "malloc": (MALLOC_ENV, None),
    "malloc + recompute": (MALLOC_ENV, 8),
}
POINTS = [(256, 16, 2048), (256, 64, 2048), (64, 16, 2048), (64, 16, 512)]  # (dim, chunk, T)


def worker(dim: int, chunk: int, length: int, batch: int, recompute: int | None, repeats: int) -> dict:
    """Time forward + backward in this process; returns the measurements."""
    sys.path.insert(0, str(ROOT))
    import torch

    from titans_ts import NeuralMemory

    torch.manual_seed(0)
    memory = NeuralMemory(dim, heads=4, depth=2, hidden_mult=2.0, chunk_size=chunk, recompute_chunks=recompute)
    x = torch.randn(batch, length, dim, requires_grad=True)

    def step() -> None:
        y, _ = memory(x)
        y.square().mean().backward()

    step()
    faults_before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    wall, cpu = [], []
    for _ in range(repeats):
        w0, c0 = time.perf_counter(), time.process_time()
        step()
        wall.append(time.perf_counter() - w0)
        cpu.append(time.process_time() - c0)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {
        "ms": 1e3 * statistics.median(wall), "cpu_ms": 1e3 * statistics.median(cpu),
        "peak_rss_gb": usage.ru_maxrss / 2**20, "minor_faults_per_step": (usage.ru_minflt - faults_before) / repeats,
        "grad_norm": float(x.grad.norm()),
    }


def run_point(dim: int, chunk: int, length: int, batch: int, setting: str, repeats: int, threads: int) -> dict:
    extra_env, recompute = SETTINGS[setting]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), **extra_env)
    for name in set(MALLOC_ENV) - set(extra_env):
        env.pop(name, None)
    cmd = [sys.executable, __file__, "--worker", str(dim), str(chunk), str(length), str(batch), str(recompute or 0), str(repeats)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800, check=True)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"dim": dim, "chunk": chunk, "T": length, "batch": batch, "threads": threads, "setting": setting,
            "recompute_chunks": recompute, "malloc_env": extra_env, **result}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke pass: one tiny point, one step")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS / "allocator.json")
    parser.add_argument("--worker", nargs=6, type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        dim, chunk, length, batch, recompute, repeats = args.worker
        import torch

        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
        print(json.dumps(worker(dim, chunk, length, batch, recompute or None, repeats)))
        return
    points, batch, repeats = ([(16, 4, 24)], 2, 1) if args.quick else (POINTS, 32, args.repeats)
    started = time.perf_counter()
    records = []
    for dim, chunk, length in points:
        for setting in SETTINGS:
            record = run_point(dim, chunk, length, batch, setting, repeats, args.threads)
            records.append(record)
            print(f"dim {dim} chunk {chunk} T {length} {setting:>20}: {record['ms']:8.0f} ms  peak RSS "
                  f"{record['peak_rss_gb']:5.2f} GiB  {record['minor_faults_per_step']:10.0f} page faults/step", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"records": records, "seconds": round(time.perf_counter() - started, 1),
                                    "command": " ".join([Path(sys.executable).name, *sys.argv])}, indent=1))
    print(f"wrote {args.out} ({time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
