"""Training-step time of the shipped model configs, optionally side by side with another checkout.

    .venv/bin/python benchmarks/train_step.py                           # this checkout, ~2 min here
    .venv/bin/python benchmarks/train_step.py --compare /tmp/oldwt      # against another checkout, ~4 min
    .venv/bin/python benchmarks/train_step.py --quick --out /tmp/ts.json  # smoke pass (the test suite runs it)

One step is what a training batch costs without data loading or the Lightning loop: the network's
forward on a batch of random windows, the MSE loss, backward and an AdamW step. The model is built
by `TitansForecastingModule` from `configs/model/<model>.yaml` of the checkout being timed (ETTh
shape: 7 channels, L=96, H=96, batch 32 unless overridden), so each checkout times its own shipped
configuration. Every (checkout, model, round) runs in a fresh process with `--threads` torch threads;
rounds alternate between the checkouts, so load from other jobs falls on both alike. Per step the
minimum over `--steps` timed steps (after 3 untimed) is kept; per model and checkout the median of
the rounds' minima, and with `--compare` the ratio compare / this (above 1: this checkout is faster).
Each record also has `memory_update_ms`, the time the fastest step spent in the memory update's
chunk kernels (`_chunk_forward` and `_chunk_backward` of `titans_ts.memory_ops`, timed by wrapping
them), and the summary this checkout's median share of the step.

Results: `benchmarks/results/train_step.json` (settings, one record per process, the summary).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
MODELS = ("mac", "mag", "mal", "lmm", "patchtst", "dlinear")


def worker(cfg: dict) -> dict:
    """Time training steps of one model of the checkout at cfg["code"]; returns the measurements."""
    sys.path.insert(0, cfg["code"])
    import torch
    import yaml

    from forecasters.module import TitansForecastingModule

    torch.set_num_threads(cfg["threads"])
    torch.manual_seed(0)
    hparams = yaml.safe_load((Path(cfg["code"]) / "configs" / "model" / f"{cfg['model']}.yaml").read_text())
    module = TitansForecastingModule(n_channels=7, lookback=cfg["lookback"], horizon=cfg["horizon"], **hparams)
    module.train()
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-4)
    x, y = torch.randn(cfg["batch"], cfg["lookback"], 7), torch.randn(cfg["batch"], cfg["horizon"], 7)

    def step() -> None:
        loss = (module.model(x)[0].squeeze(-1) - y).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    # compiled chunk kernels are the wrapped functions' compiled copies: not timed
    compiled = any(getattr(m, "compile_chunks", False) for m in module.modules())
    in_memory = None if compiled else _time_memory_update()
    for _ in range(3):
        step()
    times, memory_times = [], []
    for _ in range(cfg["steps"]):
        if in_memory:
            in_memory[0] = 0.0
        start = time.perf_counter()
        step()
        times.append(1e3 * (time.perf_counter() - start))
        if in_memory:
            memory_times.append(1e3 * in_memory[0])
    best = times.index(min(times))
    return {"min_ms": min(times), "median_ms": statistics.median(times),
            "n_params": sum(p.numel() for p in module.parameters()),
            # ms of the fastest step spent in the memory update (None where it is not timed)
            "memory_update_ms": memory_times[best] if in_memory else None}


def _time_memory_update() -> list[float] | None:
    """Wrap the memory update's chunk kernels (forward and backward) of the checkout on sys.path
    with a timer; returns the one-element list their seconds add up in (None: no such kernels)."""
    from titans_ts import memory_ops

    if not all(hasattr(memory_ops, name) for name in ("_chunk_forward", "_chunk_backward")):
        return None
    total = [0.0]

    def timed(kernel):
        def run(*args, **kwargs):
            start = time.perf_counter()
            try:
                return kernel(*args, **kwargs)
            finally:
                total[0] += time.perf_counter() - start
        return run

    # _ChunkStep looks both up by name at every call, so the wrappers are what it runs
    memory_ops._chunk_forward = timed(memory_ops._chunk_forward)
    memory_ops._chunk_backward = timed(memory_ops._chunk_backward)
    return total


def commit_of(code: Path) -> str | None:
    """The checkout's commit, marked "+changes" when its tracked files differ from it."""
    head = subprocess.run(["git", "-C", str(code), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    changed = subprocess.run(["git", "-C", str(code), "status", "--porcelain", "--untracked-files=no"],
                             capture_output=True, text=True)
    return (head.stdout.strip() + ("+changes" if changed.stdout.strip() else "")) or None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--compare", type=Path, default=None, metavar="CHECKOUT",
                        help="another checkout of the repository to time side by side (e.g. a git worktree of an older commit)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--lookback", type=int, default=96)
    parser.add_argument("--horizon", type=int, default=96)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--quick", action="store_true", help="smoke pass: mal and dlinear, one round of 2 steps")
    parser.add_argument("--out", type=Path, default=RESULTS / "train_step.json")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print("RESULT " + json.dumps(worker(json.loads(args.worker))))
        return
    if args.quick:
        args.models, args.rounds, args.steps = ["mal", "dlinear"], 1, 2
    checkouts = {"this": ROOT} | ({"compare": args.compare.resolve()} if args.compare else {})
    for name, code in checkouts.items():
        if not (code / "forecasters" / "module.py").exists():
            raise SystemExit(f"--compare {code}: not a checkout of this repository (no forecasters/module.py)")
    commits = {name: commit_of(code) for name, code in checkouts.items()}
    started = time.perf_counter()
    records = []
    for round_ in range(args.rounds):
        for model in args.models:
            for name, code in checkouts.items():
                cfg = {"code": str(code), "model": model, "threads": args.threads, "steps": args.steps,
                       "lookback": args.lookback, "horizon": args.horizon, "batch": args.batch}
                env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
                proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(cfg)], env=env,
                                      capture_output=True, text=True, timeout=900)
                lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
                if proc.returncode or not lines:
                    raise SystemExit(f"{name} {model}: the worker failed:\n{proc.stderr[-3000:]}")
                record = {"checkout": name, "commit": commits[name], "model": model, "round": round_,
                          **json.loads(lines[-1][len("RESULT "):])}
                records.append(record)
                memory = record["memory_update_ms"]
                print(f"round {round_} {model:>8} {name:>7}: min {record['min_ms']:7.1f} ms  median {record['median_ms']:7.1f} ms"
                      + (f"  (memory update {memory:6.1f} ms of the fastest)" if memory else ""), flush=True)
    summary = {}
    for model in args.models:
        per = {name: statistics.median(r["min_ms"] for r in records if r["model"] == model and r["checkout"] == name)
               for name in checkouts}
        summary[model] = {f"{name}_ms": round(ms, 1) for name, ms in per.items()}
        shares = [r["memory_update_ms"] / r["min_ms"] for r in records
                  if r["model"] == model and r["checkout"] == "this" and r["memory_update_ms"]]
        if shares:  # the memory update's (chunk kernels') share of this checkout's step
            summary[model]["this_memory_update_share"] = round(statistics.median(shares), 3)
        if args.compare:
            summary[model]["compare_over_this"] = round(per["compare"] / per["this"], 3)
    seconds = round(time.perf_counter() - started, 1)
    settings = {k: getattr(args, k) for k in ("rounds", "steps", "threads", "lookback", "horizon", "batch")}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"settings": settings, "commits": commits,
                                    "load_avg_after": os.getloadavg()[0], "seconds": seconds, "summary": summary,
                                    "records": records}, indent=1))
    for model, row in summary.items():
        print(model, row)
    print(f"wrote {args.out} ({seconds:.0f} s)")


if __name__ == "__main__":
    main()
