"""Same-seed fp32 vs bf16 reward scoring on dmc_cartpole_balance (issue #13's learning check).

Both runs use seed 0, one thread, the same reward model and flags but --reward-precision. Their prefill
(random actions from the same seed) plays the same frames, so the stored rewards of those steps compare bf16
with fp32 scoring on identical inputs; after the first update the runs diverge as two seeds would. Also the
evals (eval.csv), the 20-episode final evaluations and the training episodes' returns per 10k steps.

usage (from the repository root): python results/dmc_cartpole_balance/bf16_check/compare.py \
    runs/balance_viper_fp32_s0 runs/balance_viper_bf16_s0 OUT.json
"""
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "..")))
import eval as ev  # noqa: E402  (read_eval_csv, read_episodes: the project's own readers of a run's files)


def main(fp32_run, bf16_run, out):
    a, b = np.load(os.path.join(fp32_run, "replay.npz")), np.load(os.path.join(bf16_run, "replay.npz"))
    n = 2505  # the prefill's 2,500 steps and its 5 reset frames (500-step episodes), stored first
    same = (a["image"][:n] == b["image"][:n]).all(axis=(1, 2, 3))
    scored = same & ~a["is_first"][:n]  # a reset frame has no reward
    diff = np.abs(a["density"][:n][scored] - b["density"][:n][scored])
    summary = {"prefill_frames_identical": int(same.sum()), "prefill_frames": n, "scored_steps": int(scored.sum()),
               "fp32_reward_range": [float(a["density"][:n][scored].min()), float(a["density"][:n][scored].max())],
               "abs_diff_mean": float(diff.mean()), "abs_diff_p99": float(np.percentile(diff, 99)),
               "abs_diff_max": float(diff.max())}
    for name, run in (("fp32", fp32_run), ("bf16", bf16_run)):
        evals = ev.read_eval_csv(os.path.join(run, "eval.csv"))
        episodes = ev.read_episodes(run)
        step, ret, vip = episodes["step"], episodes["return"], episodes["viper_return"]
        bins = [(0, 10000), (10000, 20000), (20000, 30000)]
        summary[name] = {"evals": evals,
                         "train_return_by_10k": [round(float(ret[(step > lo) & (step <= hi)].mean()), 1) for lo, hi in bins],
                         "viper_return_by_10k": [round(float(vip[(step > lo) & (step <= hi)].mean())) for lo, hi in bins]}
        final = os.path.join(run, "eval_30k", "summary.json")
        if os.path.isfile(final):
            s = json.load(open(final))
            summary[name]["final_20"] = [round(s["mean_return"], 1), round(s["std_return"], 1)]
    with open(out, "w") as f:
        json.dump(summary, f, indent=1)
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main(*sys.argv[1:4])
