"""One run on two threads, or two runs on one thread each? A measured answer for this machine.

Issue #13 asked which to use when. Three ways to spend 2 cores on the CPU recipe's work (an update of the
oracle at `--size cpu`, batch 4x32, and the acting loop: render + policy forward per env step):

- one run, 1 thread, the other core idle;
- one run, `--threads 2`;
- two runs at once, 1 thread each (two processes started together, as two seeds would be).

For each it prints the wall ms per update and per env step, and the throughput in updates per second summed
over the runs. One run on 2 threads is worth it when its speed-up over 1 thread is large; two runs on 1
thread each always do more work in total unless they slow each other down. Needs the cores idle: other jobs
make every number here slower, not just noisier.

    python bench/bench_threads.py          # ~1.5 min on idle cores
"""
import multiprocessing as mp
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train_viper_dreamer as td  # noqa: E402
from bench_dreamer import random_replay  # noqa: E402

ENV_ID, B, L = "dmc_cartpole_balance", 4, 32
UPDATES, STEPS = 100, 500  # timed per run


def measure(threads, updates, steps, start=None):
    """(wall ms per update, wall ms per env step) of an oracle at the CPU recipe on `threads` threads."""
    torch.set_num_threads(threads)
    rng = np.random.default_rng(0)
    env = td.make_env(ENV_ID, 0)
    act_dim, discrete = td.action_spec(env)
    replay = random_replay(rng, act_dim, 600, density=False)
    torch.manual_seed(0)
    agent = td.Dreamer(td.Args(**td.preset("cpu", "task")), act_dim, discrete)
    batches = [replay.sample(B, L, rng) for _ in range(4)]
    agent.train_step(batches[0])  # warm-up
    if start is not None:  # two processes: time the same stretch of work together
        start.wait()
    t = time.perf_counter()
    for i in range(updates):
        agent.train_step(batches[i % 4])
    upd_ms = 1000 * (time.perf_counter() - t) / updates
    obs, _ = env.reset(seed=0)
    carry = None
    t = time.perf_counter()
    for _ in range(steps):
        action, carry = agent.policy(obs, carry, explore=True)
        obs, *_ = env.step(td.env_action(action, discrete))
    return upd_ms, 1000 * (time.perf_counter() - t) / steps


def worker(threads, updates, steps, start, out):
    out.put(measure(threads, updates, steps, start))


def main():
    print(f"torch {torch.__version__}, {os.cpu_count()} cores, load average before {os.getloadavg()[0]:.1f}; "
          f"oracle update at size cpu, batch {B}x{L}; {UPDATES} updates and {STEPS} env steps per run\n")
    header = f"{'setup':<28} {'ms/update':>9} {'ms/env step':>11} {'updates/s, all runs':>19}"
    print(header + "\n" + "-" * len(header))
    rows = {}  # setup: (ms per update, ms per env step, updates/s over all its runs)

    def row(name, upd, step, rate):
        rows[name] = (upd, step, rate)
        print(f"{name:<28} {upd:>9.1f} {step:>11.2f} {rate:>19.2f}", flush=True)

    for name, threads in (("one run, 1 thread", 1), ("one run, 2 threads", 2)):
        upd, step = measure(threads, UPDATES, STEPS)
        row(name, upd, step, 1000 / upd)
    ctx = mp.get_context("spawn")
    start, out = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=worker, args=(1, UPDATES, STEPS, start, out)) for _ in range(2)]
    for p in procs:
        p.start()
    results = [out.get() for _ in procs]
    for p in procs:
        p.join()
    row("two runs, 1 thread each", *(float(np.mean([r[i] for r in results])) for i in range(2)),
        sum(1000 / r[0] for r in results))
    one, two, pair = rows["one run, 1 thread"], rows["one run, 2 threads"], rows["two runs, 1 thread each"]
    print(f"\n2 threads speed one run's update up {one[0] / two[0]:.2f}x; two 1-thread runs do "
          f"{pair[2] / two[2]:.2f}x the updates per second of one 2-thread run "
          f"(each of them {pair[0] / one[0]:.2f}x slower than alone)")


if __name__ == "__main__":
    main()
