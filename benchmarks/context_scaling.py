"""Cost as the context grows: forward+backward time and peak memory of one MAC block, one LMM block
and one full-attention block of the same width, for T from 96 to 16,384 tokens.

    .venv/bin/python benchmarks/context_scaling.py            # full run, ~10-15 minutes on 2 cores
    .venv/bin/python benchmarks/context_scaling.py --quick --out /tmp/cs.json   # smoke pass, ~20 s
    python benchmarks/context_scaling.py --device cuda     # on a GPU: results/context_scaling_cuda.json, 175 s on an H200

On CUDA, time is measured between `torch.cuda.synchronize()` calls after one warm-up step, and peak
memory is `torch.cuda.max_memory_allocated()` over a step minus what was allocated before it (model,
input). At batch 1 the memory's chunk-by-chunk recurrence is a chain of small kernels, so on a GPU
its time is bound by kernel launches, linear in the number of chunks.

Each (model, T) point runs in a fresh subprocess (2 threads): time is the median of a few
forward+backward steps after a warm-up; peak memory is the growth of the process's peak RSS
(ru_maxrss) over its value just before the first step, so model and input are not counted.
The exponent k in time ~ T^k (and memory ~ T^k) is fitted by least squares on log-log over the
points with T >= 1024, where fixed per-call overheads no longer dominate. The memory variants
should grow linearly (k ~ 1), causal full attention quadratically in time (k ~ 2; torch's CPU
flash kernel keeps its memory linear).

Writes `benchmarks/results/context_scaling.json` (records: model, T, ms, peak_mb; then the fits)
and `context_scaling.png`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
MODELS = ("mac", "lmm", "attention")

WORKER = r"""
import json, resource, statistics, sys, time
import torch
torch.set_num_threads(2)
from titans_ts.layers import Attention, Block
from titans_ts.lmm import LMMBlock
from titans_ts.mac import MACBlock

class AttentionBlock(Block):
    def __init__(self, dim, heads):
        super().__init__(dim)
        self.attention = Attention(dim, heads)
    def mix(self, x, state):
        return self.attention(x, x), state          # causal full attention

model, T, dim, heads, chunk, repeats, device = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6]), sys.argv[7]
cuda = device == "cuda"
memory = dict(heads=heads, depth=2, chunk_size=chunk)
torch.manual_seed(0)
block = {"mac": lambda: MACBlock(dim, memory, heads=heads, segment_len=128, n_persistent=4),
         "lmm": lambda: LMMBlock(dim, memory),
         "attention": lambda: AttentionBlock(dim, heads)}[model]().to(device)
x = torch.randn(1, T, dim, device=device, requires_grad=True)
def step():
    y, _ = block(x)
    y.square().mean().backward()
    if cuda:
        torch.cuda.synchronize()
times = []
def timed_step():
    t0 = time.perf_counter(); step(); times.append(time.perf_counter() - t0)
if cuda:
    step()  # CUDA's first step loads kernels and fills the caching allocator: a warm-up, not timed
    block.zero_grad(set_to_none=True); x.grad = None
    torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    timed_step()
    peak_mb = (torch.cuda.max_memory_allocated() - before) / 2**20
    repeats -= 1
else:
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    step()
    peak_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
for _ in range(repeats):
    timed_step()
print(json.dumps({"ms": 1000 * statistics.median(times), "peak_mb": peak_mb}))
"""


def run_point(model: str, length: int, args: argparse.Namespace) -> dict:
    repeats = 1 if args.quick or (length >= 8192 and args.device == "cpu") else 3
    cmd = [sys.executable, "-c", WORKER, model, str(length), str(args.dim), str(args.heads), str(args.chunk), str(repeats),
           args.device]
    env = {**os.environ, "OMP_NUM_THREADS": "2", "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])} if args.device == "cuda" else \
        {"OMP_NUM_THREADS": "2", "PATH": "/usr/bin:/bin"}
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"{model} at T={length} failed:\n{out.stderr[-2000:]}")
    return {"model": model, "T": length, "dim": args.dim, "device": args.device, **json.loads(out.stdout)}


def fit_exponent(points: list[dict], key: str, min_length: int) -> float | None:
    pts = [(math.log(p["T"]), math.log(p[key])) for p in points if p["T"] >= min_length and p[key] > 0]
    if len(pts) < 2:
        return None
    mx = sum(x for x, _ in pts) / len(pts)
    my = sum(y for _, y in pts) / len(pts)
    return sum((x - mx) * (y - my) for x, y in pts) / sum((x - mx) ** 2 for x, _ in pts)


def device_info(device: str) -> dict:
    """What the figures were measured on: the GPU's name and torch/CUDA versions (empty on CPU)."""
    if device != "cuda":
        return {}
    probe = "import json, torch; print(json.dumps({'gpu': torch.cuda.get_device_name(), 'torch': torch.__version__, 'cuda': torch.version.cuda}))"
    return json.loads(subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout)


def plot(records: list[dict], path: Path, device: str = "cpu") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for model in MODELS:
        pts = [r for r in records if r["model"] == model]
        for ax, key in zip(axes, ("ms", "peak_mb")):
            ax.loglog([p["T"] for p in pts], [max(p[key], 1e-3) for p in pts], "o-", label=model)
    axes[0].set(xlabel="tokens T", ylabel="forward+backward ms", title="time")
    axes[1].set(xlabel="tokens T", ylabel="peak memory growth (MB)", title="memory")
    if device != "cpu":
        fig.suptitle(device)
    for ax in axes:
        ax.legend()
        ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke pass: T in {96, 256}")
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--chunk", type=int, default=16)
    parser.add_argument("--timeout", type=float, default=600)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--out", type=Path, default=None, help="default: results/context_scaling[_cuda].json")
    args = parser.parse_args()
    if args.out is None:
        args.out = RESULTS / ("context_scaling.json" if args.device == "cpu" else "context_scaling_cuda.json")
    lengths = [96, 256] if args.quick else [96, 256, 1024, 2048, 4096, 8192, 16384]
    started = time.time()
    records = []
    for length in lengths:
        for model in MODELS:
            records.append(run_point(model, length, args))
            print(f"{model:>9} T={length:>6}: {records[-1]['ms']:9.1f} ms  {records[-1]['peak_mb']:8.1f} MB", flush=True)
    min_length = 96 if args.quick else 1024
    fits = {
        model: {key: fit_exponent([r for r in records if r["model"] == model], key, min_length) for key in ("ms", "peak_mb")}
        for model in MODELS
    }
    for model, fit in fits.items():
        print(f"{model:>9}: time ~ T^{fit['ms']:.2f}, memory ~ T^{fit['peak_mb'] or float('nan'):.2f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    summary = {"records": records, "exponents": fits, "fit_min_T": min_length, "seconds": round(time.time() - started, 1),
               "settings": {"dim": args.dim, "heads": args.heads, "chunk": args.chunk, "batch": 1, "threads": 2,
                            "device": args.device, **device_info(args.device)}}
    args.out.write_text(json.dumps(summary, indent=2))
    plot(records, args.out.with_suffix(".png"), args.device)
    print(f"wrote {args.out} and {args.out.with_suffix('.png')} in {summary['seconds']} s")


if __name__ == "__main__":
    main()
