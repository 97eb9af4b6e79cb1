"""Benchmark of train_viper_dreamer.py on this machine: updates/s, env steps/s, and the projected time of
100k env steps on dmc_cartpole_balance.

An update = world model + imagination + actor + critic on one replayed batch (random frames: speed does
not depend on content). Env steps/s = the acting loop alone (render + policy forward), no training.
Both run with torch threads = 1 (the script's default): in fp32 on CPU, or with `cuda` on the GPU with the
training script's bf16 autocast. CPU seconds are reported next to wall seconds because the cores are
shared: wall time is what this moment's load allowed.

    python bench/bench_dreamer.py            # ~1-2 min on 2 CPU cores
    python bench/bench_dreamer.py cuda       # on a GPU
"""
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train_viper_dreamer as td  # noqa: E402

# name, size, batch_size, batch_length, train_ratio (replayed steps per env step), timed updates
CONFIGS = [
    ("cpu, recipe", "cpu", 4, 32, 64.0, 8),
    ("cpu, batch 8", "cpu", 8, 32, 64.0, 6),
    ("cpu, batch 16", "cpu", 16, 32, 64.0, 6),
    ("cpu, paper batch", "cpu", 16, 64, 32.0, 3),
    ("S, paper batch", "S", 16, 64, 512.0, 1),
]
ENV_ID, TOTAL = "dmc_cartpole_balance", 100_000


def timed(fn, n):
    fn()  # warm-up
    w, c = time.perf_counter(), time.process_time()
    for _ in range(n):
        fn()
    return (time.perf_counter() - w) / n, (time.process_time() - c) / n


def main():
    device = torch.device(sys.argv[1] if len(sys.argv) > 1 else "cpu")
    reps = 10 if device.type == "cuda" else 1  # more timed updates where they are cheap
    torch.set_num_threads(1)
    td.keep_freed_memory()
    rng = np.random.default_rng(0)
    env = td.make_env(ENV_ID, 0)
    act_dim, discrete = td.action_spec(env)
    replay = td.Replay(2000, (64, 64, 3), act_dim, ["reward"])
    for t in range(1000):
        replay.add(image=rng.integers(0, 256, (64, 64, 3), dtype=np.uint8), action=rng.uniform(-1, 1, act_dim),
                   reward=float(rng.random()), is_first=t % 500 == 0, is_terminal=False)
    print(f"{ENV_ID}, torch {torch.__version__}, device {device}"
          f"{' (' + torch.cuda.get_device_name() + ')' if device.type == 'cuda' else ''}, threads {torch.get_num_threads()}, load average "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores\n")
    header = (f"{'config':<18} {'batch':>6} {'params':>7} {'upd/s':>6} {'CPU s/upd':>9} {'env st/s':>8} "
              f"{'ratio':>5} {'updates':>7} {'100k steps, h':>13}")
    print(header + "\n" + "-" * len(header))
    for name, size, B, L, ratio, n in CONFIGS:
        torch.manual_seed(0)
        agent = td.Dreamer(td.Args(size=size), act_dim, discrete).to(device)
        params = sum(p.numel() for p in agent.parameters()) / 1e6
        upd_wall, upd_cpu = timed(lambda: agent.train_step(replay.sample(B, L, rng)), n * reps)  # .item(): synced
        obs, _ = env.reset(seed=0)
        state = {"obs": obs, "carry": None}

        def act(k=50):
            for _ in range(k):
                action, state["carry"] = agent.policy(state["obs"], state["carry"], explore=True)
                state["obs"], *_ = env.step(td.env_action(action, discrete))

        step_wall, step_cpu = timed(act, 4)
        step_wall, step_cpu = step_wall / 50, step_cpu / 50
        updates = (TOTAL - td.Args().prefill) * ratio / (B * L)
        hours = (TOTAL * step_wall + updates * upd_wall) / 3600
        print(f"{name:<18} {B:>3}x{L:<2} {params:>6.1f}M {1 / upd_wall:>6.2f} {upd_cpu:>9.2f} {1 / step_wall:>8.0f} "
              f"{ratio:>5.0f} {updates:>7.0f} {hours:>13.2f}", flush=True)
    print("\n100k steps = acting + updates at these rates (evaluation, ~5% more, not included).")


if __name__ == "__main__":
    main()
