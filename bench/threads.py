"""CPU threading settings for the entry points, quiet and under a competing job: ``python bench/threads.py``.

For each thread count (``--threads``, default 1 and 2) with OpenMP's default wait policy and with
``OMP_WAIT_POLICY=PASSIVE``, for batch 1 and batch 16, and for each load (``--loads``):

* ``quiet``: nothing started by this script (the machine may be shared: the 1-minute load average before each
  measurement and the CPU other processes used during it are recorded);
* ``torch``: a competing torch job, one process looping over 512x512 float32 matmuls with one thread per core and
  the default wait policy (another torch program run with the defaults);
* ``python``: one pure-Python busy loop per core.

each measurement is a fresh subprocess (the threading variables must be set before torch is imported) that loads
the embedded model with ``erasure.diffusion.pipeline.load_pipeline``, warms up with one 3-step call at the
measured batch size, then times ``generate`` at 25 steps, CFG 7.5 (``--repeats`` calls at batch 1, median seconds
per image; ``--batch-repeats`` calls at batch 16, images per second from the median call). A call that exceeds
``--cap`` (batch 1) or ``--batch-cap`` (batch 16) seconds is stopped and reported as "> cap". The competitor's
own throughput during each measurement is recorded too (relative to running alone), since a setting that is fast
for us may starve the other job.

Writes ``bench/results/threads.json`` and ``bench/results/threads.md``; ratios are against the entry points'
default (``erasure.threads``: 1 thread with PASSIVE on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import resource
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "a photo of a striped red circle"
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def emit(**kw) -> None:
    print(json.dumps(kw), flush=True)


# --------------------------------------------------------------------------------------------- subprocesses


def worker(batch: int, repeats: int, steps: int, guidance: float) -> int:
    """One measurement: load, warm up, time ``repeats`` calls; one JSON line per event on stdout."""
    t = time.perf_counter()
    import torch

    sys.path.insert(0, str(ROOT))
    from erasure.diffusion.pipeline import generate, load_pipeline
    from erasure.shapes import default_model_path

    pipe = load_pipeline(str(default_model_path()), device="cpu")
    emit(event="loaded", seconds=time.perf_counter() - t, torch_threads=torch.get_num_threads(),
         parallel_info=torch.__config__.parallel_info())
    seeds = list(range(batch))
    t = time.perf_counter()
    generate(pipe, PROMPT, seeds, steps=3, guidance=guidance, batch_size=batch)
    emit(event="warmup", seconds=time.perf_counter() - t)
    for r in range(repeats):
        seeds = list(range(1000 + r * batch, 1000 + (r + 1) * batch))
        t = time.perf_counter()
        generate(pipe, PROMPT, seeds, steps=steps, guidance=guidance, batch_size=batch)
        emit(event="call", seconds=time.perf_counter() - t)
    return 0


def load_job(kind: str) -> int:
    """A competing job that prints ``{"count": N, "t": seconds}`` every 0.5 s until it is terminated."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    count, start, last = 0, time.perf_counter(), 0.0
    if kind == "torch":
        import torch

        a, b = torch.randn(512, 512), torch.randn(512, 512)
        while True:
            torch.mm(a, b)
            count += 1
            now = time.perf_counter()
            if now - last >= 0.5:
                last = now
                emit(count=count, t=now - start)
    else:
        x = 0
        while True:
            for _ in range(100_000):
                x += 1
            count += 1
            now = time.perf_counter()
            if now - last >= 0.5:
                last = now
                emit(count=count, t=now - start)


# --------------------------------------------------------------------------------------------- driver


def base_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in THREAD_VARS}
    env["HF_HUB_OFFLINE"] = "1"
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def cpu_busy_seconds() -> float:
    """CPU time (all cores) spent not idle since boot, from /proc/stat."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    busy = sum(fields[:8]) - idle  # user nice system idle iowait irq softirq steal
    return busy / os.sysconf("SC_CLK_TCK")


class Lines:
    """Reads a child's JSON lines on a thread; ``get(timeout)`` returns the next one or None."""

    def __init__(self, proc: subprocess.Popen):
        self.q: queue.Queue = queue.Queue()
        self.last: dict | None = None
        threading.Thread(target=self._read, args=(proc,), daemon=True).start()

    def _read(self, proc):
        for line in proc.stdout:
            try:
                d = json.loads(line)
            except json.JSONDecodeError:
                continue
            self.last = d
            self.q.put(d)
        self.q.put(None)

    def get(self, timeout: float):
        try:
            return self.q.get(timeout=max(0.01, timeout))
        except queue.Empty:
            return "timeout"


class Competitor:
    def __init__(self, kind: str, n: int):
        self.kind = kind
        env = base_env()
        if kind == "torch":
            env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(n)  # one thread per core, default wait policy
            count = 1
        else:
            count = n  # one busy loop per core
        self.procs = [subprocess.Popen([sys.executable, __file__, "--load-job", kind], env=env, stdout=subprocess.PIPE,
                                       text=True, start_new_session=True) for _ in range(count)]
        self.lines = [Lines(p) for p in self.procs]

    def sample(self) -> tuple[float, float]:
        """(total iterations, summed seconds) of the last reports."""
        last = [ln.last or {"count": 0, "t": 0.0} for ln in self.lines]
        return sum(d["count"] for d in last), max(d["t"] for d in last)

    def rate_over(self, seconds: float) -> float:
        c0, t0 = self.sample()
        time.sleep(seconds)
        c1, t1 = self.sample()
        return (c1 - c0) / max(t1 - t0, 1e-9)

    def stop(self):
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def measure(threads: int, passive: bool, batch: int, repeats: int, cap: float, args, competitor) -> dict:
    env = base_env()
    env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    if passive:
        env["OMP_WAIT_POLICY"] = "PASSIVE"
    cmd = [sys.executable, __file__, "--worker", "--batch", str(batch), "--repeats", str(repeats),
           "--steps", str(args.steps), "--guidance", str(args.guidance)]
    res: dict = {"threads": threads, "omp_wait_policy": "PASSIVE" if passive else "default", "batch": batch,
                 "cap_seconds_per_call": cap, "loadavg_before": os.getloadavg()}
    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    busy0, wall0 = cpu_busy_seconds(), time.perf_counter()
    comp0 = competitor.sample() if competitor else None
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    err_lines: list[str] = []
    threading.Thread(target=lambda: err_lines.extend(proc.stderr), daemon=True).start()
    lines = Lines(proc)
    calls: list[float] = []
    status = "ok"
    deadline = time.perf_counter() + args.load_cap
    while True:
        d = lines.get(deadline - time.perf_counter())
        if d is None:
            break
        if d == "timeout":
            status = "capped"
            break
        if d["event"] == "loaded":
            res["load_seconds"], res["torch_threads"] = d["seconds"], d["torch_threads"]
            res["parallel_info"] = d["parallel_info"]
        elif d["event"] == "warmup":
            res["warmup_seconds"] = d["seconds"]
        else:
            calls.append(d["seconds"])
        deadline = time.perf_counter() + cap  # the next event is a 25-step (or 3-step warm-up) call
    if status == "capped":
        os.killpg(proc.pid, signal.SIGKILL)
    rc = proc.wait()
    time.sleep(0.05)
    wall = time.perf_counter() - wall0
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    own_cpu = (ru1.ru_utime + ru1.ru_stime) - (ru0.ru_utime + ru0.ru_stime)
    res["wall_seconds"] = wall
    res["own_cpu_cores"] = own_cpu / wall
    res["other_cpu_cores"] = max(0.0, (cpu_busy_seconds() - busy0 - own_cpu) / wall)  # everything else, competitor too
    if competitor:
        c1 = competitor.sample()
        res["competitor_rate"] = (c1[0] - comp0[0]) / max(c1[1] - comp0[1], 1e-9)
    res["calls_seconds"] = calls
    if status == "ok" and (rc != 0 or len(calls) < repeats):
        status = "error"
        res["stderr_tail"] = "".join(err_lines)[-2000:]
    res["status"] = status
    if calls and status == "ok":
        med = statistics.median(calls)
        res["seconds_per_image"] = med / batch
        res["images_per_second"] = batch / med
    return res


def fmt_cell(r: dict, ref: dict | None) -> str:
    if r["status"] == "capped":
        s = f"> {r['cap_seconds_per_call']:.0f} s/call"
        if ref and ref.get("seconds_per_image"):
            s += f" (> {r['cap_seconds_per_call'] / r['batch'] / ref['seconds_per_image']:.0f}x)"
        return s
    if r["status"] != "ok":
        return "error"
    v = f"{r['seconds_per_image']:.2f} s/img" if r["batch"] == 1 else f"{r['images_per_second']:.2f} img/s"
    if ref and ref.get("seconds_per_image") and ref is not r:
        v += f" ({r['seconds_per_image'] / ref['seconds_per_image']:.2f}x)"
    elif ref is r:
        v += " (1.00x)"
    return v


def table(results: list[dict], loads: list[str], threads: list[int], default: tuple[int, bool]) -> str:
    out = ["| setting | " + " | ".join(f"{ld}, batch {b}" for ld in loads for b in (1, 16)) + " |",
           "|---|" + "---|" * (2 * len(loads))]
    key = {(r["load"], r["threads"], r["omp_wait_policy"], r["batch"]): r for r in results}
    dpol = "PASSIVE" if default[1] else "default"
    for n in threads:
        for pol in ("default", "PASSIVE"):
            name = f"{n} thread{'s' if n > 1 else ''}, {pol} policy" + (" **(current default)**" if (n, pol) == (
                default[0], dpol) else "")
            cells = []
            for ld in loads:
                for b in (1, 16):
                    r = key.get((ld, n, pol, b))
                    ref = key.get((ld, default[0], dpol, b))
                    cells.append(fmt_cell(r, ref) if r else "-")
            out.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def context_table(results: list[dict]) -> str:
    out = ["| load | setting | batch | load avg (1 min) before | other CPU during (cores) | own CPU (cores) "
           "| competitor speed vs alone |", "|---|---|---|---|---|---|---|"]
    for r in results:
        comp = f"{r['competitor_relative']:.2f}" if r.get("competitor_relative") is not None else "-"
        out.append(f"| {r['load']} | {r['threads']} thr, {r['omp_wait_policy']} | {r['batch']} | "
                   f"{r['loadavg_before'][0]:.2f} | {r['other_cpu_cores']:.2f} | {r['own_cpu_cores']:.2f} | {comp} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", default="1,2", help="comma-separated thread counts")
    ap.add_argument("--loads", default="quiet,torch,python", help="comma-separated: quiet, torch, python")
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--guidance", type=float, default=7.5)
    ap.add_argument("--repeats", type=int, default=3, help="timed batch-1 calls (median)")
    ap.add_argument("--batch-repeats", type=int, default=2, help="timed batch-16 calls (median)")
    ap.add_argument("--cap", type=float, default=20.0, help="seconds allowed per batch-1 call (warm-up included)")
    ap.add_argument("--batch-cap", type=float, default=60.0, help="seconds allowed per batch-16 call")
    ap.add_argument("--load-cap", type=float, default=120.0, help="seconds allowed for torch import + model load")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "threads"), help="writes OUT.json and OUT.md")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--batch", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--load-job", choices=("torch", "python"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return worker(args.batch, args.repeats, args.steps, args.guidance)
    if args.load_job:
        return load_job(args.load_job)

    sys.path.insert(0, str(ROOT))
    from erasure.io import atomic_write_json, atomic_write_text, environment_info
    from erasure.threads import default_threads

    n = cores()
    threads = [int(x) for x in args.threads.split(",")]
    loads = args.loads.split(",")
    default = (default_threads(n), True)
    results: list[dict] = []
    competitors: dict[str, float] = {}
    t_start = time.perf_counter()
    for ld in loads:
        comp = None
        if ld != "quiet":
            comp = Competitor(ld, n)
            time.sleep(2.0)
            competitors[ld] = comp.rate_over(3.0)
            print(f"[{ld}] competitor alone: {competitors[ld]:.1f} it/s", flush=True)
        try:
            for b in (1, 16):
                for nt in threads:
                    for passive in (False, True):
                        r = measure(nt, passive, b, args.repeats if b == 1 else args.batch_repeats,
                                    args.cap if b == 1 else args.batch_cap, args, comp)
                        r["load"] = ld
                        if comp:
                            r["competitor_relative"] = r["competitor_rate"] / competitors[ld]
                        results.append(r)
                        print(f"[{ld}] threads={nt} policy={r['omp_wait_policy']} batch={b}: {fmt_cell(r, None)} "
                              f"status={r['status']} loadavg={r['loadavg_before'][0]:.2f} "
                              f"other_cpu={r['other_cpu_cores']:.2f} ({time.perf_counter() - t_start:.0f} s)",
                              flush=True)
                        if r["status"] == "error":
                            print(r.get("stderr_tail", ""), file=sys.stderr)
        finally:
            if comp:
                comp.stop()
    res = {
        "cores": n, "default": {"threads": default[0], "omp_wait_policy": "PASSIVE"},
        "steps": args.steps, "guidance": args.guidance, "repeats": args.repeats, "batch_repeats": args.batch_repeats,
        "competitor_alone_rate": competitors, "total_seconds": time.perf_counter() - t_start,
        "results": results, **environment_info(),
    }
    out = Path(args.out)
    atomic_write_json(out.with_suffix(".json"), res)
    md = (f"# CPU threading ({n} cores, embedded model, DDIM {args.steps} steps, CFG {args.guidance})\n\n"
          "Batch 1: median seconds per image; batch 16: images per second. In brackets: time per image relative to "
          f"the current default ({default[0]} thread, PASSIVE) under the same load (> 1 is slower).\n\n"
          + table(results, loads, threads, default)
          + "\n\nLoad during each measurement (the machine is shared: 'quiet' means nothing started by this script; "
            "'other CPU' is the CPU all other processes used during the measurement, competitor included):\n\n"
          + context_table(results) + "\n")
    atomic_write_text(out.with_suffix(".md"), md)
    print(md)
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
