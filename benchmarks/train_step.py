"""Training-step time of the shipped model configs, optionally side by side with another checkout.

    .venv/bin/python benchmarks/train_step.py                           # this checkout, ~2 min here
    .venv/bin/python benchmarks/train_step.py --compare /tmp/oldwt      # against another checkout, ~4 min
    .venv/bin/python benchmarks/train_step.py --quick --out /tmp/ts.json  # smoke pass (the test suite runs it)
    python benchmarks/train_step.py --device cuda --modes fp32 bf16 bf16-compiled --batch 32 256 \
        --out benchmarks/results/train_step_cuda.json                     # on a GPU, ~3 min

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

`--modes` times each model several ways side by side, in the same rounds: `fp32`, `bf16` (the
forward and loss under `torch.autocast` in bfloat16, as Lightning's `bf16-mixed` runs them; the
memory's recurrence stays float32) and `*-compiled` (the network through `torch.compile`; the first,
untimed step compiles it and its time is kept as `first_step_ms`). On CUDA every step ends with
`torch.cuda.synchronize()`, each record has `peak_mb` (`torch.cuda.max_memory_allocated()` over the
timed steps: weights, optimizer state and activations), and the memory update's share is not
measured (its kernels run asynchronously).

Results: `benchmarks/results/train_step.json` (settings, one record per process, the summary).
"""

from __future__ import annotations

import argparse
import contextlib
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
MODES = ("fp32", "bf16", "fp32-compiled", "bf16-compiled")


def worker(cfg: dict) -> dict:
    """Time training steps of one model of the checkout at cfg["code"]; returns the measurements."""
    sys.path.insert(0, cfg["code"])
    import torch
    import yaml

    from forecasters.module import TitansForecastingModule

    torch.set_num_threads(cfg["threads"])
    torch.manual_seed(0)
    device, mode = torch.device(cfg.get("device", "cpu")), cfg.get("mode", "fp32")
    cuda = device.type == "cuda"
    hparams = yaml.safe_load((Path(cfg["code"]) / "configs" / "model" / f"{cfg['model']}.yaml").read_text())
    module = TitansForecastingModule(n_channels=7, lookback=cfg["lookback"], horizon=cfg["horizon"], **hparams)
    module.to(device).train()
    network = torch.compile(module.model) if mode.endswith("-compiled") else module.model
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-4)
    x = torch.randn(cfg["batch"], cfg["lookback"], 7, device=device)
    y = torch.randn(cfg["batch"], cfg["horizon"], 7, device=device)

    def step() -> None:
        precision = torch.autocast(device.type, dtype=torch.bfloat16) if mode.startswith("bf16") else contextlib.nullcontext()
        with precision:
            loss = (network(x)[0].squeeze(-1).float() - y).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if cuda:
            torch.cuda.synchronize()

    # compiled chunk kernels are the wrapped functions' compiled copies: not timed; nor CUDA's asynchronous ones
    compiled = mode.endswith("-compiled") or any(getattr(m, "compile_chunks", False) for m in module.modules())
    in_memory = None if compiled or cuda else _time_memory_update()
    start = time.perf_counter()
    step()
    first_step_ms = 1e3 * (time.perf_counter() - start)
    for _ in range(2):
        step()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
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
    return {"min_ms": min(times), "median_ms": statistics.median(times), "first_step_ms": first_step_ms,
            "peak_mb": torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
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
    parser.add_argument("--batch", type=int, nargs="+", default=[32], help="one or more batch sizes")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--modes", nargs="+", default=["fp32"], choices=MODES,
                        help="precision / compilation, timed side by side (see the module docstring)")
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

    def label(name: str, mode: str, batch: int) -> str:
        """"this", "this_bf16", "this_bf16_b256", ...: the defaults (fp32, a single batch size) leave no suffix."""
        return name + ("" if mode == "fp32" else f"_{mode}") + ("" if len(args.batch) == 1 else f"_b{batch}")

    records = []
    for round_ in range(args.rounds):
        for model in args.models:
            for batch in args.batch:
                for mode in args.modes:
                    for name, code in checkouts.items():
                        cfg = {"code": str(code), "model": model, "threads": args.threads, "steps": args.steps,
                               "lookback": args.lookback, "horizon": args.horizon, "batch": batch,
                               "device": args.device, "mode": mode}
                        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
                        proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(cfg)], env=env,
                                              capture_output=True, text=True, timeout=900)
                        lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
                        if proc.returncode or not lines:
                            raise SystemExit(f"{name} {model}: the worker failed:\n{proc.stderr[-3000:]}")
                        record = {"checkout": name, "commit": commits[name], "model": model, "round": round_,
                                  "batch": batch, "mode": mode, **json.loads(lines[-1][len("RESULT "):])}
                        records.append(record)
                        memory, peak = record["memory_update_ms"], record["peak_mb"]
                        print(f"round {round_} {model:>8} {label(name, mode, batch):>24}: min {record['min_ms']:7.1f} ms"
                              f"  median {record['median_ms']:7.1f} ms"
                              + (f"  (memory update {memory:6.1f} ms of the fastest)" if memory else "")
                              + (f"  peak {peak:8.1f} MB" if peak else ""), flush=True)
    summary = {}
    for model in args.models:
        summary[model] = {}
        for batch in args.batch:
            per = {}
            for mode in args.modes:
                for name in checkouts:
                    mine = [r for r in records if (r["model"], r["batch"], r["mode"], r["checkout"]) == (model, batch, mode, name)]
                    per[name, mode] = statistics.median(r["min_ms"] for r in mine)
                    summary[model][f"{label(name, mode, batch)}_ms"] = round(per[name, mode], 1)
                    if mine[0]["peak_mb"] is not None:
                        summary[model][f"{label(name, mode, batch)}_peak_mb"] = round(max(r["peak_mb"] for r in mine), 1)
                    if mode.endswith("-compiled"):  # the compile's cost, paid once per process
                        summary[model][f"{label(name, mode, batch)}_first_step_ms"] = round(
                            statistics.median(r["first_step_ms"] for r in mine), 1)
                    shares = [r["memory_update_ms"] / r["min_ms"] for r in mine if r["memory_update_ms"]]
                    if shares and name == "this":  # the memory update's (chunk kernels') share of this checkout's step
                        summary[model][f"{label(name, mode, batch)}_memory_update_share"] = round(statistics.median(shares), 3)
                if args.compare:
                    suffix = label("", mode, batch)
                    summary[model][f"compare_over_this{suffix}"] = round(per["compare", mode] / per["this", mode], 3)
                if mode != "fp32" and "fp32" in args.modes:  # above 1: the mode is faster than fp32
                    summary[model][f"fp32_over{label('', mode, batch)}"] = round(per["this", "fp32"] / per["this", mode], 3)
    seconds = round(time.perf_counter() - started, 1)
    settings = {k: getattr(args, k) for k in ("rounds", "steps", "threads", "lookback", "horizon", "device", "modes")}
    settings["batch"] = args.batch[0] if len(args.batch) == 1 else args.batch
    if args.device == "cuda":
        import torch

        settings |= {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "cuda": torch.version.cuda}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"settings": settings, "commits": commits,
                                    "load_avg_after": os.getloadavg()[0], "seconds": seconds, "summary": summary,
                                    "records": records}, indent=1))
    for model, row in summary.items():
        print(model, row)
    print(f"wrote {args.out} ({seconds:.0f} s)")


if __name__ == "__main__":
    main()
