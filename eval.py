"""Evaluate VIPER's pieces: does the learned reward mean the task, and how good is the agent?

    python eval.py reward  --reward-model runs/vgpt/videogpt.pt --data-dir data/experts --degraded-dir data/degraded
    python eval.py agent   --checkpoint runs/agent/agent.pt --num-episodes 10
    python eval.py samples --reward-model runs/vgpt/videogpt.pt --data-dir data/experts
    python eval.py curves  --runs oracle=runs/oracle/eval.csv viper=runs/viper/eval.csv --reference oracle
    python eval.py tokenizer --checkpoints runs/vqgan/vqgan.pt --data-dir data/experts
    python eval.py replay  --run runs/agent --reward-model runs/vgpt/videogpt.pt --data-dir data/experts

`reward` scores expert (ε = 0) and ε-degraded episodes (collect_expert_videos.py --epsilon ε
--prefix eps<ε>_ with the same --seed for every ε, so each ε replays the same starts and goals; ε = 1
is the random policy; without eps0.0_ files the expert test split stands for ε = 0) with the video
model and reports per task: the mean VIPER reward per ε (should fall as ε grows), Spearman ρ between
per-episode VIPER return and true return, and the AUROC of expert vs random episodes (by VIPER
return). It writes summary.json and PNG plots. `agent` runs a trained agent on its true task reward and writes a GIF and summary.json.
`samples` writes open-loop rollouts of the video model next to the real continuation as a GIF grid.
`curves` draws the eval.csv learning curves of several agent runs in one PNG (with the random policy's
return as a line) and prints them as a table, with each run's share of a reference run's return at the
same env steps (VIPER vs the task oracle). `tokenizer` reconstructs held-out episodes with a VQ-GAN and
reports, beside whole-frame PSNR, how well it keeps the moving objects (on Pong the 1-2 pixel ball, which
whole-frame PSNR barely notices), with zoomed crops of them. `replay` scores an agent's own replayed steps
and the expert's, binned by task reward per step: does the reward pay the agent's good steps as it pays the
expert's, or only the expert's exact frames?

Like CleanRL's evals, this file imports the model code from the training scripts.
"""

import glob
import json
import os
import re
import sys
from collections import defaultdict
from dataclasses import dataclass
from typing import Annotated, Literal, Optional, Tuple, Union

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
    reward_mode: Literal["conditional", "joint"] = "conditional"
    """log p(x_t | window) (paper) or log p(window) (official code), as the agent's --reward-mode"""
    reward_precision: Literal["fp32", "bf16", "auto"] = "auto"
    """the video model's transformer blocks when scoring, as the agent's --reward-precision (bf16 moves
    rewards by ~0.05 nats per step on average; README, reward scoring in bf16)"""
    max_steps: Optional[int] = None
    """score only the first N steps of each episode (faster; the true return is cut the same way)"""
    output_dir: str = "runs/eval_reward"
    """where summary.json and the PNG plots go"""
    cuda: bool = True
    """use CUDA when available"""


@dataclass
class AgentArgs:
    checkpoint: str
    """agent.pt written by train_viper_dreamer.py"""
    num_episodes: int = 10
    """episodes to run with the true task reward"""
    seed: int = 10_000
    """env seed of the first evaluation episode, not a run seed: episode i uses seed + i (away from training seeds)"""
    output_dir: str = "runs/eval_agent"
    """where summary.json and episodes.gif go"""
    gif_episodes: int = 1
    """how many episodes to keep in the GIF"""
    sample: bool = False
    """act with samples of the policy (DreamerV3's own evaluation) instead of its mode (the training
    script's evaluation)"""
    write_final: bool = True
    """record this evaluation in the run's run.json as its final result (final_return_*, read by the results
    tables); --no-write-final for a quick look that must not replace it"""


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
    seed: int = 1
    """seed of the context draw and of the sampling"""
    output_dir: str = "runs/eval_samples"
    """where samples.gif goes"""
    cuda: bool = True
    """use CUDA when available"""


@dataclass
class CurvesArgs:
    runs: list[str]
    """curves to draw, each `label=path/to/eval.csv` (train_viper_dreamer.py's file: step, return); several
    comma-separated files under one label (seeds) are drawn as their mean with their range shaded"""
    reference: Optional[str] = None
    """label of the run the others are compared to (e.g. the task oracle): the table adds each run's return
    as a percentage of the reference's at the same env steps"""
    random_return: Optional[float] = None
    """mean return of the random policy, drawn as a dashed line"""
    expert_return: Optional[float] = None
    """mean return of the scripted expert, drawn as a dash-dotted line"""
    target: Optional[float] = None
    """a target return, drawn as a dotted line"""
    title: str = ""
    """plot title"""
    output: str = "runs/eval_curves/curves.png"
    """PNG to write (the printed table goes beside it as <output>.md)"""


@dataclass
class ReferenceArgs:
    reward_model: str
    """videogpt.pt the agent will be (or was) trained with"""
    env_id: str = "dmc_cartpole_balance"
    """the agent's --env-id (also the task label of a class-conditional model)"""
    reward_mode: Literal["conditional", "joint"] = "conditional"
    """the agent's --reward-mode"""
    reward_precision: Literal["fp32", "bf16", "auto"] = "auto"
    """the video model's transformer blocks when scoring, as the agent's --reward-precision (bf16 moves
    rewards by ~0.05 nats per step on average; README, reward scoring in bf16)"""
    data_dir: str = "data/experts"
    """expert episodes: <data-dir>/<env-id>/test/*.npz"""
    degraded_dir: Optional[str] = "data/degraded"
    """epsilon-degraded episodes: <degraded-dir>/<env-id>/*/eps<epsilon>_*.npz (skipped when absent)"""
    episodes: int = 4
    """episodes rolled out per fixed behaviour (random, zero and constant actions)"""
    seed: int = 10_000
    """env seed of the first episode per behaviour, not a run seed: episode i uses seed + i (agent eval seeds)"""
    density_bounds: Annotated[Optional[Tuple[float, float]], tyro.conf.arg(
        metavar="LO HI", help_behavior_hint="(default: off)")] = None
    """the agent's --density-bounds: adds each behaviour's return under the rescaled reward
    clip((r - LO) / (HI - LO), 0, 1) (what that agent maximises), and the shortcut check uses it"""
    output_dir: str = "runs/eval_reference"
    """where reference.json and reference.csv go (pass reference.json to train_viper_dreamer.py
    --reference-returns and to eval.py episodes)"""
    cuda: bool = True
    """use CUDA when available"""


@dataclass
class HeatmapArgs:
    reward_model: str
    """videogpt.pt written by train_videogpt.py"""
    env_id: str = "dmc_cartpole_balance"
    """task label of a class-conditional model; episodes come from <data-dir>/<env-id>/test and <random-dir>/<env-id>"""
    data_dir: str = "data/experts"
    """expert episodes: the first of <data-dir>/<env-id>/test/*.npz is drawn"""
    random_dir: str = "data/random"
    """random-policy episodes: the first of <random-dir>/<env-id>/*/*.npz is drawn"""
    frames: int = 6
    """frames per episode in the figure, evenly spaced over the episode"""
    output: str = "runs/eval_heatmap/heatmap.png"
    """PNG to write"""
    cuda: bool = True
    """use CUDA when available"""


@dataclass
class EpisodesArgs:
    run: list[str]
    """agents' output dirs, each `dir` or `label=dir`: their episodes.csv (or, for runs that predate it, their
    tensorboard events); several runs (an ablation on one seed) share one plot and one table"""
    reference: Optional[str] = None
    """reference.json from eval.py reference: its behaviours are drawn as horizontal lines"""
    smooth: int = 10
    """episodes in the moving average drawn over the per-episode points"""
    bin: int = 5000
    """env steps per row of the table of mean true / VIPER return per training episode (printed, and written
    beside the PNG as <output>.md)"""
    title: str = ""
    """plot title"""
    output: str = "runs/eval_episodes/episodes.png"
    """PNG to write"""


@dataclass
class ReplayArgs:
    run: str
    """an agent's output dir: its replay.npz (train_viper_dreamer.py writes it at each checkpoint) and run.json"""
    reward_model: str
    """videogpt.pt to score the agent's frames with: its own reward model, or another one (would it pay these states?)"""
    reward_mode: Literal["conditional", "joint"] = "conditional"
    """the agent's --reward-mode"""
    reward_precision: Literal["run", "fp32", "bf16", "auto"] = "run"
    """the video model's transformer blocks when scoring, as the agent's --reward-precision; `run`: the
    precision the run scored its own frames in, from its run.json (fp32 for runs that predate the flag)"""
    episodes: int = 10
    """the replay's last complete episodes to score"""
    data_dir: str = "data/experts"
    """expert episodes scored beside them: <data-dir>/<env-id>/test/*.npz"""
    bins: int = 4
    """table rows: equal-width bins of the task reward per step, from 0 to the experts' highest"""
    output: str = "runs/eval_replay/replay.json"
    """JSON to write (the printed table goes beside it as replay.md)"""
    cuda: bool = True
    """use CUDA when available"""


@dataclass
class TokenizerArgs:
    checkpoints: list[str]
    """vqgan.pt files written by train_vqgan.py: several are scored on the same episodes, side by side"""
    data_dir: str = "data/experts"
    """episodes: <data-dir>/<task>/<split>/*.npz (the tokenizer's held-out split by default)"""
    tasks: Optional[list[str]] = None
    """task folders to score (default: every folder of data-dir)"""
    split: str = "test"
    """which split of each task folder to reconstruct"""
    min_brightness: float = 0.0
    """count as moving-object pixels only those at least this bright in every channel (0-1): 0.5 picks Pong's
    ball, the only bright moving thing there (white on brown); 0: every moving object (paddles, poles, arms)"""
    output: str = "runs/eval_tokenizer/objects.png"
    """PNG of crops around moving objects, the originals above each checkpoint's reconstructions (its folder also
    gets summary.json)"""
    cuda: bool = True
    """use CUDA when available"""


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


def load_reward_model(path, cuda=True, task=None, decoder=False, precision="fp32"):
    """videogpt.pt -> RewardModel; with `task`, exits with the known tasks if the model has no label for it.
    Its tokenizer is the VQ-GAN's encoder half (scoring), or with `decoder` the whole VQ-GAN (sampling).
    precision: the agent's --reward-precision (fp32, bf16, or auto: bf16 where the device has it natively)."""
    import torch

    from train_videogpt import load_videogpt, load_videogpt_with_decoder
    from train_viper_dreamer import reward_bf16

    device = "cuda" if cuda and torch.cuda.is_available() else "cpu"
    ckpt = load_checkpoint(path, "videogpt")
    if decoder:
        rm = load_videogpt_with_decoder(ckpt, device)
    else:
        rm = load_videogpt(ckpt, device, bf16=reward_bf16(precision, device))
    if task is not None:
        try:
            rm.labels(task)
        except ValueError as e:
            sys.exit(f"error: {e}")
    return rm


def load_episode(path):
    """(video, reward) of an episode npz written by collect_expert_videos.py; errors name the file."""
    try:
        with np.load(path) as ep:
            missing = [k for k in ("video", "reward") if k not in ep.files]
            if missing:
                sys.exit(f"error: {path!r} has no {' or '.join(missing)} array (keys: {ep.files}); scoring needs "
                         f"episodes with their task reward, as collect_expert_videos.py writes them")
            return ep["video"], ep["reward"]
    except (OSError, ValueError, EOFError) as e:  # not an npz, truncated, or pickled objects
        sys.exit(f"error: {path!r} is not a readable episode npz ({type(e).__name__}: {e})")


def degraded_files(degraded_dir, task):
    """{epsilon: [npz paths]} from the eps<e>_ prefixes of the degraded files ({} without a degraded dir)."""
    out = defaultdict(list)
    if degraded_dir:
        for path in sorted(glob.glob(os.path.join(degraded_dir, task, "*", "eps*_*.npz"))):
            m = re.match(r"eps([0-9.]+)_", os.path.basename(path))
            if m:
                out[float(m.group(1))].append(path)
    return dict(sorted(out.items()))


def episode_files(data_dir, degraded_dir, task):
    """degraded_files, with epsilon 0 the degraded dir's eps0.0_ files when there are any (recorded from the
    same seeds as the other epsilons, so every epsilon sees the same starts and goals: on reacher the goal
    position alone moves an episode's mean reward by ~80 nats), else the expert test split of data_dir."""
    out = defaultdict(list, degraded_files(degraded_dir, task))
    if not out[0.0]:
        out[0.0] = sorted(glob.glob(os.path.join(data_dir, task, "test", "*.npz")))
    return dict(sorted(out.items()))


# ---------------------------------------------------------------------------------------------
# eval.py reward
# ---------------------------------------------------------------------------------------------
def eval_reward(args: RewardArgs):
    import torch
    from tqdm import tqdm

    rm = load_reward_model(args.reward_model, args.cuda, precision=args.reward_precision)
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
    summary, curves = {"reward_model": args.reward_model, "mode": args.reward_mode,
                       "reward_precision": "bf16" if rm.bf16 else "fp32", "tasks": {}}, {}
    for task in tasks:
        files = episode_files(args.data_dir, args.degraded_dir, task)
        if not files[0.0]:
            sys.exit(f"error: no expert test episodes in {os.path.join(args.data_dir, task, 'test')}")
        rows = []
        for eps, paths in files.items():
            for path in tqdm(paths, desc=f"{task} eps={eps}", leave=False):
                video, reward = load_episode(path)
                if args.max_steps:
                    video, reward = video[: args.max_steps + 1], reward[: args.max_steps + 1]
                r = rm.compute_rewards(torch.from_numpy(video)[None], task, args.reward_mode)[0].numpy()
                # step 0 is the reset frame: no action led to it, so it earns no reward
                rows.append(dict(eps=eps, file=path, viper_return=float(r[1:].sum()),
                                 viper_mean=float(r[1:].mean()), true_return=float(reward.sum()),
                                 steps=len(r) - 1))
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
            # the same by reward per step: where episodes end early (Atari games), a sum of negative
            # log-likelihoods is higher for a shorter episode, whoever played it
            "spearman_viper_mean_vs_true_return": spearman([x["viper_mean"] for x in rows],
                                                            [x["true_return"] for x in rows]),
            "auroc_expert_vs_random": auroc(expert, rand),
            "episodes": rows,
        }
        s = summary["tasks"][task]
        print(f"{task}: mean reward by eps {({e: round(m, 2) for e, m in by_eps.items()})}, "
              f"monotonic {s['monotonic_decrease']}, spearman {s['spearman_viper_vs_true_return']:.3f}, "
              f"AUROC {s['auroc_expert_vs_random']:.3f}")
        steps = [x["steps"] for x in rows]
        if min(steps) != max(steps):
            print(f"{task}: episodes last {min(steps)}-{max(steps)} steps, and every step's reward is a negative "
                  f"log-likelihood, so a short episode's VIPER return is higher for its length alone; by reward "
                  f"per step, spearman {s['spearman_viper_mean_vs_true_return']:.3f}")
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

    if args.num_episodes < 1:
        sys.exit(f"error: --num-episodes must be >= 1, got {args.num_episodes}")
    ckpt = load_checkpoint(args.checkpoint, "agent")
    env_id, env_steps = ckpt["args"]["env_id"], ckpt.get("counters", {}).get("step")
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
               "seeds": [args.seed + i for i in range(len(returns))], "returns": returns, "mean_return": float(np.mean(returns)), "std_return": float(np.std(returns))}
    with open(os.path.join(args.output_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    if gif:
        save_gif(os.path.join(args.output_dir, "episodes.gif"), np.concatenate(gif), fps=20)
    run_json = os.path.join(os.path.dirname(os.path.abspath(args.checkpoint)), "run.json")
    if os.path.isfile(run_json) and args.write_final and not args.sample:  # the run's final result, for the tables
        with open(run_json) as f:
            info = json.load(f)
        info.update(final_return_mean=round(summary["mean_return"], 2), final_return_std=round(summary["std_return"], 2),
                    final_episodes=len(returns), final_seeds=[args.seed, args.seed + len(returns) - 1],
                    final_eval_command=" ".join(["python", "eval.py", *sys.argv[1:]]), final_env_steps=env_steps)
        with open(run_json + ".tmp", "w") as f:
            json.dump(info, f, indent=1)
        os.replace(run_json + ".tmp", run_json)
    print(f"{env_id}: true return {summary['mean_return']:.1f} +- {summary['std_return']:.1f} "
          f"over {len(returns)} episodes -> {args.output_dir}")
    return summary


def eval_samples(args: SamplesArgs):
    import torch

    from train_videogpt import sample_video
    from train_viper_dreamer import save_gif

    rm = load_reward_model(args.reward_model, args.cuda, decoder=True)
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
    fake = sample_video(rm, torch.from_numpy(real[:, : args.context_frames]), n, args.temperature,
                        task if rm.class_map else None, gen).cpu().numpy()
    # grid: one row per video, real on the left, sampled on the right
    grid = np.concatenate([np.concatenate(list(real), 1), np.concatenate(list(fake), 1)], 2)
    os.makedirs(args.output_dir, exist_ok=True)
    save_gif(os.path.join(args.output_dir, "samples.gif"), grid, fps=4)
    print(f"wrote {args.output_dir}/samples.gif (left: real, right: sampled after {args.context_frames} context frames)")


# ---------------------------------------------------------------------------------------------
# eval.py curves
# ---------------------------------------------------------------------------------------------
def read_eval_csv(path, column="return"):
    """{step: return} (or {step: wall_time_s}, None where a row lacks it) from train_viper_dreamer.py's
    eval.csv. Runs started before the wall-time column existed have rows without it."""
    import csv

    if not os.path.isfile(path):
        sys.exit(f"error: eval file {path!r} does not exist")
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    if not rows or rows[0][:2] != ["step", "return"]:
        sys.exit(f"error: {path!r} is not an eval.csv (expected the header 'step,return[,wall_time_s]', "
                 f"got {rows[:1]})")
    i = rows[0].index(column) if column in rows[0] else None
    try:
        return {int(r[0]): (float(r[i]) if i is not None and i < len(r) else None) for r in rows[1:] if r}
    except (ValueError, IndexError) as e:
        sys.exit(f"error: {path!r} has a malformed row ({e})")


def time_to_target(returns, walls, target):
    """(first env step whose eval return >= target, the run's wall seconds then or None); (None, None) if never."""
    for step in sorted(returns):
        if returns[step] >= target:
            return step, walls.get(step)
    return None, None


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

    curves, seeds = {}, {}
    for spec in args.runs:
        label, sep, paths = spec.partition("=")
        if not sep or not label or not paths:
            sys.exit(f"error: --runs entry {spec!r} must look like label=path/to/eval.csv[,another/eval.csv]")
        if label in curves:
            sys.exit(f"error: --runs label {label!r} is used twice")
        # several comma-separated files (seeds) under one label: their mean, at the steps all of them reached
        seeds[label] = [read_eval_csv(p) for p in paths.split(",")]
        steps = sorted(set.intersection(*(set(c) for c in seeds[label])))
        curves[label] = {s: float(np.mean([c[s] for c in seeds[label]])) for s in steps}
    if args.reference is not None and args.reference not in curves:
        sys.exit(f"error: --reference {args.reference!r} is not one of the labels {list(curves)}")
    table = curves_table(curves, args.reference)
    if args.target is not None:  # time to target, per file (seed)
        for spec in args.runs:
            label, _, paths = spec.partition("=")
            for path in paths.split(","):
                step, wall = time_to_target(read_eval_csv(path), read_eval_csv(path, "wall_time_s"), args.target)
                when = ("not reached" if step is None else f"step {step}" +
                        (f" ({wall / 3600:.2f} h wall)" if wall is not None else ""))
                table += f"\n\n{label} ({path}): first eval >= {args.target:g}: {when}"
    fig, ax = plt.subplots(figsize=(6, 3.8))
    for label, c in curves.items():
        n = len(seeds[label])
        line, = ax.plot(list(c), list(c.values()), "o-", ms=3, label=label + (f" (mean of {n})" if n > 1 else ""))
        if n > 1:  # the seeds' range
            lo = [min(x[s] for x in seeds[label]) for s in c]
            hi = [max(x[s] for x in seeds[label]) for s in c]
            ax.fill_between(list(c), lo, hi, color=line.get_color(), alpha=0.2, lw=0)
    if args.random_return is not None:
        ax.axhline(args.random_return, color="gray", ls="--", label=f"random policy ({args.random_return:.0f})")
    if args.expert_return is not None:
        ax.axhline(args.expert_return, color="black", ls="-.", lw=1, label=f"scripted expert ({args.expert_return:.0f})")
    if args.target is not None:
        ax.axhline(args.target, color="tab:green", ls=":", label=f"target ({args.target:.0f})")
    ax.set(xlabel="env steps", ylabel="eval return (true task reward)", title=args.title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    out_dir = os.path.dirname(os.path.abspath(args.output))
    os.makedirs(out_dir, exist_ok=True)
    fig.savefig(args.output, dpi=80)
    plt.close(fig)
    with open(os.path.splitext(args.output)[0] + ".md", "w") as f:  # beside the PNG, named after it
        f.write(table + "\n")
    print(table + f"\n-> {args.output}")
    return table



# ---------------------------------------------------------------------------------------------
# eval.py reference: what does the agent's reward pay for known behaviour?
# ---------------------------------------------------------------------------------------------
def fixed_policies(env):
    """Behaviours that know nothing of the task: {name: policy(obs, rng) -> action}. A reward that pays
    zero or constant actions nearly as well as the expert can be maximised without doing the task."""
    import gymnasium as gym

    import collect_expert_videos as cev

    if isinstance(env.action_space, gym.spaces.Discrete):
        return {"random actions": lambda obs, rng: cev.random_action(env, rng),
                "no-op (action 0)": lambda obs, rng: 0, "constant action 1": lambda obs, rng: 1}
    shape = env.action_space.shape
    return {"random actions": lambda obs, rng: cev.random_action(env, rng),
            "zero actions": lambda obs, rng: np.zeros(shape, np.float32),
            "constant +1": lambda obs, rng: np.ones(shape, np.float32),
            "constant -1": lambda obs, rng: -np.ones(shape, np.float32)}


def rollout(env, policy, rng, seed):
    """One episode of policy(obs, rng): (frames [T+1, H, W, 3] with the reset frame first, true return)."""
    obs, _ = env.reset(seed=seed)
    frames, ret, done = [obs], 0.0, False
    while not done:
        obs, r, terminated, truncated, _ = env.step(policy(obs, rng))
        frames.append(obs)
        ret += float(r)
        done = terminated or truncated
    return np.stack(frames), ret


def episode_viper_rewards(rm, frames, env_id, mode):
    """VIPER reward of every step after the reset frame, as the agent labels them (their sum is the episode's
    VIPER return). compute_rewards equals the agent's insert-time labeler step for step (StepRewards; tested)."""
    import torch

    return rm.compute_rewards(torch.from_numpy(np.ascontiguousarray(frames))[None], env_id, mode)[0, 1:].numpy()


REFERENCE_SEGMENT = 25  # steps per segment of reference.json's reward_per_step_by_segment


def mean_per_step(runs):
    """A behaviour's VIPER reward at each step, averaged over its episodes (up to the shortest one)."""
    n = min(map(len, runs))
    return np.mean([np.asarray(r[:n], np.float64) for r in runs], 0)


def segment_means(y, segment=REFERENCE_SEGMENT):
    """mean_per_step in consecutive `segment`-step stretches of the episode (a last partial stretch counts):
    reference.png in numbers, e.g. a swing-up expert's first 100 steps against a hanging pole's."""
    return [round(float(y[i:i + segment].mean()), 3) for i in range(0, len(y), segment)]


def label_symlog_y(ax):
    """A symlog y-axis is labelled at powers of ten only, so data inside one or two decades (reacher's rewards,
    -120 ... -250 nats) showed one number or none: there, ticks go at 1, 1.5, 2, 3, 5, 7 of each decade, printed
    plainly. Call it after plotting (and after set_ylim): it reads the axis' limits."""
    from matplotlib.ticker import FuncFormatter, SymmetricalLogLocator

    lo, hi = sorted(abs(v) for v in ax.get_ylim())
    if hi / max(lo, ax.yaxis.get_transform().linthresh) < 100:
        ax.yaxis.set_major_locator(SymmetricalLogLocator(ax.yaxis.get_transform(), subs=[1, 1.5, 2, 3, 5, 7]))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))


def plot_reference_steps(curves, path, title, smooth=10):
    """reference.png: each behaviour's mean_per_step along the episode (moving average), on a symlog axis: where
    in an episode a behaviour earns or loses its return. A task-blind behaviour that out-scores the expert's
    early steps (say, hanging still against swinging up) is a trap the return table alone does not show."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    colors = plt.cm.viridis(np.linspace(0, 0.9, sum(k.startswith("expert,") for k in curves)))
    degraded = iter(colors)
    style = {"random actions": dict(color="tab:red"), "zero actions": dict(color="black", ls="--"),
             "constant +1": dict(color="tab:orange", ls=":"), "constant -1": dict(color="tab:brown", ls=":")}
    for name, y in curves.items():
        k = min(smooth, len(y))
        y = np.convolve(y, np.ones(k) / k, mode="valid")
        kw = (dict(color="tab:green", lw=2.5) if name.startswith("expert (") else
              dict(color=next(degraded), lw=1) if name.startswith("expert,") else style.get(name, {}))
        ax.plot(np.arange(len(y)) + k, y, label=name, **kw)
    ax.set_yscale("symlog", linthresh=1.0)
    label_symlog_y(ax)
    ax.set(xlabel="env step", ylabel=f"VIPER reward / step ({smooth}-step mean)", title=title)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def write_reference_csv(path, table):
    """reference.csv: one row per behaviour (names hold commas: the csv module quotes them)."""
    import csv

    head = ["episodes", "viper_return_mean", "viper_return_std", "viper_reward_per_step", "true_return_mean",
            "true_return_std", "viper_position", "true_position"]
    head += [h for h in ("bounded_return_mean", "bounded_return_std", "bounded_position") if h in next(iter(table.values()))]
    with open(path, "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["behaviour", *head])
        for name, t in table.items():
            w.writerow([name, *(f"{t[h]:.2f}" if isinstance(t[h], float) else t[h] for h in head)])


def eval_reference(args: ReferenceArgs):
    """Score expert, degraded and task-blind behaviour under the agent's exact reward (model, task label,
    mode): the horizontal lines the agent's VIPER return per episode is read against."""
    from tqdm import tqdm

    import collect_expert_videos as cev
    from train_viper_dreamer import density_bounded  # the agent's own --density-bounds rescale

    if args.episodes < 1:
        sys.exit(f"error: --episodes must be >= 1, got {args.episodes}")
    if args.env_id not in cev.VALID_ENV_IDS:
        sys.exit(f"error: unknown --env-id {args.env_id!r}; valid ids: {', '.join(cev.VALID_ENV_IDS)}")
    rm = load_reward_model(args.reward_model, args.cuda, task=args.env_id, precision=args.reward_precision)
    recorded = {}  # behaviour -> npz paths
    test = sorted(glob.glob(os.path.join(args.data_dir, args.env_id, "test", "*.npz")))
    if test:
        recorded["expert (test split)"] = test
    for eps, paths in degraded_files(args.degraded_dir, args.env_id).items():
        recorded[f"expert, epsilon {eps:g}"] = paths
    if not recorded:
        sys.exit(f"error: no expert episodes in {os.path.join(args.data_dir, args.env_id, 'test')} "
                 f"nor degraded ones in {args.degraded_dir}: record some with collect_expert_videos.py")
    behaviours, steps = {}, {}  # name -> [(VIPER return, true return, length)], name -> [per-step rewards]
    for name, paths in recorded.items():
        rows, steps[name] = [], []
        for path in tqdm(paths, desc=name, leave=False):
            video, reward = load_episode(path)
            steps[name].append(episode_viper_rewards(rm, video, args.env_id, args.reward_mode))
            rows.append((float(steps[name][-1].sum()), float(reward.sum()), len(video) - 1))
        behaviours[name] = rows
    env = cev.make_env(args.env_id, seed=args.seed)
    for name, policy in fixed_policies(env).items():
        rng, rows, steps[name] = np.random.default_rng(args.seed), [], []
        for i in tqdm(range(args.episodes), desc=name, leave=False):
            frames, ret = rollout(env, policy, rng, args.seed + i)
            steps[name].append(episode_viper_rewards(rm, frames, args.env_id, args.reward_mode))
            rows.append((float(steps[name][-1].sum()), ret, len(frames) - 1))
        behaviours[name] = rows
    curves, table = {name: mean_per_step(runs) for name, runs in steps.items()}, {}
    for name, rows in behaviours.items():
        v, r, n = (np.array(c, np.float64) for c in zip(*rows))
        table[name] = dict(episodes=len(rows), viper_return_mean=float(v.mean()), viper_return_std=float(v.std()),
                           viper_reward_per_step=float((v / n).mean()), true_return_mean=float(r.mean()),
                           true_return_std=float(r.std()), reward_per_step_by_segment=segment_means(curves[name]))
        if args.density_bounds is not None:  # what that agent maximises, step by step
            b = np.array([density_bounded(x, *args.density_bounds).sum() for x in steps[name]])
            table[name].update(bounded_return_mean=float(b.mean()), bounded_return_std=float(b.std()))
    # Where each behaviour lies between random actions (0) and the expert (1), by VIPER return and by true
    # return. A task-blind behaviour (zero or constant actions) that the reward places much nearer the expert
    # than the task does is a shortcut the agent can take: a broken reward. (On cartpole balance, zero actions
    # keep the pole up for a while: they earn a good true return, and a high VIPER return is then right.)
    expert_key = next(k for k in table if k.startswith("expert"))
    positions = [("viper_return_mean", "viper_position"), ("true_return_mean", "true_position")]
    if args.density_bounds is not None:
        positions.append(("bounded_return_mean", "bounded_position"))
    for k, t in table.items():
        for key, pos in positions:
            lo, hi = table["random actions"][key], table[expert_key][key]
            t[pos] = (t[key] - lo) / (hi - lo) if hi != lo else float("nan")
    agent_pos = "viper_position" if args.density_bounds is None else "bounded_position"  # what the agent maximises
    broken = {k: t[agent_pos] for k, t in table.items() if k in fixed_policies(env) and k != "random actions"
              and t[agent_pos] >= 0.5 and t[agent_pos] - t["true_position"] > 0.25}
    summary = {"reward_model": args.reward_model, "env_id": args.env_id, "mode": args.reward_mode,
               "reward_precision": "bf16" if rm.bf16 else "fp32", "seed": args.seed,
               "density_bounds": args.density_bounds, "segment_steps": REFERENCE_SEGMENT,
               "behaviours": table, "shortcuts": broken,
               "spearman_viper_vs_true_return": spearman([t["viper_return_mean"] for t in table.values()],
                                                         [t["true_return_mean"] for t in table.values()])}
    if args.density_bounds is not None:
        summary["spearman_bounded_vs_true_return"] = spearman([t["bounded_return_mean"] for t in table.values()],
                                                              [t["true_return_mean"] for t in table.values()])
    env.close()
    os.makedirs(args.output_dir, exist_ok=True)
    with open(os.path.join(args.output_dir, "reference.json"), "w") as f:
        json.dump(summary, f, indent=1)
    write_reference_csv(os.path.join(args.output_dir, "reference.csv"), table)
    plot_reference_steps(curves, os.path.join(args.output_dir, "reference.png"),
                         f"{args.env_id}: VIPER reward along the episode ({args.reward_mode})")
    print(f"{args.env_id}, {args.reward_mode} VIPER reward of {args.reward_model}:")
    w = max(map(len, table))
    for k, t in table.items():
        bounded = ("" if args.density_bounds is None else
                   f"  bounded return {t['bounded_return_mean']:.1f} (position {t['bounded_position']:.2f})")
        print(f"  {k:<{w}}  VIPER return {t['viper_return_mean']:>10.1f} +- {t['viper_return_std']:<8.1f} "
              f"({t['viper_reward_per_step']:.2f} / step)  true return {t['true_return_mean']:.1f}  "
              f"(random -> expert: VIPER {t['viper_position']:.2f}, true {t['true_position']:.2f}){bounded}")
    print(f"Spearman rho over the behaviours (VIPER vs true return): {summary['spearman_viper_vs_true_return']:.3f}"
          + ("" if args.density_bounds is None else
             f"; bounded VIPER vs true return: {summary['spearman_bounded_vs_true_return']:.3f}"))
    for k, v in broken.items():
        print(f"WARNING: '{k}' gets {100 * v:.0f}% of the way from random actions to the expert by "
              f"{'VIPER' if args.density_bounds is None else 'bounded VIPER'} return "
              f"but {100 * table[k]['true_position']:.0f}% by true return: the agent can climb this reward without "
              f"doing the task; fix the video model before a long agent run")
    print(f"-> {args.output_dir}/reference.json, reference.csv, reference.png")
    return summary


# ---------------------------------------------------------------------------------------------
# eval.py heatmap: where in the frame does the reward come from?
# ---------------------------------------------------------------------------------------------
def token_log_probs(rm, frames, task, steps):
    """Per-token log p of frame t given the earlier frames of its (conditional) window: [len(steps), h, w]."""
    import torch

    L, k = rm.seq_len, rm.frame_skip
    codes = rm.encode(torch.from_numpy(np.ascontiguousarray(frames))[None])[0]  # [T, h, w]
    labels, out = rm.labels(task), []
    with torch.inference_mode():
        for t in steps:
            idx = [t - j * k for j in reversed(range(L)) if t - j * k >= 0]  # the first-steps rule of the reward
            window = codes[idx][None]
            logp = rm.model(window, labels).float().log_softmax(-1)
            logp = logp.gather(-1, window.flatten(1)[..., None])[0, :, 0]
            out.append(logp.view(len(idx), *rm.model.token_hw)[-1].cpu().numpy())
    return np.stack(out)


def eval_heatmap(args: HeatmapArgs):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rm = load_reward_model(args.reward_model, args.cuda, task=args.env_id)
    sources = {"expert": sorted(glob.glob(os.path.join(args.data_dir, args.env_id, "test", "*.npz"))),
               "random": sorted(glob.glob(os.path.join(args.random_dir, args.env_id, "*", "*.npz")))}
    for name, paths in sources.items():
        if not paths:
            folder = args.data_dir if name == "expert" else args.random_dir
            sys.exit(f"error: no {name} episodes for {args.env_id} under {folder!r}")
    rows = []
    for name, paths in sources.items():
        video = np.load(paths[0])["video"]
        steps = np.linspace((rm.seq_len - 1) * rm.frame_skip, len(video) - 1, args.frames).astype(int)
        rows.append((name, paths[0], video[steps], steps, token_log_probs(rm, video, args.env_id, steps)))
    vmin = min(r[4].min() for r in rows)
    fig, axes = plt.subplots(4, args.frames, figsize=(1.6 * args.frames, 7), squeeze=False)
    for i, (name, path, frames, steps, maps) in enumerate(rows):
        for j in range(args.frames):
            axes[2 * i, j].imshow(frames[j])
            axes[2 * i, j].set_title(f"{name}, t={steps[j]}", fontsize=7)
            im = axes[2 * i + 1, j].imshow(maps[j], vmin=vmin, vmax=0, cmap="magma", interpolation="nearest")
            axes[2 * i + 1, j].set_title(f"log p = {maps[j].sum():.1f}", fontsize=7)
    for ax in axes.flat:
        ax.set_xticks([]), ax.set_yticks([])
    fig.colorbar(im, ax=axes, shrink=0.6, label="log p per token (nats)")
    fig.suptitle(f"{args.env_id}: per-token log-likelihood of each frame given its window", fontsize=9)
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    fig.savefig(args.output, dpi=80)
    plt.close(fig)
    for name, path, _, _, maps in rows:
        print(f"{name} ({path}): mean log p per frame {maps.sum((1, 2)).mean():.2f}, per token {maps.mean():.3f}")
    print(f"-> {args.output}")


# ---------------------------------------------------------------------------------------------
# eval.py replay: what the reward pays the agent's own steps, by how good they are for the task
# ---------------------------------------------------------------------------------------------
def replay_episodes(path, n):
    """The last `n` complete episodes of a replay.npz, oldest first: [(frames [T+1, ...], task rewards [T])]."""
    from train_viper_dreamer import read_replay

    try:
        f = read_replay(path, ["size", "ptr", "image", "task", "is_first"])
    except ValueError as e:
        sys.exit(f"error: {e}")
    size, ptr = int(f["size"]), int(f["ptr"])
    roll = -ptr % max(size, 1)  # a ring buffer that wrapped holds its oldest step at ptr
    image, task, first = (np.roll(f[k][:size], roll, 0) for k in ("image", "task", "is_first"))
    starts = np.flatnonzero(first)  # the steps after the last start belong to an episode still running
    spans = list(zip(starts[:-1], starts[1:]))[-n:]
    return [(image[a:b], task[a + 1:b]) for a, b in spans]


def reward_by_task_bin(steps, edges):
    """[(count, median, mean)] of the VIPER rewards whose step's task reward falls in each bin (last edge included)."""
    viper, task = np.concatenate([v for v, _ in steps]), np.concatenate([t for _, t in steps])
    rows = []
    for i, (lo, hi) in enumerate(zip(edges[:-1], edges[1:])):
        m = (task >= lo) & ((task <= hi) if i == len(edges) - 2 else (task < hi))
        rows.append((int(m.sum()), float(np.median(viper[m])) if m.any() else None,
                     float(viper[m].mean()) if m.any() else None))
    return rows


def eval_replay(args: ReplayArgs):
    """Score the agent's last replayed episodes and the expert's with a video model; bin their steps by task reward.
    A reward that works pays the agent's good steps about what it pays the expert's; one that pays the expert's
    exact frames only gives a learning agent nothing to climb."""
    replay_path, info_path = os.path.join(args.run, "replay.npz"), os.path.join(args.run, "run.json")
    for path in (replay_path, info_path):
        if not os.path.isfile(path):
            sys.exit(f"error: {path!r} does not exist: --run takes an agent's output dir from train_viper_dreamer.py "
                     f"(it writes replay.npz unless run with --no-save-replay)")
    with open(info_path) as f:
        info = json.load(f)
    env_id = info["env_id"]
    precision = info.get("reward_precision", "fp32") if args.reward_precision == "run" else args.reward_precision
    paths = sorted(glob.glob(os.path.join(args.data_dir, env_id, "test", "*.npz")))
    if not paths:
        sys.exit(f"error: no expert episodes under {os.path.join(args.data_dir, env_id, 'test')!r}")
    episodes = replay_episodes(replay_path, args.episodes)
    if not episodes:
        sys.exit(f"error: no complete episode in {replay_path!r}")
    rm = load_reward_model(args.reward_model, args.cuda, task=env_id, precision=precision)
    agent = [(episode_viper_rewards(rm, frames, env_id, args.reward_mode), task) for frames, task in episodes]
    expert = []
    for path in paths:
        video, reward = load_episode(path)
        expert.append((episode_viper_rewards(rm, video, env_id, args.reward_mode), reward[1:]))
    edges = np.linspace(0.0, max(float(t.max()) for _, t in expert), args.bins + 1)
    a_rows, e_rows = reward_by_task_bin(agent, edges), reward_by_task_bin(expert, edges)
    fmt = lambda v: "—" if v is None else f"{v:.1f}"
    lines = ["| task reward per step | agent steps | agent VIPER reward (median / mean) | expert steps | "
             "expert VIPER reward (median / mean) |", "|---|---|---|---|---|"]
    for lo, hi, a, e in zip(edges[:-1], edges[1:], a_rows, e_rows):
        lines.append(f"| {lo:.2f}–{hi:.2f} | {a[0]} | {fmt(a[1])} / {fmt(a[2])} | {e[0]} | {fmt(e[1])} / {fmt(e[2])} |")
    table = "\n".join(lines)
    summary = {"run": args.run, "reward_model": args.reward_model, "env_id": env_id, "mode": args.reward_mode,
               "reward_precision": "bf16" if rm.bf16 else "fp32",
               "agent_episodes": len(agent), "expert_episodes": len(expert), "task_reward_edges": edges.tolist(),
               "agent": [dict(zip(("steps", "median", "mean"), r)) for r in a_rows],
               "expert": [dict(zip(("steps", "median", "mean"), r)) for r in e_rows]}
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w") as f:
        json.dump(summary, f, indent=1)
    with open(os.path.splitext(args.output)[0] + ".md", "w") as f:
        f.write(table + "\n")
    print(f"{env_id}: VIPER reward per step (nats, before any --density-bounds) of the last {len(agent)} replayed "
          f"episodes of {args.run} and of {len(expert)} expert test episodes, by task reward per step\n{table}")
    return summary


# ---------------------------------------------------------------------------------------------
# eval.py episodes: the agent's VIPER return per episode against the reference behaviours
# ---------------------------------------------------------------------------------------------
def read_episodes(run):
    """{step, return, viper_return} arrays of a run's training episodes: episodes.csv, or the tensorboard
    scalars charts/episodic_return and charts/episodic_viper_return for runs that predate the file."""
    import csv

    path = os.path.join(run, "episodes.csv")
    if os.path.isfile(path):
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
        return {k: np.array([float(r[k]) for r in rows]) for k in ("step", "return", "viper_return")}
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(run, size_guidance={"scalars": 0})
    acc.Reload()
    tags = acc.Tags()["scalars"]
    if "charts/episodic_return" not in tags:
        sys.exit(f"error: {run!r} has neither episodes.csv nor tensorboard episode returns")
    ret = {e.step: e.value for e in acc.Scalars("charts/episodic_return")}
    vip = {e.step: e.value for e in acc.Scalars("charts/episodic_viper_return")} \
        if "charts/episodic_viper_return" in tags else {}
    steps = sorted(ret)
    return {"step": np.array(steps, float), "return": np.array([ret[s] for s in steps]),
            "viper_return": np.array([vip.get(s, np.nan) for s in steps])}


def episode_bins_table(runs, width):
    """Markdown table: per `width` env steps (rows) and run (columns), the mean true / VIPER return of the
    training episodes that ended in that bin ("—" where a run has none). Read beside the reference lines, it
    shows whether the VIPER return climbs towards the expert's and whether the true return follows."""
    top = max(int(ep["step"].max()) for ep in runs.values())
    lines = ["| env steps | " + " | ".join(runs) + " |", "|---|" + "---|" * len(runs)]
    for lo in range(0, top, width):
        cells = []
        for ep in runs.values():
            b = (ep["step"] > lo) & (ep["step"] <= lo + width)
            vip = ep["viper_return"][b]
            cells.append("—" if not b.any() else f"{ep['return'][b].mean():.0f} / " +
                         ("—" if np.isnan(vip).all() else f"{np.nanmean(vip) / 1000:.1f}k"))
        lines.append(f"| {lo / 1000:g}–{(lo + width) / 1000:g}k | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def eval_episodes(args: EpisodesArgs):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if args.bin < 1:
        sys.exit(f"error: --bin must be >= 1 env step, got {args.bin}")
    runs = {}
    for spec in args.run:
        label, sep, path = spec.partition("=")
        label, path = (label, path) if sep else (os.path.basename(os.path.normpath(spec)), spec)
        if not os.path.isdir(path):
            sys.exit(f"error: run dir {path!r} does not exist")
        if label in runs:
            sys.exit(f"error: two runs are labelled {label!r}: name them with label=dir")
        runs[label] = read_episodes(path)
        if len(runs[label]["step"]) == 0:
            sys.exit(f"error: {path!r} has no finished training episode yet")
    ref = {}
    if args.reference:
        if not os.path.isfile(args.reference):
            sys.exit(f"error: --reference {args.reference!r} does not exist (write it with eval.py reference)")
        ref = json.load(open(args.reference))["behaviours"]
    fig, axes = plt.subplots(2, 1, figsize=(9, 6.5), sharex=True)
    run_colors = dict(zip(runs, ["tab:blue", "tab:red", "tab:orange", "tab:pink", "tab:brown"] * 4))
    ref_colors = plt.cm.viridis(np.linspace(0.0, 0.9, max(1, len(ref))))  # dashed lines, apart from the runs
    for ax, key, label in ((axes[0], "viper_return", "VIPER return per episode (nats)"),
                           (axes[1], "return", "true task return per episode")):
        for name, ep in runs.items():
            y, c = ep[key], run_colors[name]
            tag = name if len(runs) > 1 else "agent"
            ax.plot(ep["step"], y, ".", ms=3, color=c, alpha=0.4, label=f"{tag} (training episodes)")
            if len(y) >= args.smooth:
                avg = np.convolve(y, np.ones(args.smooth) / args.smooth, mode="valid")
                ax.plot(ep["step"][args.smooth - 1:], avg, color=c, label=f"{tag}, mean of {args.smooth}")
        for (name, t), c in zip(ref.items(), ref_colors):
            v = t["viper_return_mean" if key == "viper_return" else "true_return_mean"]
            ax.axhline(v, color=c, ls="--", lw=1, label=f"{name} ({v:.0f})")
        ax.set(ylabel=label)
    vals = np.concatenate([*(ep["viper_return"][np.isfinite(ep["viper_return"])] for ep in runs.values()),
                           [t["viper_return_mean"] for t in ref.values()]])
    if len(vals) and vals.max() < 0:  # log-likelihoods: nats from -1e2 to -1e5 all readable on a log scale
        axes[0].set_yscale("symlog", linthresh=max(1.0, -vals.max() / 10))
        axes[0].set_ylim(vals.min() * 1.5, vals.max() / 3)
        label_symlog_y(axes[0])
    axes[0].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    axes[0].set_title(args.title or ", ".join(runs), fontsize=9)
    axes[1].set(xlabel="env steps")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    fig.savefig(args.output, dpi=80)
    plt.close(fig)
    table = episode_bins_table(runs, args.bin)
    with open(os.path.splitext(args.output)[0] + ".md", "w") as f:
        f.write(f"Training episodes, mean true / VIPER return (nats) per {args.bin:,} env steps\n\n{table}\n")
    last = slice(-args.smooth, None)
    for name, ep in runs.items():
        vip = ep["viper_return"][last]  # nan for a task-reward run: it has no VIPER return
        vip = "—" if np.isnan(vip).all() else f"{np.nanmean(vip):.1f}"
        print(f"{name}: {len(ep['step'])} episodes; last {args.smooth}: VIPER return {vip}, "
              f"true return {np.mean(ep['return'][last]):.1f}")
    print(f"{table}\n-> {args.output}")
    return table


# ---------------------------------------------------------------------------------------------
# eval.py tokenizer: does the VQ-GAN keep the small moving things the reward depends on?
# ---------------------------------------------------------------------------------------------
def object_pixels(frames, min_brightness=0.0, tol=0.1):
    """(bool [T,H,W], background float [H,W,3]): pixels of moving objects in an episode's frames (uint8
    [T,H,W,3]): unlike the episode's background (its median frame, returned in [0, 1]) and changed since the
    previous frame, i.e. where an object is now. The first frame has none. PSNR over whole frames hides a lost
    1-pixel ball; these pixels do not."""
    x = frames.astype(np.float32) / 255
    background = np.median(x, axis=0)
    out = np.zeros(x.shape[:3], bool)
    out[1:] = (np.abs(x[1:] - background).max(-1) > tol) & (np.abs(x[1:] - x[:-1]).max(-1) > tol)
    return out & (x.min(-1) >= min_brightness), background


def object_crops(frames, recon, objects, n=8, size=16, zoom=4):
    """uint8 image: n frames with objects, a size x size crop around each frame's object pixels, zoomed;
    originals in the top row, reconstructions below."""
    import cv2

    idx = np.flatnonzero(objects.any((1, 2)))
    idx = idx[np.linspace(0, len(idx) - 1, min(n, len(idx))).astype(int)]
    rows = [[], []]
    for t in idx:
        ys, xs = np.nonzero(objects[t])
        y0 = int(np.clip(ys.mean() - size / 2, 0, frames.shape[1] - size))
        x0 = int(np.clip(xs.mean() - size / 2, 0, frames.shape[2] - size))
        for row, video in zip(rows, (frames, recon)):
            crop = video[t, y0:y0 + size, x0:x0 + size]
            row.append(np.pad(cv2.resize(crop, None, fx=zoom, fy=zoom, interpolation=cv2.INTER_NEAREST),
                              ((1, 1), (1, 1), (0, 0)), constant_values=255))
    return np.concatenate([np.concatenate(r, 1) for r in rows], 0)


def tokenizer_scores(model, paths, min_brightness):
    """Reconstruct the episodes at `paths` -> (scores, crops of the first episode with moving objects or None).
    Frames are masked first: the pixels the model was trained to reconstruct."""
    import torch

    from train_vqgan import apply_mask, read_video

    mask = None if model.mask is None else model.mask.cpu()
    sq_err, obj_err, kept, crops = [], [], [], None
    for path in paths:
        frames = apply_mask(torch.from_numpy(read_video(path, model.image_size)), mask).numpy()
        recon = model.decode(model.encode(frames)).cpu().numpy()
        x, r = frames.astype(np.float32) / 255, recon.astype(np.float32) / 255
        sq_err.append(((r - x) ** 2).mean((1, 2, 3)))
        objects, background = object_pixels(frames, min_brightness)  # the median frame, computed once
        for t in np.flatnonzero(objects.any((1, 2))):
            obj_err.append((r[t] - x[t])[objects[t]].ravel())
            # the share of the object's contrast against the background that the reconstruction keeps, at its
            # best pixel: 1 = drawn exactly, ~0.5 = a faint blur, <= 0 = background only (lost)
            d, e = (x[t] - background)[objects[t]], (r[t] - background)[objects[t]]
            kept.append(float(((d * e).sum(-1) / (d * d).sum(-1)).max()))
        if crops is None and kept:
            crops = object_crops(frames, recon, objects)
    mse, err, kept = np.concatenate(sq_err), np.concatenate(obj_err or [np.zeros(0)]), np.array(kept)
    return {"episodes": len(paths), "frames": len(mse),
            "psnr": float(np.mean(10 * np.log10(1 / np.maximum(mse, 1e-3 / 255 ** 2)))),
            "object_frames": len(kept), "object_pixels_per_frame": len(err) / 3 / max(len(kept), 1),
            "object_psnr": float(10 * np.log10(1 / max(np.mean(err ** 2), 1e-8))) if len(kept) else None,
            "object_contrast_kept": float(np.median(kept)) if len(kept) else None,
            "object_frames_lost": float(np.mean(kept < 0.25)) if len(kept) else None}, crops


def eval_tokenizer(args: TokenizerArgs):
    import cv2
    import torch

    from train_vqgan import find_tasks, load_vqgan

    device = "cuda" if args.cuda and torch.cuda.is_available() else "cpu"
    models = {path: load_vqgan(load_checkpoint(path, "vqgan"), device) for path in args.checkpoints}
    try:
        tasks = find_tasks(args.data_dir, args.tasks or [])
    except FileNotFoundError as e:
        sys.exit(f"error: {e}")
    summary, rows = {path: {} for path in models}, []  # image rows: the originals, then one per checkpoint
    for task in tasks:
        paths = sorted(glob.glob(os.path.join(args.data_dir, task, args.split, "*.npz")))
        if not paths:
            sys.exit(f"error: no episodes in {os.path.join(args.data_dir, task, args.split)!r}")
        for ckpt, model in models.items():
            s, crops = tokenizer_scores(model, paths, args.min_brightness)
            summary[ckpt][task] = s
            print(f"{ckpt}, {task}: {s['frames']} frames, PSNR {s['psnr']:.2f} dB; moving-object pixels (brightness "
                  f">= {args.min_brightness}): {s['object_pixels_per_frame']:.1f} per frame in {s['object_frames']} "
                  "frames, " + (f"PSNR {s['object_psnr']:.2f} dB, contrast kept {s['object_contrast_kept']:.2f} "
                                f"(median), object lost (< 0.25 of its contrast kept) in "
                                f"{100 * s['object_frames_lost']:.1f}% of frames" if s["object_frames"] else "none found"))
            if crops is not None and len(rows) < 1 + len(models):  # the first task with moving objects
                half = len(crops) // 2
                rows += [] if rows else [("original", crops[:half])]
                rows.append((os.path.basename(os.path.dirname(os.path.abspath(ckpt))), crops[half:]))
    out_dir = os.path.dirname(os.path.abspath(args.output))
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "summary.json"), "w") as f:
        json.dump({"min_brightness": args.min_brightness, "checkpoints": summary}, f, indent=1)
    if rows:  # one row per image, its name (the checkpoint's folder) in a label column on the left
        width = max(len(name) for name, _ in rows) * 9 + 8
        labelled = [np.concatenate([cv2.putText(np.full((img.shape[0], width, 3), 255, np.uint8), name,
                                                (4, img.shape[0] // 2 + 5), cv2.FONT_HERSHEY_SIMPLEX, 0.45,
                                                (0, 0, 0), 1, cv2.LINE_AA), img], 1) for name, img in rows]
        if len({img.shape for img in labelled}) == 1:  # the same crops unless the checkpoints' masks differ
            cv2.imwrite(args.output, cv2.cvtColor(np.concatenate(labelled, 0), cv2.COLOR_RGB2BGR))
            print(f"-> {args.output}")
    return summary

if __name__ == "__main__":
    args = tyro.cli(Union[
        Annotated[RewardArgs, tyro.conf.subcommand("reward")],
        Annotated[AgentArgs, tyro.conf.subcommand("agent")],
        Annotated[SamplesArgs, tyro.conf.subcommand("samples")],
        Annotated[CurvesArgs, tyro.conf.subcommand("curves")],
        Annotated[ReferenceArgs, tyro.conf.subcommand("reference")],
        Annotated[HeatmapArgs, tyro.conf.subcommand("heatmap")],
        Annotated[EpisodesArgs, tyro.conf.subcommand("episodes")],
        Annotated[TokenizerArgs, tyro.conf.subcommand("tokenizer")],
        Annotated[ReplayArgs, tyro.conf.subcommand("replay")],
    ])
    {RewardArgs: eval_reward, AgentArgs: eval_agent, SamplesArgs: eval_samples, CurvesArgs: eval_curves,
     ReferenceArgs: eval_reference, HeatmapArgs: eval_heatmap, EpisodesArgs: eval_episodes,
     TokenizerArgs: eval_tokenizer, ReplayArgs: eval_replay}[type(args)](args)
