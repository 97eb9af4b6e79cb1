"""Where in the frame does a VIPER Pong agent lose reward against the expert? Per-token log-likelihood maps.

For each step t of an episode (t >= 12, a full window of 4 frames, frame skip 4), the video model's log p of
every token of frame t given the window's earlier frames (eval.py's token_log_probs: the agent's conditional
reward is the sum of these 256 numbers). Averaged over the agent's last replayed episodes and over the expert's
held-out episodes, the two 16x16 maps and their difference say which part of the frame costs the agent its
reward. Each token covers 4x4 pixels: token columns 13-14 hold the agent's (right, green) paddle, 1-2 the
built-in opponent's, token rows 0-1 are the masked score. It also splits the reward per step by whether a point
was scored within the last 12 steps (the ball's reset and serve) or not (rally), from the game reward.

usage (from the repository root): python results/atari_pong/reward_map/reward_map.py OUT_DIR REWARD_MODEL \
    RUN_DIR [AGENT_EPISODES] [EXPERT_EPISODES] [MAX_STEPS]
writes OUT_DIR/summary.json and OUT_DIR/reward_map.png
"""
import glob
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "..")))
import eval as ev  # noqa: E402  (token_log_probs, replay_episodes, load_episode: the project's own readers)

AFTER_POINT = 12  # steps after a point during which the frame shows the reset and the serve


def maps_and_rewards(rm, frames, task, max_steps):
    """-> per-token maps [S, 16, 16] for steps 12..min(T, max_steps), their sums, and 'after a point' flags."""
    first = (rm.seq_len - 1) * rm.frame_skip
    steps = np.arange(first, min(len(frames), max_steps + 1))
    maps = ev.token_log_probs(rm, frames, "atari_pong", steps)
    return maps, maps.sum((1, 2)), after_point(task, steps)


def after_point(task, steps):
    """[len(steps)] bool: was a point scored within the AFTER_POINT steps before each step (game reward task)."""
    point = np.flatnonzero(task != 0) + 1  # task[i] is the reward of arriving at frame i + 1
    return np.array([np.any((t - point >= 0) & (t - point < AFTER_POINT)) for t in steps])


def main(out, model, run, n_agent=2, n_expert=2, max_steps=800):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    torch.set_num_threads(1)
    rm = ev.load_reward_model(model, cuda=False, task="atari_pong")
    sources = {"agent": ev.replay_episodes(os.path.join(run, "replay.npz"), n_agent), "expert": []}
    for path in sorted(glob.glob("data/pong/experts/atari_pong/test/*.npz"))[:n_expert]:
        video, reward = ev.load_episode(path)
        sources["expert"].append((video, reward[1:]))
    res, summary = {}, {"reward_model": model, "run": run, "after_point_steps": AFTER_POINT}
    for name, episodes in sources.items():
        maps, sums, after = zip(*(maps_and_rewards(rm, f, t, max_steps) for f, t in episodes))
        maps, sums, after = np.concatenate(maps), np.concatenate(sums), np.concatenate(after)
        res[name] = maps.mean(0)
        summary[name] = {"episodes": len(episodes), "steps": int(len(sums)),
                         "reward_per_step": float(sums.mean()),
                         "reward_per_step_after_point": float(sums[after].mean()) if after.any() else None,
                         "reward_per_step_rally": float(sums[~after].mean()),
                         "share_of_steps_after_point": float(after.mean()),
                         "map_mean": res[name].round(3).tolist()}
    diff = res["agent"] - res["expert"]
    regions = {"score (token rows 0-1, masked)": (slice(0, 2), slice(None)),
               "opponent paddle (cols 1-2)": (slice(2, 16), slice(1, 3)),
               "field (cols 3-12)": (slice(2, 16), slice(3, 13)),
               "agent paddle (cols 13-14)": (slice(2, 16), slice(13, 15)),
               "edges (cols 0 and 15)": (slice(2, 16), [0, 15])}
    summary["agent_minus_expert_by_region"] = {k: float(diff[r].sum()) for k, r in regions.items()}
    summary["agent_minus_expert_total"] = float(diff.sum())
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    fig, axes = plt.subplots(1, 3, figsize=(10, 3.4))
    lo = min(res["agent"].min(), res["expert"].min())
    for ax, name in zip(axes[:2], ("agent", "expert")):
        im = ax.imshow(res[name], vmin=lo, vmax=0, cmap="magma", interpolation="nearest")
        ax.set_title(f"{name}: {summary[name]['reward_per_step']:.1f} nats/step", fontsize=9)
    fig.colorbar(im, ax=axes[:2], shrink=0.8, label="mean log p per token")
    m = np.abs(diff).max()
    im = axes[2].imshow(diff, vmin=-m, vmax=m, cmap="RdBu", interpolation="nearest")
    axes[2].set_title(f"agent - expert: {diff.sum():.1f} nats/step", fontsize=9)
    fig.colorbar(im, ax=axes[2], shrink=0.8)
    for ax in axes:
        ax.set_xticks([]), ax.set_yticks([])
    fig.suptitle("atari_pong: where the reward is lost (per-token log p of each frame given its window)", fontsize=9)
    fig.savefig(os.path.join(out, "reward_map.png"), dpi=80)
    for name in ("agent", "expert"):
        s = summary[name]
        print(f"{name}: {s['steps']} steps, {s['reward_per_step']:.1f} nats/step (after a point "
              f"{s['reward_per_step_after_point']}, rally {s['reward_per_step_rally']:.1f}, "
              f"{100 * s['share_of_steps_after_point']:.0f}% of steps after a point)")
    for k, v in summary["agent_minus_expert_by_region"].items():
        print(f"  agent - expert, {k}: {v:+.2f} nats/step")


if __name__ == "__main__":
    a = sys.argv[1:]
    main(a[0], a[1], a[2], *(int(x) for x in a[3:]))
