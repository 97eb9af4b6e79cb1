"""Evaluate VIPER's pieces: does the learned reward mean the task, and how good is the agent?

    python eval.py reward  --reward-model runs/vgpt/videogpt.pt --data-dir data/experts --degraded-dir data/degraded
    python eval.py agent   --checkpoint runs/agent/agent.pt --num-episodes 10
    python eval.py samples --reward-model runs/vgpt/videogpt.pt --data-dir data/experts
    python eval.py curves  --runs oracle=runs/oracle/eval.csv viper=runs/viper/eval.csv --reference oracle

`reward` scores expert (ε = 0) and ε-degraded episodes (collect_expert_videos.py --epsilon ε
--prefix eps<ε>_ with the same --seed for every ε, so each ε replays the same starts and goals; ε = 1
is the random policy; without eps0.0_ files the expert test split stands for ε = 0) with the video
model and reports per task: the mean VIPER reward per ε (should fall as ε grows), Spearman ρ between
per-episode VIPER return and true return, and the AUROC of expert vs random episodes (by VIPER
return). It writes summary.json and PNG plots. `agent` runs a trained agent on its true task reward and writes a GIF and summary.json.
`samples` writes open-loop rollouts of the video model next to the real continuation as a GIF grid.
`curves` draws the eval.csv learning curves of several agent runs in one PNG (with the random policy's
return as a line) and prints them as a table, with each run's share of a reference run's return at the
same env steps (VIPER vs the task oracle).

Like CleanRL's evals, this file imports the model code from the training scripts.
"""

import glob
import json
import os
import re
import sys
from collections import defaultdict
from dataclasses import dataclass
from typing import Annotated, Literal, Optional, Union

import numpy as np
import tyro


@dataclass
class RewardArgs:
    reward_model: str
    """videogpt.pt written by train_videogpt.py"""
    data_dir: str = "data/experts"
    """expert episodes: <data-dir>/<task>/test/*.npz are scored as epsilon = 0, unless the degraded dir holds
    eps0.0_ episodes (same seeds as the other epsilons: a paired comparison), which are used instead"""
    degraded_dir: Optional[str] = "data/degraded"
    """degraded episodes: <degraded-dir>/<task>/*/eps<epsilon>_*.npz (epsilon = 1 is the random policy)"""
    tasks: Optional[list[str]] = None
    """tasks to score (default: every task folder of data-dir that the model knows)"""
    mode: Literal["conditional", "joint"] = "conditional"
    """reward mode: log p(x_t | window) (paper) or log p(window) (official code)"""
    max_steps: Optional[int] = None
    """score only the first N steps of each episode (faster; the true return is cut the same way)"""
    output_dir: str = "runs/eval_reward"
    """where summary.json and the PNG plots go"""
    cuda: bool = True
    """use a GPU when one is available"""


@dataclass
class AgentArgs:
    checkpoint: str
    """agent.pt written by train_viper_dreamer.py"""
    num_episodes: int = 10
    """episodes to run with the true task reward"""
    seed: int = 10_000
    """episode i uses seed + i (kept away from training seeds)"""
    output_dir: str = "runs/eval_agent"
    """where summary.json and episodes.gif go"""
    gif_episodes: int = 1
    """how many episodes to keep in the GIF"""
    sample: bool = False
    """act with samples of the policy (DreamerV3's own evaluation) instead of its mode (the training
    script's evaluation)"""


@dataclass
class SamplesArgs:
    reward_model: str
    """videogpt.pt written by train_videogpt.py"""
    data_dir: str = "data/experts"
    """held-out context frames come from <data-dir>/<task>/test/*.npz"""
    task: Optional[str] = None
    """task folder to draw context from (default: the first one found)"""
    num_videos: int = 4
    """rows in the grid"""
    context_frames: int = 1
    """frames given to the model before it predicts open-loop"""
    num_frames: Optional[int] = None
    """frames to predict (default: the model's sequence length minus the context)"""
    temperature: float = 1.0
    """sampling temperature"""
    seed: int = 0
    """sampling seed"""
    output_dir: str = "runs/eval_samples"
    """where samples.gif goes"""


@dataclass
class CurvesArgs:
    runs: list[str]
    """curves to draw, each `label=path/to/eval.csv` (train_viper_dreamer.py's file: step, return)"""
    reference: Optional[str] = None
    """label of the run the others are compared to (e.g. the task oracle): the table adds each run's return
    as a percentage of the reference's at the same env steps"""
    random_return: Optional[float] = None
    """mean return of the random policy, drawn as a dashed line"""
    target: Optional[float] = None
    """a target return, drawn as a dotted line"""
    title: str = ""
    """plot title"""
    output: str = "runs/eval_curves/curves.png"
    """PNG to write (its folder also gets curves.md, the printed table)"""


# ---------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------
def rankdata(x):
    """Ranks starting at 1, ties get their average rank (as scipy.stats.rankdata)."""
    x = np.asarray(x, np.float64)
    ranks = np.empty(len(x))
    ranks[x.argsort(kind="mergesort")] = np.arange(1, len(x) + 1)
    _, inv, counts = np.unique(x, return_inverse=True, return_counts=True)
    return (np.bincount(inv, weights=ranks) / counts)[inv]


def spearman(x, y):
    """Spearman rank correlation: Pearson correlation of the (tie-averaged) ranks."""
    rx, ry = rankdata(x), rankdata(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denom = np.sqrt((rx ** 2).sum() * (ry ** 2).sum())
    return float((rx * ry).sum() / denom) if denom > 0 else float("nan")


def auroc(pos, neg):
    """train_videogpt.py's AUROC (Mann-Whitney U, ties count one half); nan when a side is empty."""
    from train_videogpt import auroc as mann_whitney_auroc

    pos, neg = np.asarray(pos, np.float64), np.asarray(neg, np.float64)
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    return mann_whitney_auroc(pos, neg)


# ---------------------------------------------------------------------------------------------
# Loading, with errors that say what is wrong
# ---------------------------------------------------------------------------------------------
def load_checkpoint(path, kind):
    import torch

    if not os.path.isfile(path):
        sys.exit(f"error: checkpoint {path!r} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means "not a checkpoint"
        sys.exit(f"error: {path!r} is not a readable torch checkpoint ({type(e).__name__}: {e})")
    found = ckpt.get("kind") if isinstance(ckpt, dict) else None
    if found != kind:
        sys.exit(f"error: {path!r} is a {found or 'unknown'} checkpoint, expected a {kind} checkpoint")
    return ckpt


def load_reward_model(path, cuda=True):
    import torch

    from train_videogpt import load_videogpt

    device = "cuda" if cuda and torch.cuda.is_available() else "cpu"
    return load_videogpt(load_checkpoint(path, "videogpt"), device)


def episode_files(data_dir, degraded_dir, task):
    """{epsilon: [npz paths]} from the eps<e>_ prefixes of the degraded files. Epsilon 0 is the degraded
    dir's eps0.0_ files when there are any (recorded from the same seeds as the other epsilons, so every
    epsilon sees the same starts and goals: on reacher the goal position alone moves an episode's mean
    reward by ~80 nats), else the expert test split of data_dir."""
    out = defaultdict(list)
    if degraded_dir:
        for path in sorted(glob.glob(os.path.join(degraded_dir, task, "*", "eps*_*.npz"))):
            m = re.match(r"eps([0-9.]+)_", os.path.basename(path))
            if m:
                out[float(m.group(1))].append(path)
    if not out[0.0]:
        out[0.0] = sorted(glob.glob(os.path.join(data_dir, task, "test", "*.npz")))
    return dict(sorted(out.items()))


# ---------------------------------------------------------------------------------------------
# eval.py reward
# ---------------------------------------------------------------------------------------------
def eval_reward(args: RewardArgs):
    import torch
    from tqdm import tqdm

    rm = load_reward_model(args.reward_model, args.cuda)
    if not os.path.isdir(args.data_dir):
        sys.exit(f"error: data dir {args.data_dir!r} does not exist")
    folders = sorted(d for d in os.listdir(args.data_dir) if os.path.isdir(os.path.join(args.data_dir, d)))
    if args.tasks:
        tasks = args.tasks
    else:
        tasks = [t for t in folders if rm.class_map is None or t in rm.class_map]
    if not tasks:
        sys.exit(f"error: no task folder of {args.data_dir!r} ({folders}) is known to the model "
                 f"({sorted(rm.class_map or [])})")
    for task in tasks:  # fail before any scoring if the model does not know a task (lists the known ones)
        rm.labels(task)
    os.makedirs(args.output_dir, exist_ok=True)
    summary, curves = {"reward_model": args.reward_model, "mode": args.mode, "tasks": {}}, {}
    for task in tasks:
        files = episode_files(args.data_dir, args.degraded_dir, task)
        if not files[0.0]:
            sys.exit(f"error: no expert test episodes in {os.path.join(args.data_dir, task, 'test')}")
        rows = []
        for eps, paths in files.items():
            for path in tqdm(paths, desc=f"{task} eps={eps}", leave=False):
                ep = np.load(path)
                video, reward = ep["video"], ep["reward"]
                if args.max_steps:
                    video, reward = video[: args.max_steps + 1], reward[: args.max_steps + 1]
                r = rm.compute_rewards(torch.from_numpy(video)[None], task, args.mode)[0].numpy()
                # step 0 is the reset frame: no action led to it, so it earns no reward
                rows.append(dict(eps=eps, file=path, viper_return=float(r[1:].sum()),
                                 viper_mean=float(r[1:].mean()), true_return=float(reward.sum())))
                curves.setdefault(task, {}).setdefault(eps, []).append(r[1:])
        by_eps = {e: float(np.mean([x["viper_mean"] for x in rows if x["eps"] == e])) for e in files}
        means = list(by_eps.values())
        expert = [x["viper_return"] for x in rows if x["eps"] == 0.0]
        rand = [x["viper_return"] for x in rows if x["eps"] == 1.0]
        summary["tasks"][task] = {
            "mean_viper_reward_by_epsilon": {str(e): m for e, m in by_eps.items()},
            "monotonic_decrease": bool(all(a > b for a, b in zip(means, means[1:]))),
            "spearman_viper_vs_true_return": spearman([x["viper_return"] for x in rows],
                                                       [x["true_return"] for x in rows]),
            "auroc_expert_vs_random": auroc(expert, rand),
            "episodes": rows,
        }
        s = summary["tasks"][task]
        print(f"{task}: mean reward by eps {({e: round(m, 2) for e, m in by_eps.items()})}, "
              f"monotonic {s['monotonic_decrease']}, spearman {s['spearman_viper_vs_true_return']:.3f}, "
              f"AUROC {s['auroc_expert_vs_random']:.3f}")
    with open(os.path.join(args.output_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    plot_reward(summary, curves, args.output_dir)
    print(f"wrote {args.output_dir}/summary.json and plots")
    return summary


def plot_reward(summary, curves, out):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(summary["tasks"])
    fig, axes = plt.subplots(3, len(tasks), figsize=(4 * len(tasks), 10), squeeze=False)
    for i, task in enumerate(tasks):
        s = summary["tasks"][task]
        eps = [float(e) for e in s["mean_viper_reward_by_epsilon"]]
        axes[0, i].plot(eps, list(s["mean_viper_reward_by_epsilon"].values()), "o-")
        axes[0, i].set(title=task, xlabel="epsilon (random-action probability)", ylabel="mean VIPER reward / step")
        for e, color in ((0.0, "tab:green"), (1.0, "tab:red")):
            for j, r in enumerate(curves[task].get(e, [])):
                axes[1, i].plot(r, color=color, alpha=0.5, lw=0.8,
                                label=("expert" if e == 0 else "random") if j == 0 else None)
        axes[1, i].set(xlabel="step", ylabel="VIPER reward")
        axes[1, i].legend()
        ep = s["episodes"]
        sc = axes[2, i].scatter([x["true_return"] for x in ep], [x["viper_return"] for x in ep],
                                c=[x["eps"] for x in ep], cmap="viridis")
        axes[2, i].set(xlabel="true return", ylabel="VIPER return",
                       title=f"Spearman {s['spearman_viper_vs_true_return']:.2f}, "
                             f"AUROC {s['auroc_expert_vs_random']:.2f}")
        fig.colorbar(sc, ax=axes[2, i], label="epsilon")
    fig.tight_layout()
    fig.savefig(os.path.join(out, "reward_diagnostics.png"), dpi=80)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# eval.py agent / samples
# ---------------------------------------------------------------------------------------------
def eval_agent(args: AgentArgs):
    import torch
    from tqdm import tqdm

    import collect_expert_videos as cev
    from train_viper_dreamer import load_agent_policy, save_gif

    ckpt = load_checkpoint(args.checkpoint, "agent")
    env_id = ckpt["args"]["env_id"]
    del ckpt
    env = cev.make_env(env_id, seed=args.seed)
    policy = load_agent_policy(args.checkpoint, env, explore=args.sample)
    torch.manual_seed(args.seed)  # the action samples
    rng = np.random.default_rng(args.seed)
    returns, gif = [], []
    for i in tqdm(range(args.num_episodes), desc=f"eval {env_id}"):
        video, _, reward = cev.run_episode(env, policy, rng, 0.0, seed=args.seed + i)
        returns.append(float(reward.sum()))
        if i < args.gif_episodes:
            gif.append(video[::2])
    os.makedirs(args.output_dir, exist_ok=True)
    summary = {"checkpoint": args.checkpoint, "env_id": env_id, "actions": "sample" if args.sample else "mode",
               "returns": returns, "mean_return": float(np.mean(returns)), "std_return": float(np.std(returns))}
    with open(os.path.join(args.output_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    if gif:
        save_gif(os.path.join(args.output_dir, "episodes.gif"), np.concatenate(gif), fps=20)
    print(f"{env_id}: true return {summary['mean_return']:.1f} +- {summary['std_return']:.1f} "
          f"over {len(returns)} episodes -> {args.output_dir}")
    return summary


def eval_samples(args: SamplesArgs):
    import torch

    from train_viper_dreamer import save_gif

    rm = load_reward_model(args.reward_model)
    task = args.task or sorted(os.listdir(args.data_dir))[0]
    paths = sorted(glob.glob(os.path.join(args.data_dir, task, "test", "*.npz")))
    if not paths:
        sys.exit(f"error: no held-out episodes in {os.path.join(args.data_dir, task, 'test')}")
    k = rm.frame_skip
    n = args.num_frames or rm.seq_len - args.context_frames
    rng = np.random.default_rng(args.seed)
    real = []
    for i in range(args.num_videos):
        video = np.load(paths[i % len(paths)])["video"]
        start = rng.integers(0, len(video) - (args.context_frames + n - 1) * k)
        real.append(video[start: start + (args.context_frames + n) * k: k])
    real = np.stack(real)
    gen = torch.Generator(device=rm.device).manual_seed(args.seed)
    fake = rm.sample(torch.from_numpy(real[:, : args.context_frames]), n, args.temperature,
                     task if rm.class_map else None, gen).cpu().numpy()
    # grid: one row per video, real on the left, sampled on the right
    grid = np.concatenate([np.concatenate(list(real), 1), np.concatenate(list(fake), 1)], 2)
    os.makedirs(args.output_dir, exist_ok=True)
    save_gif(os.path.join(args.output_dir, "samples.gif"), grid, fps=4)
    print(f"wrote {args.output_dir}/samples.gif (left: real, right: sampled after {args.context_frames} context frames)")


# ---------------------------------------------------------------------------------------------
# eval.py curves
# ---------------------------------------------------------------------------------------------
def read_eval_csv(path):
    """{step: return} from an eval.csv written by train_viper_dreamer.py."""
    import csv

    if not os.path.isfile(path):
        sys.exit(f"error: eval file {path!r} does not exist")
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    if not rows or rows[0] != ["step", "return"]:
        sys.exit(f"error: {path!r} is not an eval.csv (expected the header 'step,return', got {rows[:1]})")
    try:
        return {int(r[0]): float(r[1]) for r in rows[1:] if r}
    except (ValueError, IndexError) as e:
        sys.exit(f"error: {path!r} has a malformed row ({e})")


def curves_table(curves, reference=None):
    """Markdown table: one row per env step found in any run, one column per run, and with a reference
    run one "% of <reference>" column per other run (blank where either run has no eval at that step)."""
    steps = sorted(set().union(*curves.values()))
    others = [k for k in curves if reference is not None and k != reference]
    head = ["env steps", *curves, *[f"{k} / {reference}" for k in others]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in steps:
        cells = [str(s)] + [f"{c[s]:.1f}" if s in c else "" for c in curves.values()]
        ref = curves[reference].get(s) if reference is not None else None
        for k in others:
            ok = ref is not None and ref > 0 and s in curves[k]
            cells.append(f"{100 * curves[k][s] / ref:.0f}%" if ok else "")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def eval_curves(args: CurvesArgs):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = {}
    for spec in args.runs:
        label, sep, path = spec.partition("=")
        if not sep or not label or not path:
            sys.exit(f"error: --runs entry {spec!r} must look like label=path/to/eval.csv")
        if label in curves:
            sys.exit(f"error: --runs label {label!r} is used twice")
        curves[label] = read_eval_csv(path)
    if args.reference is not None and args.reference not in curves:
        sys.exit(f"error: --reference {args.reference!r} is not one of the labels {list(curves)}")
    table = curves_table(curves, args.reference)
    fig, ax = plt.subplots(figsize=(6, 3.8))
    for label, c in curves.items():
        ax.plot(list(c), list(c.values()), "o-", ms=3, label=label)
    if args.random_return is not None:
        ax.axhline(args.random_return, color="gray", ls="--", label=f"random policy ({args.random_return:.0f})")
    if args.target is not None:
        ax.axhline(args.target, color="tab:green", ls=":", label=f"target ({args.target:.0f})")
    ax.set(xlabel="env steps", ylabel="eval return (true task reward)", title=args.title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    out_dir = os.path.dirname(os.path.abspath(args.output))
    os.makedirs(out_dir, exist_ok=True)
    fig.savefig(args.output, dpi=80)
    plt.close(fig)
    with open(os.path.join(out_dir, "curves.md"), "w") as f:
        f.write(table + "\n")
    print(table + f"\n-> {args.output}")
    return table


if __name__ == "__main__":
    args = tyro.cli(Union[
        Annotated[RewardArgs, tyro.conf.subcommand("reward")],
        Annotated[AgentArgs, tyro.conf.subcommand("agent")],
        Annotated[SamplesArgs, tyro.conf.subcommand("samples")],
        Annotated[CurvesArgs, tyro.conf.subcommand("curves")],
    ])
    {RewardArgs: eval_reward, AgentArgs: eval_agent, SamplesArgs: eval_samples,
     CurvesArgs: eval_curves}[type(args)](args)
