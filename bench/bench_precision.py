"""Does bf16 or torch.compile make train_viper_dreamer.py's update faster on this CPU? A measured answer.

Issue #13 asked for both: bf16 autocast where the CPU has native bf16 (AVX512-BF16 / AMX: bf16 matmuls
~2x fp32 on such hosts, ~70x slower on others), and compiling the sequential RSSM steps (obs_step and
img_step, called 32 + 15 times per update; compiled alone they saved nothing measurable, so the compiled
variant now compiles the whole world-model loss and imagination rollout around them). This script times, on one thread, one update of the oracle and
of VIPER (density + disagreement, `--disagreement-scale 1`) at a size, in three variants on the same batch, interleaved so that the
load of other jobs falls on all of them alike (medians of CPU seconds per update):

- fp32: the training script as it is;
- bf16: the same update under `torch.autocast("cpu", torch.bfloat16)`;
- compiled: fp32 with the training script's `--compile` (`compile_update`: `torch.compile` on the world-model
  loss and the imagination rollout; its compile time is printed).

and, alone, the part bf16 helps most: the Plan2Explore ensemble's disagreement (forward and backward) over
the imagined states of one update.

    python bench/bench_precision.py                 # size cpu (the recipe); the first compile takes 2-5 min
    python bench/bench_precision.py S --reps 2 --no-compile   # size S: an update takes 8-45 CPU s here
    python bench/bench_precision.py --profile --no-compile    # also: where an fp32 oracle update spends its time

Measured on an AMD EPYC with AVX512-BF16 (README, #13): at the recipe's size bf16 is slower than fp32
(the convolutions have 8-64 channels and every layer adds casts); at size S bf16 is ~2x faster, so the training
script stays fp32 on the CPU. Compiling the RSSM steps alone saved nothing measurable; the compiled variant
as `--compile` has it takes 0.75x the fp32 time (oracle) and 0.80x (VIPER with disagreement), 2026-12-08;
`--compile` stays off by default (it needs a C++ compiler and minutes of compiling; README).
"""
import argparse
import os
import statistics
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train_viper_dreamer as td  # noqa: E402
from bench_dreamer import random_replay  # noqa: E402

BATCH = {"cpu": (4, 32), "S": (16, 64)}  # the CPU recipe's batch; the paper's for S
VIPER = dict(reward="viper", reward_model="bench", disagreement_scale=1.0)  # the reward model is not used by an update


def cpu_has_bf16():
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return None
    return "avx512_bf16" in flags or "amx_bf16" in flags


def median_cpu_seconds(fns, reps):
    """{name: median CPU s} of each fn, called in rotating order `reps` times after one warm-up call each."""
    for fn in fns.values():
        fn()
    times = {k: [] for k in fns}
    names = list(fns)
    for i in range(reps):
        for k in names[i % len(names):] + names[:i % len(names)]:
            t = time.process_time()
            fns[k]()
            times[k].append(time.process_time() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("size", nargs="?", default="cpu", choices=sorted(td.SIZES))
    parser.add_argument("--reps", type=int, default=10, help="timed updates per variant")
    parser.add_argument("--no-compile", action="store_true", help="skip the compiled variant (its compile "
                                                                   "takes 1-4 min per agent)")
    parser.add_argument("--profile", action="store_true", help="print torch.profiler's table of 5 fp32 oracle "
                                                                "updates: where the CPU time goes")
    a = parser.parse_args()
    torch.set_num_threads(1)
    B, L = BATCH.get(a.size, BATCH["S"])
    print(f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}, native bf16 "
          f"(avx512_bf16/amx_bf16 in /proc/cpuinfo): {cpu_has_bf16()}, threads 1, load average "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores; size {a.size}, batch {B}x{L}\n")
    rng = np.random.default_rng(0)
    env = td.make_env("dmc_cartpole_balance", 0)
    act_dim, discrete = td.action_spec(env)
    replay = random_replay(rng, act_dim, max(600, 2 * L))
    batch = replay.sample(B, L, rng)
    header = f"{'agent':<8} {'fp32 CPU s':>10} {'bf16 CPU s':>10} {'bf16/fp32':>9} {'compiled':>9} {'comp/fp32':>9} {'compile s':>9}"
    print(header + "\n" + "-" * len(header))
    for name, flags in (("oracle", {}), ("VIPER", VIPER)):
        agents = {}
        for variant in ("fp32", "bf16", "compiled"):
            if variant == "compiled" and a.no_compile:
                continue
            torch.manual_seed(0)
            agents[variant] = td.Dreamer(td.Args(**{**td.preset(a.size, flags.get("reward", "task")), **flags}),
                                         act_dim, discrete)
        compile_s = float("nan")
        if "compiled" in agents:
            td.compile_update(agents["compiled"])  # what --compile does
            t = time.perf_counter()
            agents["compiled"].train_step(batch)
            compile_s = time.perf_counter() - t

        def update(variant):
            with torch.autocast("cpu", torch.bfloat16, enabled=variant == "bf16"):
                agents[variant].train_step(batch)

        if a.profile and name == "oracle":
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(5):
                    agents["fp32"].train_step(batch)
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12), flush=True)
        sec = median_cpu_seconds({v: (lambda v=v: update(v)) for v in agents}, a.reps)
        comp = sec.get("compiled", float("nan"))
        print(f"{name:<8} {sec['fp32']:>10.3f} {sec['bf16']:>10.3f} {sec['bf16'] / sec['fp32']:>9.2f} "
              f"{comp:>9.3f} {comp / sec['fp32']:>9.2f} {compile_s:>9.0f}", flush=True)

    # the ensemble alone: disagreement over one update's imagined states, forward + backward to its inputs
    size = td.SIZES[a.size]
    feat = size["deter"] + size["stoch"] * size["classes"]
    ens = td.init_weights(td.Ensemble(feat + act_dim, size["stoch"] * size["classes"], size["units"], size["layers"]))
    x = torch.randn(td.IMAG_HORIZON * B * L, feat + act_dim, requires_grad=True)

    def disagreement(bf16):
        with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
            d = ens.disagreement(x)
        d.sum().backward()

    sec = median_cpu_seconds({"fp32": lambda: disagreement(False), "bf16": lambda: disagreement(True)}, a.reps)
    print(f"\nensemble disagreement over {x.shape[0]} imagined states, forward + backward: fp32 {sec['fp32']:.3f} "
          f"CPU s, bf16 {sec['bf16']:.3f} CPU s ({sec['bf16'] / sec['fp32']:.2f}x)")


if __name__ == "__main__":
    main()
