"""Time one benchmark point in a fresh process; print one JSON line. Used by memory_speed.py.

Run with the python of the venv whose implementation is timed:

    .venv/bin/python      benchmarks/_bench_worker.py '{"impl": "ours", ...}'
    .benchvenv/bin/python benchmarks/_bench_worker.py '{"impl": "peer", ...}'

A separate process per point keeps the two implementations in their own venvs, lets the
driver enforce a wall-clock timeout, and caps the address space (RLIMIT_AS) so a point that
would need more memory than the machine has fails with an allocation error instead of
waking the OOM killer. This file imports nothing from the repository except, for "ours",
`titans_ts`; it must keep running under the peer venv (torch + titans-pytorch only).

Config keys: impl ("ours" | "peer"), dim, heads, depth, hidden_mult, chunk, batch, T,
threads, warmup, min_repeats, max_repeats, budget_s, mem_limit_gb, fwd_only (also time a
forward under torch.no_grad()), seed; for "ours", compile_chunks (the first warmup step compiles).
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
import traceback


def _limit_memory(gb: float | None) -> None:
    if not gb:
        return
    import resource

    limit = int(gb * 2**30)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def build_ours(cfg):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from titans_ts import NeuralMemory

    mem = NeuralMemory(
        dim=cfg["dim"],
        heads=cfg["heads"],
        depth=cfg["depth"],
        hidden_mult=cfg["hidden_mult"],
        chunk_size=cfg["chunk"],
        compile_chunks=cfg.get("compile_chunks", False),
    )
    return mem, (lambda x: mem(x)[0])


def build_peer(cfg):
    from titans_pytorch import MemoryMLP, NeuralMemory

    head_dim = cfg["dim"] // cfg["heads"]
    mem = NeuralMemory(
        dim=cfg["dim"],
        chunk_size=cfg["chunk"],
        heads=cfg["heads"],
        dim_head=head_dim,
        model=MemoryMLP(dim=head_dim, depth=cfg["depth"], expansion_factor=cfg["hidden_mult"]),
        momentum=True,
        batch_size=cfg.get("peer_batch_size"),  # None: the peer's default (see memory_speed.py)
    )
    return mem, (lambda x: mem(x)[0])


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def main() -> None:
    cfg = json.loads(sys.argv[1])
    out: dict = {"impl": cfg["impl"], "error": None}
    try:
        _limit_memory(cfg.get("mem_limit_gb"))
        import torch

        torch.set_num_threads(cfg["threads"])
        torch.manual_seed(cfg.get("seed", 0))
        out["torch"] = torch.__version__
        out["threads"] = torch.get_num_threads()
        mem, fwd = (build_ours if cfg["impl"] == "ours" else build_peer)(cfg)
        out["n_params"] = sum(p.numel() for p in mem.parameters())
        x = torch.randn(cfg["batch"], cfg["T"], cfg["dim"])

        def step() -> None:
            y = fwd(x)
            y.sum().backward()

        def clear() -> None:
            mem.zero_grad(set_to_none=True)

        warm = []
        for _ in range(cfg["warmup"]):
            warm.append(_timed(step))
            clear()
        out["warmup_ms"] = warm
        times: list[float] = []
        while len(times) < cfg["max_repeats"]:
            times.append(_timed(step))
            clear()
            if len(times) >= cfg["min_repeats"] and sum(times) / 1e3 >= cfg["budget_s"]:
                break
        out["times_ms"] = times
        out["ms"] = statistics.median(times)
        if cfg.get("fwd_only"):
            with torch.no_grad():
                fwd(x)  # warm the no-grad path
                ftimes: list[float] = []
                while len(ftimes) < cfg["max_repeats"]:
                    ftimes.append(_timed(lambda: fwd(x)))
                    if len(ftimes) >= cfg["min_repeats"] and sum(ftimes) / 1e3 >= cfg["budget_s"] / 2:
                        break
            out["fwd_times_ms"] = ftimes
            out["fwd_ms"] = statistics.median(ftimes)
    except MemoryError:
        out["error"] = "out of memory (MemoryError under the address-space cap)"
    except RuntimeError as exc:  # torch reports failed allocations as RuntimeError
        msg = str(exc)
        if "alloc" in msg.lower() or "memory" in msg.lower():
            out["error"] = "out of memory: " + msg.splitlines()[0][:200]
        else:
            out["error"] = "RuntimeError: " + msg.splitlines()[0][:300]
            out["traceback"] = traceback.format_exc()[-2000:]
    except Exception as exc:  # report, never hang the driver
        out["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
        out["traceback"] = traceback.format_exc()[-2000:]
    try:
        import resource

        out["max_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    except Exception:
        pass
    print("RESULT " + json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
