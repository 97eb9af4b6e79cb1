"""Each evaluation episode's target and return, from an `eval.py agent` summary.json on dmc_reacher_easy.

    MUJOCO_GL=egl python results/dmc_reacher_easy/training_targets/eval_targets.py SUMMARY.json OUT.csv

Episode i of the evaluation was reset with seed `seeds[i]` of the summary (summaries written before eval.py
recorded the seeds used 10000 + i, the eval's default `--seed`), so its target is read back from the physics.
The distance from the arm's base splits the 20 eval seeds' targets into near (<= 0.077) and far (>= 0.094)."""
import csv
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "..")))
import train_viper_dreamer as td  # noqa: E402

summary = json.load(open(sys.argv[1]))
returns = summary["returns"]
seeds = summary.get("seeds", [10_000 + i for i in range(len(returns))])
env = td.make_env("dmc_reacher_easy", seeds[0])
with open(sys.argv[2], "w", newline="") as f:
    w = csv.writer(f, lineterminator="\n")
    w.writerow(["seed", "target_x", "target_y", "target_distance_from_centre", "return"])
    for seed, ret in zip(seeds, returns):
        env.reset(seed=seed)
        x, y = env.unwrapped._env.physics.named.model.geom_pos["target"][:2]
        w.writerow([seed, f"{x:.4f}", f"{y:.4f}", f"{np.hypot(x, y):.4f}", f"{ret:.1f}"])
print(f"wrote {sys.argv[2]}")
