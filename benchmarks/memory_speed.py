"""Speed of our NeuralMemory against titans-pytorch's NeuralMemory (the peer), forward + backward.

    .venv/bin/python benchmarks/memory_speed.py                 # full run (installs the peer venv once)
    .venv/bin/python benchmarks/memory_speed.py --quick --out /tmp/ms.json   # smoke pass, seconds
    .venv/bin/python benchmarks/memory_speed.py --summary-only  # derived fields, PNG, table from the results

Expected run time (2 CPU cores): full run about 13-20 minutes on a quiet machine (13.1 min
measured with the compiled form, whose compile takes 5-17 s per point), plus ~35 s for the
one-time install of the peer venv; `--quick` about 10-20 s.
On a busy machine the script waits for quiet (up to --max-wait-s per point) and re-runs
disturbed points, so it takes longer; `--resume` continues an interrupted run.

What is timed
-------------
One step = `y = mem(x)[0]; y.sum().backward()` on x of shape [batch, T, dim], float32, from a
fresh state, 2 threads (torch.set_num_threads(2), OMP/MKL_NUM_THREADS=2). Per point and per
implementation: `warmup` untimed steps, then timed steps until `max_repeats` steps or
`budget_s` seconds of timed steps (at least one); the median is reported. Each point runs in
a fresh subprocess (`_bench_worker.py`): ours with this repo's .venv, the peer with its own
venv, so neither sees the other's packages. Ours and the peer alternate order point by point.
A subprocess that passes the wall-clock timeout is killed, and its address space is capped
(RLIMIT_AS, `--mem-limit-gb`) so a point that needs more memory than the machine has fails
with an allocation error: either way the time is recorded as null with a note, and larger T
of the same (dim, chunk) are skipped for that implementation (also when the last T predicts
a time or memory far past the limits).

The machine is shared (2 cores): before each point the script waits (up to --max-wait-s) until
other jobs use under --quiet-threshold of the cores, measures what share of the cores other
processes used while the point ran (`*_other_cpu_frac`: machine busy time minus the worker's
own CPU time), and re-runs a point that others disturbed by more than --max-contention
(up to --retries times, keeping the least disturbed run).

Grid (full run): dim in {64, 256}, chunk in {16, 64}, batch 32, T in {96, 512, 2048, 8192},
heads 4 (head_dim 16 and 64), memory MLP depth 2, hidden width 2 * head_dim.

The peer, and how it is set up to match
---------------------------------------
titans-pytorch==0.5.5 (PEER_VERSION), in /work/main/.benchvenv (gitignored), installed on the
first full run with torch==2.13.0 (CPU) and every dependency pinned (PEER_PINS):

    titans_pytorch.NeuralMemory(
        dim=dim, chunk_size=chunk, heads=4, dim_head=dim // 4,
        model=MemoryMLP(dim=dim // 4, depth=2, expansion_factor=2.0),
        momentum=True)          # every other argument at its default

i.e. the same heads, head dim, depth and hidden width (2 * head_dim) as ours, momentum on,
a learned per-token inner learning rate; its momentum and forgetting gates are learned per
chunk (from the chunk's mean token) where ours are per token. Its defaults also add
pre-RMSNorm, a LayerNorm + residual around the memory MLP (GELU inside, ours uses SiLU), and
a per-head sigmoid retrieval gate; ours has SiLU + short causal conv on q/k/v and L2-normed
q/k. These are small elementwise costs next to the memory itself.

Semantics differ, and not in our favour for speed:
- The peer's default (`batch_size=None`) takes the surprise gradient of EVERY chunk at the
  initial weights W0 (the whole sequence is one test-time-training batch; only momentum and
  forgetting are scanned across chunks), so the gradients of all chunks are one parallel
  vmap. Ours takes each chunk's gradients at that chunk's start weights, a true recurrence.
- The peer's retrieval reads, for every token of a chunk, one set of weights per chunk (the
  weights at a chunk boundary: stale within the chunk); ours gives every token t the exact
  weights W_t after its own write (the dual form), which costs extra c x c products.
- `peer_exact_ms` (T <= --peer-exact-max-T): the peer with `batch_size=chunk`, which does
  refresh the weights at every chunk boundary like ours; it loops in Python and re-concatenates
  all per-chunk weights every chunk (quadratic in T), so it is only timed at short T.

FLOPs of our memory update (analytic, forward only; see `ours_memory_macs`)
---------------------------------------------------------------------------
Per chunk of c tokens and per memory (N = batch * heads memories), with layer widths
w_0 -> w_1 -> ... -> w_L (here d -> 2d -> d, d = head_dim), MACs:
  keys forward at the chunk-start weights   sum_l c * in_l * out_l
  closed-form backward (errors)             sum_{l>=2} c * out_l * in_l
  queries, dual form, per layer:            c*in*out (h@W) + c*in*out (h@S, momentum)
                                            + c*c*in (h@U^T) + c*c*out ((C*hU^T)@E)
  end-of-chunk weights and momentum         2 * sum_l in_l * c * out_l
  gate coefficient matrices                 c^3 (decay @ carry) + c^2
= for depth 2, h = 2d:  22 c d^2 + 6 c^2 d + c^3 + c^2 MACs per chunk per memory.
FLOPs = 2 * MACs. Projections (q/k/v/out, 4 * dim^2 MACs per token), norms, convs and
elementwise work are NOT counted, so the achieved rates below are lower bounds.
`ours_fwd_gflops` = forward FLOPs / forward time (forward under torch.no_grad()), and
`ours_gflops` = 3 x forward FLOPs / (forward + backward time): the usual estimate that a
backward costs about twice its forward.

Machine rate: fp32 matmul GFLOP/s on `threads` threads, measured in this process before the
points: a 2048 x 2048 square matmul (`matmul_gflops_large`), and per (dim, chunk) the small
batched product our memory does most, bmm of [batch*heads, chunk, head_dim] x
[batch*heads, head_dim, 2*head_dim] (`matmul_gflops_small`). `frac_of_peak_large/_small` =
ours_gflops / those rates (and `fwd_frac_of_peak_*` for the forward-only rate).
`speedup_ceiling` = speedup / frac_of_peak_small: the speedup ours would reach if its counted
products all ran at that measured rate and everything else were free, an upper bound for any
faster implementation of the same per-chunk products (`--summary-only` recomputes these fields
from the files).

Ours compiled (`--compiled`, on in full runs): the same point with
`NeuralMemory(compile_chunks=True)`, each chunk's forward and backward through torch.compile. The
compile happens in the untimed warmup step (`ours_compiled_first_step_ms` is that step, compile
included); `ours_compiled_ms` and `speedup_compiled` = peer_ms / ours_compiled_ms are from the
timed steps after it, like the others.

Outputs (paths follow --out): <out>.json, a list of one record per point (dim, chunk, batch, T,
ours_ms, peer_ms, speedup = peer_ms / ours_ms, and the fields above); <out>_machine.json, the
machine, the matmul rates, the peer settings and the command; <out>.png, ms vs T for both.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORKER = Path(__file__).resolve().parent / "_bench_worker.py"
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "memory_speed.json"
PEER_VENV = Path(os.environ.get("TITANS_BENCH_PEER_VENV", ROOT / ".benchvenv"))  # override: for tests
PEER_VERSION = "0.5.5"
TORCH_VERSION = "2.13.0"
# The peer venv as tested (pip freeze), pinned so a later release cannot move torch or break it.
PEER_PINS = [
    "accelerated-scan==0.3.1",
    "assoc-scan==0.0.6",
    "axial_positional_embedding==0.3.12",
    "einops==0.8.2",
    "einx==0.4.3",
    "hyper-connections==0.4.11",
    "numpy==2.4.6",
    "rotary-embedding-torch==0.9.1",
    "tensordict==0.15.3",
    "torch-einops-utils==0.2.0",
    "x-transformers==2.31.10",
    f"torch=={TORCH_VERSION}",
    f"titans-pytorch=={PEER_VERSION}",
]
PEER_SETTINGS = (
    f"titans_pytorch=={PEER_VERSION} NeuralMemory(dim=dim, chunk_size=chunk, heads=heads, "
    "dim_head=dim//heads, model=MemoryMLP(dim=dim//heads, depth=depth, expansion_factor=hidden_mult), "
    "momentum=True); other arguments default (batch_size=None: surprise gradients of all chunks "
    "at the initial weights; pre_rmsnorm=True; mem_model_norm_add_residual=True; per-token lr, "
    "per-chunk momentum/decay; retrieval reads one weight set per chunk)"
)
# What each point times; a record has `<name>_ms`, `<name>_times_ms`, `<name>_max_rss_gb` and
# `<name>_other_cpu_frac` for each.
IMPLEMENTATIONS = ("ours", "ours_compiled", "peer", "peer_exact")
PEER_EXACT_SETTINGS = "as peer, plus batch_size=chunk (weights refreshed at every chunk boundary, like ours)"
OURS_SETTINGS = (
    "titans_ts.NeuralMemory(dim=dim, heads=heads, depth=depth, hidden_mult=hidden_mult, "
    "chunk_size=chunk); other arguments default (gradients at chunk-start weights, "
    "exact per-token retrieval of W_t via the dual form, per-token lr/momentum/forgetting)"
)


# --------------------------------------------------------------------------- FLOP count


def ours_memory_macs(T: int, batch: int, heads: int, head_dim: int, hidden_mult: float, depth: int, chunk: int) -> int:
    """Forward MACs of our memory update over a whole sequence (see the module docstring).

    Counts the batched matrix products of `titans_ts.memory_ops._chunk_forward`, summed over
    the chunks of T (the last one may be partial), for N = batch * heads memories.
    """
    hidden = max(1, round(hidden_mult * head_dim))
    widths = [head_dim] + [hidden] * (depth - 1) + [head_dim]
    layers = list(zip(widths[:-1], widths[1:]))
    total = 0
    start = 0
    while start < T:
        c = min(chunk, T - start)
        keys = sum(c * i * o for i, o in layers)
        errors = sum(c * o * i for i, o in layers[1:])
        queries = sum(2 * c * i * o + c * c * i + c * c * o for i, o in layers)
        updates = 2 * sum(i * c * o for i, o in layers)
        gates = c**3 + c**2
        total += keys + errors + queries + updates + gates
        start += c
    return total * batch * heads


# --------------------------------------------------------------------------- machine rates


def _rate(fn, flops: float, min_time: float) -> float:
    fn()  # warm
    n, t0 = 0, time.perf_counter()
    while True:
        fn()
        n += 1
        elapsed = time.perf_counter() - t0
        if elapsed >= min_time and n >= 3:
            return flops * n / elapsed / 1e9


def measure_matmul_rates(threads: int, small_shapes: list[tuple[int, int, int, int]], quick: bool) -> dict:
    """fp32 GFLOP/s on `threads` threads: a large square matmul and small batched bmm's.

    small_shapes: (N, c, d, h) for bmm [N, c, d] x [N, d, h]. Best of 3 rounds each.
    """
    import torch

    torch.set_num_threads(threads)
    n = 512 if quick else 2048
    min_time = 0.1 if quick else 1.0
    rounds = 1 if quick else 3
    a, b = torch.randn(n, n), torch.randn(n, n)
    large = max(_rate(lambda: a @ b, 2.0 * n**3, min_time) for _ in range(rounds))
    small = {}
    for N, c, d, h in small_shapes:
        x, w = torch.randn(N, c, d), torch.randn(N, d, h)
        small[f"{N}x{c}x{d}x{h}"] = max(_rate(lambda: torch.bmm(x, w), 2.0 * N * c * d * h, min_time) for _ in range(rounds))
    return {"large_n": n, "matmul_gflops_large": large, "matmul_gflops_small": small}


# --------------------------------------------------------------------------- peer venv


def peer_python() -> Path:
    return PEER_VENV / "bin" / "python"


def peer_ready() -> bool:
    py = peer_python()
    if not py.exists():
        return False
    try:
        r = subprocess.run(
            [str(py), "-c", f"import titans_pytorch, importlib.metadata as m, torch; "
             f"assert m.version('titans-pytorch') == '{PEER_VERSION}', m.version('titans-pytorch')"],
            capture_output=True, timeout=120,
        )
    except subprocess.TimeoutExpired:
        return False
    return r.returncode == 0


def install_peer() -> None:
    print(f"[peer] installing titans-pytorch=={PEER_VERSION} + torch=={TORCH_VERSION} into {PEER_VENV} ...", flush=True)
    if not peer_python().exists():
        subprocess.run([sys.executable, "-m", "venv", str(PEER_VENV)], check=True)
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
        f.write("\n".join(PEER_PINS) + "\n")
        pins = f.name
    try:
        subprocess.run(
            [str(peer_python()), "-m", "pip", "install", "-q", "-c", pins,
             f"torch=={TORCH_VERSION}", f"titans-pytorch=={PEER_VERSION}"],
            check=True,
        )
    finally:
        os.unlink(pins)


# --------------------------------------------------------------------------- running points


def _cpu_busy_s() -> float:
    """CPU-seconds the whole machine has spent busy (all cores), from /proc/stat."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    user, nice, system, idle, iowait, irq, softirq, steal = (int(v) for v in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _children_cpu_s() -> float:
    import resource

    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def machine_busy_frac(seconds: float = 1.0) -> float:
    """Fraction of all cores busy over `seconds` (this process only sleeps meanwhile)."""
    b0, t0 = _cpu_busy_s(), time.perf_counter()
    time.sleep(seconds)
    return (_cpu_busy_s() - b0) / ((time.perf_counter() - t0) * (os.cpu_count() or 1))


def wait_for_quiet(threshold: float, max_wait_s: float) -> float:
    """Wait (up to max_wait_s) until other jobs use less than `threshold` of the cores; returns s waited."""
    t0 = time.perf_counter()
    said = False
    while max_wait_s > 0:
        busy = machine_busy_frac(1.0)
        if busy < threshold or time.perf_counter() - t0 > max_wait_s:
            break
        if not said:
            print(f"    (machine {busy:.0%} busy with other jobs: waiting up to {max_wait_s:.0f} s for quiet)", flush=True)
            said = True
        time.sleep(4.0)
    return time.perf_counter() - t0


def run_worker(python: Path, cfg: dict, timeout_s: float) -> dict:
    """Run one point in a subprocess. `other_cpu_frac`: share of the cores that OTHER processes
    used meanwhile (machine busy time minus the worker's own CPU time): contention, 0 when quiet."""
    env = dict(os.environ, OMP_NUM_THREADS=str(cfg["threads"]), MKL_NUM_THREADS=str(cfg["threads"]),
               PYTHONWARNINGS="ignore")
    t0, busy0, child0 = time.perf_counter(), _cpu_busy_s(), _children_cpu_s()

    def contention(wall: float) -> float:
        other = (_cpu_busy_s() - busy0) - (_children_cpu_s() - child0)
        return max(0.0, other / (wall * (os.cpu_count() or 1)))

    try:
        r = subprocess.run([str(python), str(WORKER), json.dumps(cfg)], capture_output=True, text=True,
                           timeout=timeout_s, env=env, cwd=str(ROOT))
    except subprocess.TimeoutExpired:
        wall = time.perf_counter() - t0
        return {"error": f"timeout: no result within {timeout_s:.0f} s (killed)", "wall_s": wall,
                "other_cpu_frac": contention(wall)}
    wall = time.perf_counter() - t0
    for line in reversed(r.stdout.splitlines()):
        if line.startswith("RESULT "):
            out = json.loads(line[len("RESULT "):])
            out["wall_s"] = wall
            out["other_cpu_frac"] = contention(wall)
            return out
    tail = (r.stderr or r.stdout or "")[-600:]
    how = "killed by signal %d (out of memory?)" % -r.returncode if r.returncode < 0 else f"exit {r.returncode}"
    return {"error": f"worker died without a result: {how}: {tail}", "wall_s": wall, "other_cpu_frac": contention(wall)}


def run_point(python: Path, cfg: dict, args: argparse.Namespace) -> dict:
    """run_worker, after waiting for a quiet machine; re-run (up to --retries) if others competed."""
    attempts = []
    for attempt in range(args.retries + 1):
        waited = wait_for_quiet(args.quiet_threshold, args.max_wait_s)
        res = run_worker(python, cfg, args.timeout_s)
        res["waited_s"] = waited
        attempts.append(res)
        if res.get("error", "") and res["error"].startswith(("timeout", "out of memory")) and res["other_cpu_frac"] < 0.25:
            break  # a genuine failure, not contention
        if res["other_cpu_frac"] <= args.max_contention:
            break
        print(f"    (other jobs used {res['other_cpu_frac']:.0%} of the cores during this point: "
              f"{'re-running' if attempt < args.retries else 'keeping the least contended run'})", flush=True)
    best = min(attempts, key=lambda r: (bool(r.get("error")), r["other_cpu_frac"]))
    best["attempts"] = len(attempts)
    return best


def loadavg() -> float | None:
    try:
        return float(Path("/proc/loadavg").read_text().split()[0])
    except Exception:
        return None


class Skipper:
    """Skips larger T for a (impl, dim, chunk) after a failure, or when the last T predicts one."""

    def __init__(self, timeout_s: float, mem_limit_gb: float) -> None:
        self.timeout_s, self.mem_limit_gb = timeout_s, mem_limit_gb
        self.last: dict[tuple, tuple[int, dict]] = {}

    def reason(self, key: tuple, T: int) -> str | None:
        if key not in self.last:
            return None
        prev_T, res = self.last[key]
        if res.get("error"):
            return f"skipped: failed at T={prev_T} ({res['error'][:80]})"
        scale = T / prev_T
        # one warmup + one timed step at least: twice the time of one step, plus start-up. The compiled
        # form's warmup step is mostly its compile, which does not grow with T: scale a timed step.
        compiles = key[0] == "ours_compiled" and res.get("ms")
        step_s = (res["ms"] if compiles else (res.get("warmup_ms") or [res["ms"]])[0]) / 1e3
        if 2 * step_s * scale > 1.5 * self.timeout_s:
            return f"skipped: T={prev_T} took {step_s:.1f} s a step, so T={T} would pass the {self.timeout_s:.0f} s timeout"
        rss = res.get("max_rss_gb")
        if rss and self.mem_limit_gb and rss * scale > 1.5 * self.mem_limit_gb:
            return (f"skipped: T={prev_T} peaked at {rss:.1f} GiB, so T={T} would need ~{rss * scale:.0f} GiB "
                    f"> the {self.mem_limit_gb:g} GiB cap")
        return None

    def record(self, key: tuple, T: int, res: dict) -> None:
        self.last[key] = (T, res)


def bench(args: argparse.Namespace) -> tuple[list[dict], dict, bool]:
    threads, heads, depth, hidden_mult = args.threads, args.heads, args.depth, args.hidden_mult
    use_peer = args.peer
    if use_peer and not peer_ready():
        if args.quick or args.no_install:
            print(f"[peer] SKIPPED: no usable peer venv at {PEER_VENV} (titans-pytorch=={PEER_VERSION}); "
                  f"{'--quick never installs it' if args.quick else '--no-install given'}. "
                  "Run the full benchmark once to install it. Peer fields are null.", flush=True)
            use_peer = False
        else:
            install_peer()
            if not peer_ready():
                raise SystemExit(f"[peer] install into {PEER_VENV} did not give a working titans-pytorch=={PEER_VERSION}")
    small_shapes = sorted({(args.batch * heads, c, d // heads, max(1, round(hidden_mult * (d // heads))))
                           for d in args.dims for c in args.chunks})
    rates = measure_rates_quiet(args, small_shapes, prior=previous_rates(args))

    common = dict(heads=heads, depth=depth, hidden_mult=hidden_mult, batch=args.batch, threads=threads,
                  warmup=args.warmup, min_repeats=1, max_repeats=args.repeats, budget_s=args.budget_s,
                  mem_limit_gb=args.mem_limit_gb)
    ours_py = Path(sys.executable)
    skip = Skipper(args.timeout_s, args.mem_limit_gb)
    records = []
    kept = {}  # --resume: points already in --out, kept as they are
    if args.resume and Path(args.out).exists():
        for r in json.loads(Path(args.out).read_text()):
            disturbed = [f"{name}_other_cpu_frac" for name in IMPLEMENTATIONS
                         if (r.get(f"{name}_other_cpu_frac") or 0.0) > args.max_contention]
            if disturbed and r["dim"] in args.dims and r["chunk"] in args.chunks and r["T"] in args.Ts:
                print(f"  (resume: re-running dim={r['dim']} chunk={r['chunk']} T={r['T']}: "
                      f"{', '.join(disturbed)} over {args.max_contention:.0%})", flush=True)
                continue
            kept[(r["dim"], r["chunk"], r["batch"], r["T"])] = r
    index = 0
    for dim in args.dims:
        for chunk in args.chunks:
            for T in args.Ts:
                old = kept.pop((dim, chunk, args.batch, T), None)
                if old is not None:
                    print(f"  (resume: keeping dim={dim} chunk={chunk} T={T} from {args.out})", flush=True)
                    records.append(old)
                    for name in IMPLEMENTATIONS:
                        ms_old = old.get(f"{name}_ms")
                        fail = next((n for n in old["notes"] if n.startswith(name + ":")), None)
                        if ms_old:
                            skip.record((name, dim, chunk), T, {"ms": ms_old, "max_rss_gb": old.get(f"{name}_max_rss_gb")})
                        elif fail:
                            skip.record((name, dim, chunk), T, {"error": fail.split(":", 1)[-1].strip()})
                    continue
                head_dim = dim // heads
                hidden = max(1, round(hidden_mult * head_dim))
                point = dict(common, dim=dim, chunk=chunk, T=T)
                notes: list[str] = []
                results: dict[str, dict | None] = dict.fromkeys(IMPLEMENTATIONS)
                jobs = [("ours", ours_py, dict(point, impl="ours", fwd_only=True))]
                if args.compiled:
                    jobs.append(("ours_compiled", ours_py, dict(point, impl="ours", compile_chunks=True)))
                if use_peer:
                    jobs.append(("peer", peer_python(), dict(point, impl="peer")))
                if index % 2:  # alternate who goes first
                    jobs.reverse()
                if use_peer and T <= args.peer_exact_max_T:
                    jobs.append(("peer_exact", peer_python(), dict(point, impl="peer", peer_batch_size=chunk)))
                load_before = loadavg()
                for name, py, cfg in jobs:
                    key = (name, dim, chunk)
                    why = skip.reason(key, T)
                    if why:
                        notes.append(f"{name}: {why}")
                        print(f"  {name:10s} dim={dim} chunk={chunk} T={T}: {why}", flush=True)
                        continue
                    res = run_point(py, cfg, args)
                    skip.record(key, T, res)
                    results[name] = res
                    if res.get("error"):
                        notes.append(f"{name}: {res['error']}")
                        print(f"  {name:10s} dim={dim} chunk={chunk} T={T}: FAILED {res['error'][:160]}", flush=True)
                    else:
                        print(f"  {name:10s} dim={dim} chunk={chunk} T={T}: {res['ms']:10.1f} ms "
                              f"(n={len(res['times_ms'])}, {res['wall_s']:.0f} s wall, {res['max_rss_gb']:.1f} GiB, "
                              f"others {res['other_cpu_frac']:.0%})", flush=True)
                load_after = loadavg()

                def ms(name: str, field: str = "ms"):
                    r = results[name]
                    return None if r is None or r.get("error") else r.get(field)

                ours_ms, peer_ms, ours_fwd_ms = ms("ours"), ms("peer"), ms("ours", "fwd_ms")
                macs = ours_memory_macs(T, args.batch, heads, head_dim, hidden_mult, depth, chunk)
                fwd_flops = 2.0 * macs
                ours_gflops = 3 * fwd_flops / (ours_ms * 1e6) if ours_ms else None
                ours_fwd_gflops = fwd_flops / (ours_fwd_ms * 1e6) if ours_fwd_ms else None
                rec = dict(
                    dim=dim, chunk=chunk, batch=args.batch, T=T,
                    **{f"{name}_{field}": ms(name, field) for name in IMPLEMENTATIONS
                       for field in ("ms", "times_ms", "max_rss_gb", "other_cpu_frac")},
                    speedup=(peer_ms / ours_ms) if (ours_ms and peer_ms) else None,
                    speedup_vs_peer_exact=(ms("peer_exact") / ours_ms) if (ours_ms and ms("peer_exact")) else None,
                    speedup_compiled=(peer_ms / ms("ours_compiled")) if (peer_ms and ms("ours_compiled")) else None,
                    ours_compiled_first_step_ms=(ms("ours_compiled", "warmup_ms") or [None])[0],
                    ours_fwd_ms=ours_fwd_ms,
                    heads=heads, head_dim=head_dim, hidden=hidden, depth=depth, threads=threads,
                    ours_mem_fwd_gflop=fwd_flops / 1e9,
                    ours_gflops=ours_gflops,
                    ours_fwd_gflops=ours_fwd_gflops,
                    matmul_gflops_large=None, matmul_gflops_small=None,  # set by apply_rates
                    frac_of_peak_large=None, frac_of_peak_small=None,
                    fwd_frac_of_peak_large=None, fwd_frac_of_peak_small=None,
                    loadavg_before=load_before, loadavg_after=load_after,
                    notes=notes,
                )
                records.append(rec)
                index += 1
                save(apply_rates(records + list(kept.values()), rates), args.out)  # survives an interrupted run
    # the machine may have been busier when the rates were first measured: measure again, keep the best
    rates = measure_rates_quiet(args, small_shapes, prior=rates)
    return apply_rates(records + list(kept.values()), rates), rates, use_peer


def _rate_key(r: dict) -> str:
    return f"{r['batch'] * r['heads']}x{r['chunk']}x{r['head_dim']}x{r['hidden']}"


def apply_rates(records: list[dict], rates: dict) -> list[dict]:
    """Fill each record's machine rates and fractions of them from the best rates measured."""
    for r in records:
        large, small = rates["matmul_gflops_large"], rates["matmul_gflops_small"].get(_rate_key(r))
        r["matmul_gflops_large"], r["matmul_gflops_small"] = large, small
        for prefix, g in (("", r.get("ours_gflops")), ("fwd_", r.get("ours_fwd_gflops"))):
            r[f"{prefix}frac_of_peak_large"] = g / large if (g and large) else None
            r[f"{prefix}frac_of_peak_small"] = g / small if (g and small) else None
        # the speedup ours would reach if its counted products ran at the measured rate of such
        # products and everything else (elementwise work, projections) were free: a ceiling
        frac, speedup = r["frac_of_peak_small"], r.get("speedup")
        r["speedup_ceiling"] = speedup / frac if (speedup and frac) else None
    return records


def previous_rates(args: argparse.Namespace) -> dict | None:
    """With --resume, the rates recorded by the earlier invocation (so all records share the best)."""
    mpath = machine_path(Path(args.out))
    if not (args.resume and mpath.exists()):
        return None
    old = json.loads(mpath.read_text())
    if old.get("threads") != args.threads or "matmul_gflops_large" not in old:
        return None
    return {k: old[k] for k in ("large_n", "matmul_gflops_large", "matmul_gflops_small", "matmul_other_cpu_frac") if k in old}


def measure_rates_quiet(args: argparse.Namespace, small_shapes: list, prior: dict | None = None) -> dict:
    """measure_matmul_rates after waiting for a quiet machine, re-measured (--retries) if others
    competed; each rate is the best over these attempts and `prior` (an earlier measurement)."""
    best = prior
    for attempt in range(args.retries + 1):
        print(f"[machine] measuring fp32 matmul rates on {args.threads} threads ...", flush=True)
        wait_for_quiet(args.quiet_threshold, args.max_wait_s)
        busy0, self0, t0 = _cpu_busy_s(), time.process_time(), time.perf_counter()
        rates = measure_matmul_rates(args.threads, small_shapes, args.quick)
        rates["matmul_other_cpu_frac"] = max(0.0, ((_cpu_busy_s() - busy0) - (time.process_time() - self0))
                                             / ((time.perf_counter() - t0) * (os.cpu_count() or 1)))
        print(f"[machine] large {rates['large_n']}^2 matmul: {rates['matmul_gflops_large']:.1f} GFLOP/s; small bmm: "
              + ", ".join(f"{k}: {v:.1f}" for k, v in rates["matmul_gflops_small"].items())
              + f" (others used {rates['matmul_other_cpu_frac']:.0%} of the cores)", flush=True)
        if best is None:
            best = rates
        else:
            if rates["matmul_gflops_large"] > best["matmul_gflops_large"]:
                best.update(large_n=rates["large_n"], matmul_gflops_large=rates["matmul_gflops_large"],
                            matmul_other_cpu_frac=rates["matmul_other_cpu_frac"])
            for k, v in rates["matmul_gflops_small"].items():
                best["matmul_gflops_small"][k] = max(v, best["matmul_gflops_small"].get(k, 0.0))
        if rates["matmul_other_cpu_frac"] <= args.max_contention:
            break
    return best


def save(records: list[dict], out: Path) -> None:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    records = sorted(records, key=lambda r: (r["dim"], r["chunk"], r["batch"], r["T"]))
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(records, indent=1) + "\n")
    tmp.replace(out)


# --------------------------------------------------------------------------- outputs


_FINGERPRINT: dict = {}


def source_fingerprint() -> dict:
    """git HEAD and hashes of our memory sources, taken once at start (the tree may change later)."""
    if not _FINGERPRINT:
        import hashlib

        try:
            head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        except OSError:
            head = None
        _FINGERPRINT.update(git_head=head, ours_sources_sha256={
            str(f.relative_to(ROOT)): hashlib.sha256(f.read_bytes()).hexdigest()[:16]
            for f in sorted((ROOT / "titans_ts").glob("memory*.py"))})
    return _FINGERPRINT


def machine_info(args, rates: dict, use_peer: bool, total_s: float, argv: list[str]) -> dict:
    import torch

    cpu = None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except Exception:
        pass
    return dict(
        **source_fingerprint(),
        cpu=cpu, logical_cpus=os.cpu_count(), platform=platform.platform(), python=platform.python_version(),
        torch=torch.__version__, threads=args.threads, **rates,
        peer=PEER_SETTINGS if use_peer else "skipped", peer_exact=PEER_EXACT_SETTINGS if use_peer else "skipped",
        ours=OURS_SETTINGS, flop_count="see ours_memory_macs in benchmarks/memory_speed.py; "
        "ours_gflops = 3 * forward FLOPs / (fwd+bwd time); projections and elementwise not counted",
        quick=args.quick, total_run_s=total_s, command=" ".join(shlex.quote(a) for a in argv),
        timeout_s=args.timeout_s, mem_limit_gb=args.mem_limit_gb, warmup=args.warmup, max_repeats=args.repeats,
        budget_s=args.budget_s, quiet_threshold=args.quiet_threshold, max_wait_s=args.max_wait_s,
        max_contention=args.max_contention, retries=args.retries,
    )


def plot(records: list[dict], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("[plot] matplotlib not installed: no plot", flush=True)
        return
    panels = sorted({(r["dim"], r["chunk"]) for r in records})
    cols = min(2, len(panels))
    rows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(5.5 * cols, 4 * rows), squeeze=False)
    for ax, (dim, chunk) in zip(axes.flat, panels):
        rs = sorted((r for r in records if r["dim"] == dim and r["chunk"] == chunk), key=lambda r: r["T"])
        for field, label, style in (("ours_ms", "ours (titans-ts)", "o-"),
                                    ("ours_compiled_ms", "ours, compile_chunks=True", "o-."),
                                    ("peer_ms", "titans-pytorch", "s--"),
                                    ("peer_exact_ms", "titans-pytorch, batch_size=chunk", "^:")):
            pts = [(r["T"], r[field]) for r in rs if r.get(field)]
            if pts:
                ax.plot(*zip(*pts), style, label=label)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ts = sorted({r["T"] for r in records})
        ax.set_xlim(ts[0] / 1.4, ts[-1] * 1.4)
        lo, hi = ax.get_ylim()
        for r in rs:
            for name, y, va in (("ours", lo, "bottom"), ("peer", hi, "top")):
                why = " ".join(n for n in r["notes"] if n.startswith(name + ":")).lower()
                if r.get(f"{name}_ms") is None and why:
                    tag = "OOM" if ("memory" in why or "gib" in why) else "timeout" if "timeout" in why else "n/a"
                    ax.annotate(f"{name}: {tag}", (r["T"], y), ha="center", va=va, fontsize=7, color="gray")
        ax.set_xlabel("T (sequence length)")
        ax.set_ylabel("forward + backward, ms (median)")
        b = rs[0]["batch"] if rs else "?"
        ax.set_title(f"dim {dim}, chunk {chunk}, batch {b}, heads {rs[0]['heads'] if rs else '?'}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle(f"NeuralMemory forward+backward, CPU, {records[0]['threads'] if records else '?'} threads")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def print_table(records: list[dict]) -> None:
    def f(v, spec):
        return format(v, spec) if v is not None else "-"

    print(f"{'dim':>4} {'chunk':>5} {'T':>5} {'ours_ms':>10} {'peer_ms':>10} {'speedup':>8} {'compiled':>10} "
          f"{'speedup':>8} {'peer_exact':>10} {'GFLOP/s':>8} {'fr_large':>8} {'fr_small':>8} {'ceiling':>8}")
    for r in records:
        print(f"{r['dim']:>4} {r['chunk']:>5} {r['T']:>5} {f(r['ours_ms'], '10.1f')} {f(r['peer_ms'], '10.1f')} "
              f"{f(r['speedup'], '8.2f')} {f(r.get('ours_compiled_ms'), '10.1f')} {f(r.get('speedup_compiled'), '8.2f')} "
              f"{f(r['peer_exact_ms'], '10.1f')} {f(r['ours_gflops'], '8.2f')} "
              f"{f(r['frac_of_peak_large'], '8.3f')} {f(r['frac_of_peak_small'], '8.3f')} "
              f"{f(r.get('speedup_ceiling'), '8.1f')}")


# --------------------------------------------------------------------------- profile


def profile_ours(args: argparse.Namespace) -> None:
    """Print a torch.profiler summary of one forward+backward of ours at the first grid point."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    sys.path.insert(0, str(ROOT))
    from titans_ts import NeuralMemory

    torch.set_num_threads(args.threads)
    dim, chunk, T = args.dims[0], args.chunks[0], args.Ts[0]
    mem = NeuralMemory(dim=dim, heads=args.heads, depth=args.depth, hidden_mult=args.hidden_mult, chunk_size=chunk)
    x = torch.randn(args.batch, T, dim)
    mem(x)[0].sum().backward()  # warm
    mem.zero_grad(set_to_none=True)
    wait_for_quiet(args.quiet_threshold, args.max_wait_s)
    t0, busy0, self0 = time.perf_counter(), _cpu_busy_s(), time.process_time()
    mem(x)[0].sum().backward()
    plain = time.perf_counter() - t0
    mem.zero_grad(set_to_none=True)
    t1 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        mem(x)[0].sum().backward()
    wall = time.perf_counter() - t1
    others = ((_cpu_busy_s() - busy0) - (time.process_time() - self0)) / ((time.perf_counter() - t0) * (os.cpu_count() or 1))
    print(f"ours, dim {dim}, chunk {chunk}, batch {args.batch}, T {T}, {args.threads} threads: one forward+backward "
          f"took {plain:.2f} s, {wall:.2f} s under the profiler; other jobs used {max(0.0, others):.0%} of the cores")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.profile_rows))
    print("by input shapes:")
    print(prof.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total", row_limit=args.profile_rows))


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="smoke pass: dim 64, chunk 16, batch 2, T 96, 1 repeat; needs --out; never installs the peer")
    p.add_argument("--out", type=Path, default=None,
                   help=f"records JSON (siblings: <stem>_machine.json, <stem>.png); default {DEFAULT_OUT} (full run only)")
    p.add_argument("--peer", action=argparse.BooleanOptionalAction, default=True,
                   help="also time titans-pytorch (default on; in --quick only if its venv is already there)")
    p.add_argument("--no-install", action="store_true", help="never install the peer venv; skip the peer if absent")
    p.add_argument("--compiled", action=argparse.BooleanOptionalAction, default=None,
                   help="also time ours with compile_chunks=True (compiling in the untimed warmup step; "
                   "default on, off in --quick)")
    p.add_argument("--dims", type=int, nargs="+", default=None)
    p.add_argument("--chunks", type=int, nargs="+", default=None)
    p.add_argument("--Ts", type=int, nargs="+", default=None)
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--depth", type=int, default=2)
    p.add_argument("--hidden-mult", type=float, default=2.0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--warmup", type=int, default=None, help="untimed steps per point (default 1)")
    p.add_argument("--repeats", type=int, default=None, help="most timed steps per point (default 5; quick 1)")
    p.add_argument("--budget-s", type=float, default=None, help="stop repeating after this many timed seconds (default 10)")
    p.add_argument("--timeout-s", type=float, default=None, help="wall-clock limit per point per implementation (default 300)")
    p.add_argument("--mem-limit-gb", type=float, default=None, help="address-space cap per worker, GiB (default 14; quick 6)")
    p.add_argument("--quiet-threshold", type=float, default=0.15,
                   help="before each point wait until other jobs use less than this share of the cores")
    p.add_argument("--max-wait-s", type=float, default=None, help="longest such wait per point (default 120; quick 0)")
    p.add_argument("--max-contention", type=float, default=0.10,
                   help="re-run a point if other jobs used more than this share of the cores meanwhile")
    p.add_argument("--retries", type=int, default=None, help="re-runs of a contended point (default 1; quick 0)")
    p.add_argument("--peer-exact-max-T", type=int, default=None,
                   help="also time the peer with batch_size=chunk for T up to this (0: never; default 512; quick 0)")
    p.add_argument("--resume", action="store_true",
                   help="keep the points already in --out (same dim, chunk, batch, T) and run only the others; "
                   "points that other jobs disturbed (*_other_cpu_frac > --max-contention) are run again")
    p.add_argument("--profile", action="store_true",
                   help="only print a torch.profiler table of one forward+backward of ours at the first dim/chunk/T "
                   "(default dim 256, chunk 16, T 2048, batch 32), then exit")
    p.add_argument("--profile-rows", type=int, default=25)
    p.add_argument("--summary-only", action="store_true",
                   help="run nothing: recompute the derived fields of --out's records from its machine rates, "
                   "then rewrite --out, its PNG and print the table")
    args = p.parse_args(argv)
    if args.quick:
        if args.out is None:
            p.error("--quick needs --out PATH (it never writes the committed results)")
        defaults = dict(dims=[64], chunks=[16], Ts=[96], batch=2, warmup=1, repeats=1, budget_s=1.0,
                        timeout_s=180.0, mem_limit_gb=6.0, max_wait_s=0.0, retries=0, peer_exact_max_T=0)
    elif args.profile:
        defaults = dict(dims=[256], chunks=[16], Ts=[2048], batch=32, warmup=1, repeats=1, budget_s=1.0,
                        timeout_s=0.0, mem_limit_gb=0.0, max_wait_s=600.0, retries=0)
    else:
        defaults = dict(dims=[64, 256], chunks=[16, 64], Ts=[96, 512, 2048, 8192], batch=32, warmup=1, repeats=5,
                        budget_s=10.0, timeout_s=300.0, mem_limit_gb=14.0, max_wait_s=120.0, retries=1,
                        peer_exact_max_T=512)
    defaults["compiled"] = not args.quick
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.out is None:
        args.out = DEFAULT_OUT
    for d in args.dims:
        if d % args.heads:
            p.error(f"dim {d} is not a multiple of heads {args.heads}")
    return args


def machine_path(out: Path) -> Path:
    """The machine-rates file beside a records file: <stem>_machine.json."""
    return Path(f"{out.with_suffix('')}_machine.json")


def rebuild_summary(out: Path) -> int:
    """--summary-only: derived fields, PNG and table from the records and machine rates on disk."""
    mpath = machine_path(out)
    if not (out.exists() and mpath.exists()):
        print(f"--summary-only needs {out} and {mpath}; run the benchmark first", file=sys.stderr)
        return 2
    records = apply_rates(json.loads(out.read_text()), json.loads(mpath.read_text()))
    save(records, out)
    plot(records, Path(f"{out.with_suffix('')}.png"))
    print_table(records)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.profile:
        profile_ours(args)
        return 0
    if args.summary_only:
        return rebuild_summary(Path(args.out))
    t0 = time.perf_counter()
    source_fingerprint()
    records, rates, use_peer = bench(args)
    total = time.perf_counter() - t0
    out = Path(args.out)
    stem = out.with_suffix("")
    records = sorted(records, key=lambda r: (r["dim"], r["chunk"], r["batch"], r["T"]))
    save(records, out)
    machine = machine_info(args, rates, use_peer, total,
                           [".venv/bin/python", str(Path(__file__).relative_to(ROOT)), *argv])
    mpath = machine_path(out)
    runs = []
    if args.resume and mpath.exists():
        old = json.loads(mpath.read_text())
        runs = old.get("invocations") or [{k: old.get(k) for k in ("command", "total_run_s", "matmul_gflops_large")}]
    machine["invocations"] = runs + [{k: machine[k] for k in ("command", "total_run_s", "matmul_gflops_large")}]
    machine["total_run_s_all_invocations"] = sum(r["total_run_s"] or 0 for r in machine["invocations"])
    mpath.write_text(json.dumps(machine, indent=1) + "\n")
    plot(records, Path(f"{stem}.png"))
    print_table(records)
    print(f"[done] {len(records)} points in {total / 60:.1f} min -> {out}, {mpath}, {stem}.png", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
