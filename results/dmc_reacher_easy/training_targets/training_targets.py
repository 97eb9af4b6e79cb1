"""Near and far targets in a reacher run's training episodes (sampled actions), per 20k env steps.

    MUJOCO_GL=egl python results/dmc_reacher_easy/training_targets/training_targets.py OUT.csv RUN:SEED ...

RUN is a folder with the run's episodes.csv (e.g. results/dmc_reacher_easy/oracle_s0) and SEED its --seed:
training episode i was reset with episode_seed(SEED, i), so its target is read back from the physics. Near
means within 0.08 of the arm's base (the 20 eval seeds' targets split at 0.077 / 0.094); an episode counts
as reached with a true return >= 500, and in the bin of its last step."""
import csv
import os
import sys

import numpy as np

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "..")))
import train_viper_dreamer as td  # noqa: E402

NEAR, REACHED, BIN = 0.08, 500.0, 20_000
env = td.make_env("dmc_reacher_easy", 1)
with open(sys.argv[1], "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["run", "steps", "near_episodes", "near_reached", "near_mean_return", "far_episodes", "far_reached",
                "far_mean_return"])
    for spec in sys.argv[2:]:
        run, seed = spec.rsplit(":", 1)
        rows = list(csv.DictReader(open(os.path.join(run, "episodes.csv"))))
        ep = []
        for i, r in enumerate(rows):
            env.reset(seed=td.episode_seed(int(seed), i))
            x, y = env.unwrapped._env.physics.named.model.geom_pos["target"][:2]
            ep.append((int(r["step"]), np.hypot(x, y), float(r["return"])))
        ep = np.array(ep)
        bins = (ep[:, 0] - 1) // BIN
        for b in np.unique(bins):
            row = [os.path.basename(run.rstrip("/")), f"{int(b) * BIN // 1000}-{(int(b) + 1) * BIN // 1000}k"]
            for sel in (ep[:, 1] <= NEAR, ep[:, 1] > NEAR):
                m = (bins == b) & sel
                row += [int(m.sum()), int((ep[m, 2] >= REACHED).sum()), round(float(ep[m, 2].mean()), 1) if m.any() else ""]
            w.writerow(row)
            print(*row, sep="\t")
