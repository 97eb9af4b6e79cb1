"""VIPER reward scoring in fp32 or bf16 (train_viper_dreamer.py --reward-precision): time and accuracy.

Issue #13 asked for bf16 reward-model inference where it is faster and the rewards stay within 0.05 nats.
With a trained video model this script scores held-out expert and random episodes twice, fp32 and bf16
(the transformer blocks under bf16 autocast; the output layer, the log-probabilities and the VQ-GAN encoder
in fp32, as `RewardModel(bf16=True)` does), and prints

- the reward differences per step (mean, 99th percentile, max of |bf16 - fp32|, nats);
- the wall time per scored step the way the agent scores: one new step at a time, its window as context
  (fp32 and bf16 interleaved, so other jobs' load falls on both alike; best of the repeats).

    python bench/bench_reward_precision.py --reward-model runs/pong/videogpt16_4k/videogpt.pt \\
        --data-dir data/pong/experts --random-dir data/pong/random

Speed depends on the CPU: bf16 pays only where it is native (avx512_bf16 / amx_bf16 in /proc/cpuinfo).
"""
import argparse
import glob
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train_viper_dreamer as td  # noqa: E402


def episodes(data_dir, split, n):
    files = sorted(glob.glob(os.path.join(data_dir, "*", split, "*.npz")))
    if not files:
        sys.exit(f"error: no {split} episodes (*/{split}/*.npz) under {data_dir}")
    return files[:n]


def task(path):
    """<dir>/<task>/<split>/x.npz -> <task>, the label a class-conditional model scores the episode with."""
    return os.path.basename(os.path.dirname(os.path.dirname(path)))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--reward-model", required=True, help="videogpt.pt (train_videogpt.py)")
    p.add_argument("--data-dir", required=True, help="expert episodes: held-out ones under <task>/test")
    p.add_argument("--random-dir", help="random-policy episodes (<task>/train)")
    p.add_argument("--steps", type=int, default=300, help="steps scored per episode (its first ones)")
    p.add_argument("--timed-steps", type=int, default=60, help="steps timed one at a time, per repeat")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    rm = td.load_videogpt(torch.load(a.reward_model, map_location="cpu", weights_only=False), torch.device("cpu"))
    files = episodes(a.data_dir, "test", 4) + (episodes(a.random_dir, "train", 2) if a.random_dir else [])
    print(f"{a.reward_model}: {len(files)} episodes x {a.steps} steps; native bf16: "
          f"{td.native_bf16(torch.device('cpu'))}; {a.threads} thread(s)")
    diffs = []
    for f in files:
        codes = rm.encode(np.load(f)["video"][:a.steps][None])
        rm.bf16 = False
        r32 = rm.rewards_from_codes(codes, task(f))
        rm.bf16 = True
        r16 = rm.rewards_from_codes(codes, task(f))
        diffs.append((r16 - r32).abs().flatten())
        print(f"  {f}: mean reward fp32 {r32.mean():.3f}, bf16 {r16.mean():.3f}")
    d = torch.cat(diffs)
    keep = (rm.seq_len - 1) * rm.frame_skip + 1  # the codes a window can reach, as StepRewards keeps them
    codes = rm.encode(np.load(files[0])["video"][:keep + a.timed_steps][None])[0]
    label = task(files[0])
    best = {False: float("inf"), True: float("inf")}
    for _ in range(a.reps):
        for bf16 in (False, True):
            rm.bf16 = bf16
            t0 = time.perf_counter()
            for t in range(keep, len(codes)):
                window = codes[t - keep + 1:t + 1]
                rm.rewards_from_codes(window[None], label, first_step=len(window) - 1)
            best[bf16] = min(best[bf16], (time.perf_counter() - t0) / (len(codes) - keep))
    print(f"\n| precision | ms per scored step | |reward - fp32| mean / 99th pct / max (nats) |")
    print(f"|---|---|---|")
    print(f"| fp32 | {1000 * best[False]:.1f} | 0 |")
    print(f"| bf16 | {1000 * best[True]:.1f} ({best[True] / best[False]:.2f}x) | "
          f"{d.mean():.3f} / {d.quantile(0.99):.3f} / {d.max():.3f} (over {len(d)} steps) |")


if __name__ == "__main__":
    main()
