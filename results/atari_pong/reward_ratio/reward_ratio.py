"""Would a likelihood ratio against a random-play video model remove Pong's "lose fast" optimum? A check
on saved frames, before any agent run.

The reward map (../reward_map) found that the expert video model pays the 12 steps after a point (ball gone,
the serve) far more than the VIPER agents' rallies: frames with no ball are easy to predict whoever lost the
point. A second video model trained on random play (same tokenizer, same recipe) predicts those frames just as
well, but not the expert's rallies. So the per-step ratio

    log p_expert(x_t | x_<t) - log p_random(x_t | x_<t)

should pay a reset about nothing and a rally by how expert-like it is. This script scores the same frames under
both models and reports, per source, the reward per step after a point and in rallies under each, and over
ε-degraded episodes the Spearman correlation of each reward per step with the game score. Rewards are the
agent's own (RewardModel.compute_rewards, conditional, bf16 as the VIPER Pong runs scored).

usage (from the repository root):
    python results/atari_pong/reward_ratio/reward_ratio.py OUT_DIR EXPERT_MODEL RANDOM_MODEL RUN_DIR[,RUN_DIR...] \
        [MAX_STEPS] [DEGRADED_PER_EPS]
writes OUT_DIR/summary.json
"""
import glob
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "..")))
sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "reward_map")))
import eval as ev  # noqa: E402  (load_reward_model, replay_episodes, load_episode, spearman)
from reward_map import AFTER_POINT, after_point  # noqa: E402  (the same split of steps as the reward map)


def score(models, frames, task, max_steps):
    """-> {model: log p per step [S]} for steps 12..min(T, max_steps), 'after a point' flags [S], game score."""
    import torch

    rm = next(iter(models.values()))
    first = (rm.seq_len - 1) * rm.frame_skip
    steps = np.arange(first, min(len(frames), max_steps + 1))
    clip = torch.from_numpy(np.ascontiguousarray(frames[: steps[-1] + 1]))[None]
    out = {k: m.compute_rewards(clip, "atari_pong")[0, first:].numpy() for k, m in models.items()}  # as the agent
    return out, after_point(task, steps), float(task[: steps[-1]].sum())


def summarise(per_step, after):
    s = {"steps": int(len(after)), "share_of_steps_after_point": float(after.mean())}
    for k, r in per_step.items():
        s[k] = {"per_step": float(r.mean()), "after_point": float(r[after].mean()) if after.any() else None,
                "rally": float(r[~after].mean())}
    return s


def main(out, expert_model, random_model, runs, max_steps=800, per_eps=2):
    import torch

    torch.set_num_threads(1)
    # bf16 scoring, as the VIPER Pong runs scored (`--reward-precision bf16`)
    models = {"expert_model": ev.load_reward_model(expert_model, cuda=False, task="atari_pong", precision="bf16"),
              "random_model": ev.load_reward_model(random_model, cuda=False, task="atari_pong", precision="bf16")}
    sources = {}
    for run in runs.split(","):
        sources[f"agent {os.path.basename(run.rstrip('/'))}"] = ev.replay_episodes(os.path.join(run, "replay.npz"), 2)
    held_out = {"expert (held-out)": "data/pong/experts/atari_pong/test/*.npz",
                "random (not in either model's data)": "data/pong/random/atari_pong/*/*.npz"}
    for name, pattern in held_out.items():
        sources[name] = [(v, r[1:]) for v, r in map(ev.load_episode, sorted(glob.glob(pattern))[:2])]
    degraded = {}
    for eps in ("0.0", "0.25", "0.5", "0.75", "1.0"):
        paths = sorted(glob.glob(f"data/pong/degraded/atari_pong/*/eps{eps}_*.npz"))[:per_eps]
        degraded[eps] = [(v, r[1:]) for v, r in map(ev.load_episode, paths)]
    summary = {"expert_model": expert_model, "random_model": random_model, "max_steps": max_steps,
               "after_point_steps": AFTER_POINT, "reward": "ratio = expert_model - random_model (nats per step)",
               "sources": {}, "degraded": {}}
    t0 = time.time()
    for name, episodes in sources.items():
        scored = [score(models, f, t, max_steps) for f, t in episodes]
        per_step = {k: np.concatenate([s[0][k] for s in scored]) for k in models}
        per_step["ratio"] = per_step["expert_model"] - per_step["random_model"]
        after = np.concatenate([s[1] for s in scored])
        summary["sources"][name] = dict(episodes=len(episodes), **summarise(per_step, after))
        print(f"{name}: {json.dumps(summary['sources'][name])}  ({time.time() - t0:.0f} s)", flush=True)
    rows = []
    for eps, episodes in degraded.items():
        for f, t in episodes:
            lp, after, game = score(models, f, t, max_steps)
            rows.append({"eps": float(eps), "game_score": game, "expert_model": float(lp["expert_model"].mean()),
                         "ratio": float((lp["expert_model"] - lp["random_model"]).mean())})
        print(f"eps {eps}: {rows[-len(episodes):]}  ({time.time() - t0:.0f} s)", flush=True)
    summary["degraded"] = {
        "episodes": rows,
        "spearman_per_step_vs_game_score": {k: ev.spearman([r[k] for r in rows], [r["game_score"] for r in rows])
                                            for k in ("expert_model", "ratio")}}
    print("Spearman (reward per step vs game score):", summary["degraded"]["spearman_per_step_vs_game_score"])
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)


if __name__ == "__main__":
    a = sys.argv[1:]
    main(a[0], a[1], a[2], a[3], *(int(x) for x in a[4:]))
