"""VIPER on a single-file DreamerV3 from 64x64 pixels: an agent rewarded by a video model, not by the task.

VIPER (Escontrela et al., NeurIPS 2023): a video model trained on expert videos scores how likely it finds
the agent's own frames; that log-likelihood is the reward and the agent never sees the task reward. The agent
is DreamerV3 as first published (arXiv:2301.04104 v1 and its code of that time), which VIPER built on;
`--reward task` trains it on the env reward instead (the oracle).

The algorithm, top to bottom:
1. Reward (`StepRewards`, once per env step, before the step enters the replay): videogpt.pt (frozen VQ-GAN
   + VideoGPT over L frames every k frames, class label --env-id) scores the window ending at the new frame:
     conditional (paper formula, default):  r_t = log p(x_t | x_{t-(L-1)k}, ..., x_{t-k})
     joint (official code's default):       r_t = log p(x_{t-(L-1)k}, ..., x_t)
   summed over the frame's codes, <= 0 (0 = as expert-like as it gets). Episode starts use the available
   prefix, so the reset frame gets log p(x_0). Stored as replay field `density`, never recomputed;
   `--density-bounds LO HI` stores clip((r_t - LO) / (HI - LO), 0, 1) instead (the official optional rescale).
   `--background-model` (ours, off by default) subtracts a random-play video model's log p of the same frame.
2. World model on replayed chunks: CNN encoder -> RSSM (GRU state h, 16|32 categoricals z with 1% unimix,
   straight-through samples) -> heads on [h, z]: decoder (MSE), `density` and (with a task reward) `task`
   as twohot over 255 symlog bins, continue flag; KL balancing 0.5 / 0.1 with 1 free nat.
3. Plan2Explore: 8 MLPs predict z_{t+1} from (h_t, z_t, a_t) on replayed (detached) states; in imagination
   their disagreement (std across members, mean over dims) rewards transition t -> t+1.
4. Actor-critic in imagination (15 steps from every replayed state): one critic per reward term with a
   nonzero scale (REWARD_TERMS: `density`, `disagreement`, `task`), each with a slow critic and a return
   normaliser; lambda-return (0.95, discount 1 - 1/333); advantages mixed as
   A = sum_k s_k (R^k - v_k) / max(1, P95_k - P5_k) / sum s_k.
   Continuous actions (DMC): backprop through the dynamics, Normal(tanh(mu), sigma in [0.1, 1]); discrete
   (Atari): REINFORCE with 1% unimix; entropy bonus 3e-4. `--reward viper` defaults: density 1, task 0
   (the env reward reaches no network), disagreement 0 (the official `videogpt_prior_rb` setting has 1:
   `--disagreement-scale 1`; see the deviations below).
5. One env, uniform replay, one update every batch_size * batch_length / train_ratio env steps after
   `--prefill` random steps; greedy evaluation on the true task reward every --eval-every steps.

Deliberate deviations from the paper and the official code:
  * `cpu` size (the default, for 2 CPU cores): GRU/dense 128, CNN multiplier 8, one MLP layer, 16x16 latents,
    lr 3e-4 / 1e-4 / 1e-4 and Adam beta2 0.99 (reason at PRESETS), batch 4 x 32 at train ratio 64: one update
    every 2 env steps, the paper's update rate, on 4x smaller batches. Sizes XS..XL keep the paper's values.
  * One env, one replay stream; every replayed chunk starts from the learned initial latent; `--prefill`.
  * Evaluation acts with the policy's mode (`eval.py agent --sample` samples, as the official eval does).
  * The replay stores the clipped action; no bias before LayerNorm; prior logits computed after the
    posterior loop (same values, fewer sequential ops); the agent trains in bf16 autocast on CUDA only,
    fp32 on CPU; the video model scores frames in bf16 wherever bf16 is native (--reward-precision auto).
  * VIPER: no step is dropped at episode starts (official: the first 15), step 0 is scored; no task head
    at all with --task-scale 0 (official: trained outside the gradients, for logs); disagreement
    from (h_t, z_t, a_t) -> z_{t+1} (Plan2Explore's definition; DreamerV3's code uses the arrival state);
    pairs across an episode start left out of the ensemble loss; the ensemble sees imagined actions bounded
    to [-1, 1] as the GRU does (official: raw samples, though trained on env-clipped actions);
    --reward-mode defaults to conditional.
  * VIPER: the Plan2Explore term is off by default (official: weight 1). Measured on dmc_cartpole_balance,
    CPU recipe, seed 0, 100k steps: with weight 1 the agent's VIPER return stalled and its final 20-episode
    return was 399.2; with weight 0 it reached 923.6 (README, Results), and each update costs ~40% less
    (no ensemble, no second critic: 522 against 898 wall ms in bench/bench_dreamer.py).

Code map: `Args` (defaults by --size and --reward: PRESETS) -> env (`make_env`, copied) -> networks (`RSSM`,
heads, `Actor`, `Ensemble`) -> reward terms (REWARD_TERMS, `StepRewards`) -> `Replay` -> `Dreamer` (losses,
imagination, `train_step`) -> `main`, the loop. Appendix A: run files and checks; appendix B: the frozen
reward model (`VQGAN`, `VideoGPT`, `RewardModel`, copied). Outputs and measured results: README.

    python train_viper_dreamer.py --env-id dmc_cartpole_balance           # the task oracle (CPU recipe)
    python train_viper_dreamer.py --env-id dmc_cartpole_balance --reward viper \
        --reward-model runs/videogpt/videogpt.pt                          # VIPER: the density reward
    python train_viper_dreamer.py --output-dir runs/x --resume ...        # continue runs/x (same flags)
"""

import argparse
import copy
import ctypes
import json
import math
import os
import random
import shlex
import signal
import subprocess
import sys
import threading
import time
import zipfile
import zlib
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Annotated, Literal, Optional, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro
from tqdm import tqdm


@dataclass
class Args:
    env_id: str = "dmc_cartpole_balance"
    """environment: `dmc_<domain>_<task>` (DeepMind Control, continuous) or `atari_<game>` (discrete)"""
    reward: Literal["task", "viper"] = "task"
    """reward the agent learns from: `task` = the environment's reward (the oracle baseline); `viper` = the
    video model's log-likelihood of the agent's frames (needs --reward-model; the env reward is then only
    logged and evaluated, unless --task-scale > 0). Sets the defaults of the three --*-scale flags"""
    reward_model: Annotated[Optional[str], tyro.conf.arg(
        metavar="PATH", help_behavior_hint="(required with --reward viper)")] = None
    """videogpt.pt written by train_videogpt.py; its class map must hold --env-id"""
    reward_mode: Literal["conditional", "joint"] = "conditional"
    """VIPER reward of step t: `conditional` = log p(x_t | earlier frames of its window) (paper formula);
    `joint` = log p(whole window ending at t) (official code's default)"""
    density_bounds: Annotated[Optional[Tuple[float, float]], tyro.conf.arg(
        metavar="LO HI", help_behavior_hint="(default: off, the reward is the log-likelihood itself)")] = None
    """rescale each step's density reward to clip((r - LO) / (HI - LO), 0, 1), LO HI in nats per step (the
    official reward model's optional `reward_scale`, unused in its configs), e.g. the random policy's and the
    expert's VIPER reward per step from `eval.py reference`. Log-likelihoods are <= 0, so where an episode
    can end early (an Atari game lost fast) their sum pays for ending it; rescaled, every step earns >= 0.
    Logged VIPER returns stay in nats"""
    background_model: Annotated[Optional[str], tyro.conf.arg(
        metavar="PATH", help_behavior_hint="(default: off, the density is the reward model's log-likelihood)")] = None
    """a second videogpt.pt, trained with the same recipe on random play of this env: the density becomes the
    likelihood ratio log p(x_t | window) - log p_background(x_t | window), so frames that any player shows (on
    Pong, the reset after a point, which the expert model predicts best of all) earn about nothing and
    expert-like play earns most (results/atari_pong/reward_ratio). Not in the paper or the official code.
    --density-bounds then apply to the ratio"""
    reward_precision: Literal["fp32", "bf16", "auto"] = "auto"
    """the video model's transformer blocks when scoring frames: `fp32`; `bf16` autocast (the output layer
    and the VQ-GAN stay fp32; with the 4,000-step Pong model a step scores in 0.56x the fp32 time on an AMD
    EPYC with AVX512-BF16, and rewards of -7 to -66 nats move by 0.05 on average, 0.46 at most; a same-seed
    30k-step cartpole_balance run learned the same within noise); `auto`: bf16 on CUDA and on CPUs with
    native bf16 (avx512_bf16 or amx_bf16 in /proc/cpuinfo), fp32 on others, which emulate bf16 many times
    slower. run.json records the choice; runs made before this default scored in fp32"""
    allow_new_task: bool = False
    """score --env-id with a video model whose recorded training tasks do not include it (off: an error)"""
    reference_returns: Annotated[Optional[str], tyro.conf.arg(metavar="PATH", help_behavior_hint="(optional)")] = None
    """reference.json of `eval.py reference` (VIPER returns of expert, degraded, random, zero and constant
    actions): lines beside the agent's VIPER return per episode in tensorboard (custom scalars tab)"""
    density_scale: float = 0.0
    """weight of the `density` reward term (VIPER's video-model log-likelihood) in the actor's advantage;
    0 = off (no density head, no critic). Default: 1 with --reward viper, 0 with --reward task"""
    disagreement_scale: float = 0.0
    """weight of the `disagreement` reward term (Plan2Explore: the ensemble's disagreement); 0 = off (no
    ensemble, no critic). Default 0 (official VIPER: 1 with --reward viper; measured worse on the CPU recipe)"""
    task_scale: float = 1.0
    """weight of the `task` reward term (the env reward); 0 = off: no task head and no critic, so the env
    reward reaches no gradient. Default: 1 with --reward task, 0 with --reward viper"""
    size: Literal["cpu", "XS", "S", "M", "L", "XL"] = "cpu"
    """model size (SIZES: paper sizes XS..XL, or `cpu`: small enough for 2 CPU cores); also sets the defaults
    of the learning rates and --adam-beta2 (PRESETS)"""
    total_steps: int = 100_000
    """env steps (agent decisions; DMC repeats each action for 2 simulator steps, Atari for 4 frames)"""
    train_ratio: float = 64.0
    """replayed steps per env step: 64 at batch 4 x 32 is one update every 2 env steps, the paper's update
    rate (VIPER's DMC agent config: 64 at batch 16 x 64; DreamerV3's paper: 512)"""
    prefill: int = 2500
    """env steps with uniform random actions before learning starts"""
    model_lr: float = 3e-4
    """world model Adam learning rate (`cpu` size 3e-4; paper sizes 1e-4)"""
    actor_lr: float = 1e-4
    """actor Adam learning rate (`cpu` size 1e-4; paper sizes 3e-5)"""
    critic_lr: float = 1e-4
    """critic Adam learning rate (`cpu` size 1e-4; paper sizes 3e-5)"""
    adam_beta2: float = 0.99
    """Adam second-moment decay of all optimisers (`cpu` size 0.99, reason at PRESETS; paper sizes 0.999)"""
    baseline_grad: bool = True
    """continuous actions: the backprop actor loss -(R_lambda - v(s_t)) also differentiates the baseline
    v(s_t) through the imagined states, as DreamerV3's v1 code does; --no-baseline-grad stops it, so the
    actor climbs the lambda-return alone (DreamerV2's dynamics-backprop objective)"""
    batch_size: int = 4
    """replayed chunks per update (the CPU recipe; paper: 16)"""
    batch_length: int = 32
    """steps per replayed chunk (the CPU recipe; paper: 64)"""
    replay_capacity: int = 1_000_000
    """replay size in env steps (oldest steps are overwritten); ~12.3 KB each, allocated as filled"""
    eval_every: int = 10_000
    """env steps between evaluations (greedy policy, true task return; also at the end)"""
    eval_episodes: int = 5
    """episodes per evaluation"""
    save_every: int = 10_000
    """env steps between checkpoints (also at the end)"""
    save_replay: bool = True
    """also write the replay to replay.npz at each checkpoint, for an exact --resume"""
    log_every: int = 1_000
    """env steps between tensorboard scalar logs"""
    seed: int = 1
    """seed of torch, numpy, the env (seed) and the eval env (seed + 1)"""
    output_dir: Annotated[Optional[str], tyro.conf.arg(
        metavar="PATH", help_behavior_hint="(default: runs/<env-id>__<dreamer|viper>__<seed>__<unix time>)")] = None
    """where logs and checkpoints go"""
    resume: bool = False
    """continue the run in --output-dir from its agent.pt (and replay.npz if present)"""
    cuda: bool = True
    """use CUDA when available (bf16 autocast there); CPU otherwise"""
    threads: int = 1
    """torch CPU threads: 2 make an update 1.42x faster on an idle 2-core CPU (bench/bench_threads.py); 1 when
    the cores run other jobs too (two runs on 1 thread each do 1.36x the work of one run on 2)"""
    compile: bool = False
    """torch.compile the world-model loss and the imagination rollout (forward and backward): an oracle update
    at the CPU recipe takes 0.75x the eager time, VIPER's 0.80x (bench/bench_precision.py), after 2-5 min of
    compiling at the first update (cached for later runs); needs a C++ compiler. Same random numbers as eager,
    floats differ by rounding"""


# Model sizes: GRU units, dense units, CNN multiplier, MLP layers, latents, classes per latent.
SIZES = {
    "cpu": dict(deter=128, units=128, depth=8, layers=1, stoch=16, classes=16),
    "XS": dict(deter=256, units=256, depth=24, layers=1, stoch=32, classes=32),
    "S": dict(deter=512, units=512, depth=32, layers=2, stoch=32, classes=32),
    "M": dict(deter=1024, units=640, depth=48, layers=3, stoch=32, classes=32),
    "L": dict(deter=2048, units=768, depth=64, layers=4, stoch=32, classes=32),
    "XL": dict(deter=4096, units=1024, depth=96, layers=5, stoch=32, classes=32),
}
# The flag defaults that depend on --size and --reward; Args' own defaults are PRESETS for `cpu` and `task`.
# `cpu` optimiser: a CPU affords ~5k updates in 100k env steps, not the paper's ~50k. The first updates'
# large image-loss gradients inflate Adam's second moment; with beta2 0.999 the encoder then learns
# ~1000x slower than its learning rate for thousands of updates and the posterior ignores the small
# cartpole (measured: no escape in 1000 updates). beta2 0.99 forgets them 10x sooner (escape after
# ~600 updates), and larger learning rates make up for the fewer updates.
PRESETS = {
    "cpu": dict(model_lr=3e-4, actor_lr=1e-4, critic_lr=1e-4, adam_beta2=0.99),
    "paper": dict(model_lr=1e-4, actor_lr=3e-5, critic_lr=3e-5, adam_beta2=0.999),  # sizes XS..XL
    "task": dict(density_scale=0.0, disagreement_scale=0.0, task_scale=1.0),
    # official videogpt_prior_rb but disagreement 0: weight 1 lost on the CPU recipe (module docstring)
    "viper": dict(density_scale=1.0, disagreement_scale=0.0, task_scale=0.0),
}
# Fixed hyperparameters of the paper (same for every domain and size).
UNIMIX = 0.01  # uniform share mixed into every categorical (latents and discrete actions)
BINS = 255  # two-hot bins, evenly spaced in symlog space on [-20, 20]
KL_FREE, KL_DYN, KL_REP = 1.0, 0.5, 0.1  # free nats, dynamics and representation KL scales
IMAG_HORIZON, GAMMA, LAMBDA = 15, 1.0 - 1.0 / 333, 0.95
ACTOR_ENT = 3e-4
SLOW_CRITIC_MIX, SLOWREG = 0.02, 1.0
RETNORM_DECAY, RETNORM_LO, RETNORM_HI = 0.99, 0.05, 0.95
ENSEMBLE_MEMBERS = 8  # Plan2Explore ensemble members (VIPER/DreamerV3 code: disag_models 8)
CORR_EPISODES = 20  # episodes in the logged correlation of VIPER and task returns
MODEL_EPS, MODEL_CLIP = 1e-8, 1000.0  # Adam epsilon and global grad-norm clip of the world model
AC_EPS, AC_CLIP = 1e-5, 100.0  # same, actor and critics


def preset(size="cpu", reward="task"):
    """The defaults of the flags that depend on --size and --reward."""
    return dict(size=size, reward=reward, **PRESETS["cpu" if size == "cpu" else "paper"], **PRESETS[reward])


# ==== ENV: copied verbatim from collect_expert_videos.py into train_viper_dreamer.py; tests/test_parity.py keeps the copies identical ====
os.environ.setdefault("MUJOCO_GL", "egl")  # headless rendering
import gymnasium as gym  # noqa: E402

DMC_TASKS = [
    "acrobot_swingup", "ball_in_cup_catch", "cartpole_balance", "cartpole_balance_sparse", "cartpole_swingup",
    "cartpole_swingup_sparse", "cheetah_run", "finger_spin", "finger_turn_easy", "finger_turn_hard",
    "hopper_hop", "hopper_stand", "pendulum_swingup", "point_mass_easy", "quadruped_run", "quadruped_walk",
    "reacher_easy", "reacher_hard", "walker_run", "walker_stand", "walker_walk",
]
ATARI_GAMES = [
    "alien", "amidar", "assault", "asterix", "boxing", "breakout", "freeway", "krull", "ms_pacman", "pong",
    "qbert", "seaquest", "space_invaders",
]
VALID_ENV_IDS = [f"dmc_{t}" for t in DMC_TASKS] + [f"atari_{g}" for g in ATARI_GAMES]


class DMCEnv(gym.Env):
    """DeepMind Control suite from pixels, as in DreamerV3/VIPER.

    64x64 RGB from camera 0 (quadruped: camera 2), action repeat 2, actions in [-1, 1],
    1000 simulator steps = 500 agent steps per episode. Rendering uses `shadowsize=0,
    offsamples=0` (no shadow map, no multisampling): ~5x faster than MuJoCo's default on CPU,
    and identical for expert videos and agent observations because both use this class.
    """

    metadata = {"render_modes": ["rgb_array"]}

    def __init__(self, domain: str, task: str, seed: int = 0, size: int = 64, action_repeat: int = 2):
        from dm_control import suite

        self.domain, self.task, self.size, self.action_repeat = domain, task, size, action_repeat
        self._env = suite.load(domain, task, task_kwargs={"random": seed})
        self.physics = self._env.physics
        self.physics.model.vis.quality.shadowsize = 0
        self.physics.model.vis.quality.offsamples = 0
        self.camera = 2 if domain == "quadruped" else 0
        spec = self._env.action_spec()
        self._low, self._high = spec.minimum.astype(np.float64), spec.maximum.astype(np.float64)
        self.action_space = gym.spaces.Box(-1.0, 1.0, spec.shape, np.float32)
        self.observation_space = gym.spaces.Box(0, 255, (size, size, 3), np.uint8)

    def render(self):
        return self.physics.render(self.size, self.size, camera_id=self.camera)

    def reset(self, seed=None, options=None):
        if seed is not None:  # dm_control draws initial states from the task's RandomState
            self._env.task._random = np.random.RandomState(seed)
        self._env.reset()
        return self.render(), {}

    def step(self, action):
        action = np.clip(np.asarray(action, np.float64), -1.0, 1.0)
        action = self._low + (action + 1.0) / 2.0 * (self._high - self._low)
        reward, terminated, truncated = 0.0, False, False
        for _ in range(self.action_repeat):
            ts = self._env.step(action)
            reward += ts.reward or 0.0
            if ts.last():
                terminated, truncated = ts.discount == 0, ts.discount != 0
                break
        return self.render(), reward, terminated, truncated, {}


class AtariEnv(gym.Env):
    """Atari through ale-py, as in DreamerV3/VIPER.

    64x64 RGB (area resize), frameskip 4 with a max over the last two frames, sticky actions
    p=0.25 (ALE v5 default), no termination on life loss, at most 108k frames per episode,
    the game's minimal action set (Pong: 6 actions).
    """

    metadata = {"render_modes": ["rgb_array"]}

    def __init__(self, game: str, seed: int = 0, size: int = 64, frameskip: int = 4):
        import ale_py

        gym.register_envs(ale_py)
        name = "".join(w.capitalize() for w in game.split("_"))
        self._env = gym.make(f"ALE/{name}-v5", frameskip=1, repeat_action_probability=0.25,
                             full_action_space=False, max_num_frames_per_episode=108_000)
        self.ale = self._env.unwrapped.ale
        self.size, self.frameskip, self._seed = size, frameskip, seed
        self.action_space = self._env.action_space
        self.observation_space = gym.spaces.Box(0, 255, (size, size, 3), np.uint8)
        self._seeded = False

    def _obs(self, frames):
        import cv2

        frame = np.maximum(frames[-2], frames[-1]) if len(frames) > 1 else frames[-1]
        return cv2.resize(frame, (self.size, self.size), interpolation=cv2.INTER_AREA)

    def render(self):
        return self._obs([self.ale.getScreenRGB()])

    def reset(self, seed=None, options=None):
        if seed is None and not self._seeded:
            seed = self._seed
        self._seeded = True
        obs, _ = self._env.reset(seed=seed)
        return self._obs([obs]), {}

    def step(self, action):
        frames, reward, terminated, truncated = [], 0.0, False, False
        for _ in range(self.frameskip):
            obs, r, terminated, truncated, _ = self._env.step(int(action))
            frames.append(obs)
            reward += float(r)
            if terminated or truncated:
                break
        return self._obs(frames[-2:]), reward, terminated, truncated, {}


def make_env(env_id: str, seed: int = 0) -> gym.Env:
    """`dmc_<domain>_<task>` or `atari_<game>` -> a gymnasium env with 64x64x3 uint8 observations."""
    if env_id not in VALID_ENV_IDS:
        raise ValueError(f"unknown env id {env_id!r}; valid ids: {', '.join(VALID_ENV_IDS)}")
    suite, name = env_id.split("_", 1)
    if suite == "dmc":
        domain = "ball_in_cup" if name.startswith("ball_in_cup") else "point_mass" if name.startswith(
            "point_mass") else name.split("_")[0]
        return DMCEnv(domain, name[len(domain) + 1:], seed=seed)
    return AtariEnv(name, seed=seed)
# ==== END ENV ====


# ---------------------------------------------------------------------------------------------
# Math: symlog, two-hot, distributions, lambda-returns, return normaliser
# ---------------------------------------------------------------------------------------------
def symlog(x):
    return torch.sign(x) * torch.log1p(torch.abs(x))


def symexp(x):
    return torch.sign(x) * torch.expm1(torch.abs(x))


def twohot(y, bins):
    """Encode y (already in bin space) as weights on its two nearest bins; outside the range -> edge bin."""
    lo = (torch.searchsorted(bins, y.contiguous(), right=True) - 1).clamp(0, len(bins) - 2)
    w_hi = ((y - bins[lo]) / (bins[lo + 1] - bins[lo])).clamp(0.0, 1.0)
    out = torch.zeros(*y.shape, len(bins), device=y.device, dtype=y.dtype)
    out.scatter_(-1, lo.unsqueeze(-1), (1.0 - w_hi).unsqueeze(-1))
    out.scatter_add_(-1, (lo + 1).unsqueeze(-1), w_hi.unsqueeze(-1))
    return out


class TwoHot:
    """Discrete regression over symlog-spaced bins: robust to reward/return scales (paper Sec. 2)."""

    def __init__(self, logits):
        self.logits = logits.float()
        self.bins = torch.linspace(-20.0, 20.0, logits.shape[-1], device=logits.device)

    @property
    def mean(self):
        return symexp((self.logits.softmax(-1) * self.bins).sum(-1))

    def log_prob(self, x):
        return (twohot(symlog(x.float()), self.bins) * self.logits.log_softmax(-1)).sum(-1)


def unimix_logits(logits, mix=UNIMIX):
    """log of (1 - mix) * softmax(logits) + mix * uniform: keeps every probability >= mix / classes."""
    probs = logits.float().softmax(-1)
    return torch.log((1.0 - mix) * probs + mix / logits.shape[-1])


def sample_onehot(logits):
    """One-hot sample with straight-through gradients (logits must be normalised log-probs)."""
    probs = logits.exp()
    u = torch.rand(*probs.shape[:-1], 1, device=probs.device, dtype=probs.dtype)  # inverse-CDF sampling
    idx = (probs.cumsum(-1) < u).sum(-1).clamp(max=probs.shape[-1] - 1)
    sample = F.one_hot(idx, probs.shape[-1]).to(probs.dtype)
    return sample + probs - probs.detach()


class ActionDist:
    """The actor's output: one-hot categorical (discrete) or Normal(tanh(mu), sigma) per dim (continuous)."""

    def __init__(self, out, discrete, minstd=0.1, maxstd=1.0):
        self.discrete = discrete
        out = out.float()
        if discrete:
            self.logits = unimix_logits(out)
        else:
            mu, std = out.chunk(2, -1)
            self.mu, self.std = torch.tanh(mu), (maxstd - minstd) * torch.sigmoid(std + 2.0) + minstd

    def sample(self):  # differentiable: straight-through (discrete) or reparameterised (continuous)
        if self.discrete:
            return sample_onehot(self.logits)
        return self.mu + self.std * torch.randn_like(self.mu)

    @property
    def mode(self):
        if self.discrete:
            return F.one_hot(self.logits.argmax(-1), self.logits.shape[-1]).float()
        return self.mu

    def log_prob(self, a):
        if self.discrete:
            return (a * self.logits).sum(-1)
        return (-0.5 * ((a - self.mu) / self.std) ** 2 - torch.log(self.std) - 0.5 * math.log(2 * math.pi)).sum(-1)

    def entropy(self):
        if self.discrete:
            return -(self.logits.exp() * self.logits).sum(-1)
        return (0.5 + 0.5 * math.log(2 * math.pi) + torch.log(self.std)).sum(-1)


def lambda_returns(reward, value, cont, gamma=GAMMA, lam=LAMBDA):
    """TD(lambda) returns over an imagined trajectory, computed backwards from a bootstrap value.

    reward[t], cont[t]: transition t -> t+1 (t < H); value[t]: critic at state t (t <= H).
    R_t = r_t + gamma c_t ((1 - lam) v_{t+1} + lam R_{t+1}),  R_H = v_H.  Returns R_0 .. R_{H-1}.
    """
    disc = gamma * cont
    interm = reward + disc * (1.0 - lam) * value[1:]
    out, last = [], value[-1]
    for t in reversed(range(reward.shape[0])):
        last = interm[t] + disc[t] * lam * last
        out.append(last)
    return torch.stack(out[::-1])


class ReturnNorm(nn.Module):
    """Scale returns by S = max(1, P95 - P5), percentiles tracked by an EMA: large returns are
    squashed, small ones are not amplified (so the entropy bonus keeps its weight in sparse tasks)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("lo", torch.zeros(()))
        self.register_buffer("hi", torch.zeros(()))

    def update(self, ret):
        q = torch.quantile(ret.detach().float().flatten(), torch.tensor([RETNORM_LO, RETNORM_HI], device=ret.device))
        self.lo.mul_(RETNORM_DECAY).add_((1 - RETNORM_DECAY) * q[0])
        self.hi.mul_(RETNORM_DECAY).add_((1 - RETNORM_DECAY) * q[1])

    def scale(self):
        return torch.clamp(self.hi - self.lo, min=1.0)


# ---------------------------------------------------------------------------------------------
# Networks
# ---------------------------------------------------------------------------------------------
def init_weights(module, scale=1.0):
    """Truncated normal with variance scale / fan_avg (the paper's initialiser); scale 0 -> zeros."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d, nn.ConvTranspose2d)):
            w = m.weight
            receptive = w[0, 0].numel() if w.dim() > 2 else 1
            fan_avg = (w.shape[0] + w.shape[1]) * receptive / 2
            std = math.sqrt(scale / fan_avg) / 0.87962566  # std of a unit normal truncated at +-2
            nn.init.trunc_normal_(w, 0.0, std, -2 * std, 2 * std) if scale > 0 else nn.init.zeros_(w)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    return module


def dense(inp, out):
    return nn.Sequential(nn.Linear(inp, out, bias=False), nn.LayerNorm(out, eps=1e-3), nn.SiLU())


def mlp(inp, units, layers):
    return nn.Sequential(*[dense(inp if i == 0 else units, units) for i in range(layers)])


class ChannelNorm(nn.LayerNorm):
    """LayerNorm over the channels of an NCHW map (the paper normalises the channel axis)."""

    def forward(self, x):
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class ConvEncoder(nn.Module):  # "Conv": the VQ-GAN copy in appendix B owns the name Encoder
    def __init__(self, depth):
        super().__init__()
        layers, c = [], 3
        for i in range(4):  # 64 -> 32 -> 16 -> 8 -> 4
            layers += [nn.Conv2d(c, depth * 2 ** i, 4, 2, 1, bias=False), ChannelNorm(depth * 2 ** i, eps=1e-3), nn.SiLU()]
            c = depth * 2 ** i
        self.net = nn.Sequential(*layers)
        self.out_dim = c * 4 * 4

    def forward(self, image):  # uint8 [..., 64, 64, 3] -> [..., out_dim]
        x = image.reshape(-1, *image.shape[-3:]).permute(0, 3, 1, 2).float() / 255.0 - 0.5  # channels_last view
        return self.net(x).flatten(1).reshape(*image.shape[:-3], self.out_dim)


class ConvDecoder(nn.Module):
    def __init__(self, feat_dim, depth):
        super().__init__()
        self.depth = depth
        self.inp = nn.Linear(feat_dim, 8 * depth * 4 * 4)
        layers, c = [], 8 * depth
        for i in range(3):  # 4 -> 8 -> 16 -> 32
            layers += [nn.ConvTranspose2d(c, c // 2, 4, 2, 1, bias=False), ChannelNorm(c // 2, eps=1e-3), nn.SiLU()]
            c //= 2
        layers += [nn.ConvTranspose2d(c, 3, 4, 2, 1)]  # -> 64
        self.net = nn.Sequential(*layers)

    def forward(self, feat):  # [..., F] -> image mean in [0, 1] (roughly), [..., 3, 64, 64]
        x = self.inp(feat.reshape(-1, feat.shape[-1])).reshape(-1, 8 * self.depth, 4, 4)
        x = x.contiguous(memory_format=torch.channels_last)
        return (self.net(x) + 0.5).reshape(*feat.shape[:-1], 3, 64, 64)


def bound_action(action):
    """a / max(1, |a|) per dim, the scale detached (DreamerV3): sampled imagined actions can leave [-1, 1],
    the env clips them, so every model that takes an action (the GRU, the ensemble) sees them in [-1, 1]."""
    return action * (1.0 / torch.clamp(action.abs(), min=1.0)).detach()


class RSSM(nn.Module):
    """Recurrent state-space model. A latent state is a dict: deter [B, D], logits/stoch [B, S, C]."""

    def __init__(self, act_dim, embed_dim, deter, units, stoch, classes):
        super().__init__()
        self.deter, self.stoch, self.classes = deter, stoch, classes
        self.img_in = dense(stoch * classes + act_dim, units)
        self.gru = nn.Sequential(nn.Linear(units + deter, 3 * deter, bias=False), nn.LayerNorm(3 * deter, eps=1e-3))
        self.img_out = dense(deter, units)
        self.img_logits = nn.Linear(units, stoch * classes)
        self.obs_out = dense(deter + embed_dim, units)
        self.obs_logits = nn.Linear(units, stoch * classes)
        self.init_deter = nn.Parameter(torch.zeros(deter))

    @property
    def feat_dim(self):
        return self.deter + self.stoch * self.classes

    def feat(self, state):
        return torch.cat([state["deter"], state["stoch"].flatten(-2)], -1)

    def _logits(self, layer, x):
        return unimix_logits(layer(x).reshape(*x.shape[:-1], self.stoch, self.classes))

    def prior_logits(self, deter):
        return self._logits(self.img_logits, self.img_out(deter))

    def initial(self, batch):
        deter = torch.tanh(self.init_deter).expand(batch, -1)
        logits = self.prior_logits(deter)
        stoch = F.one_hot(logits.argmax(-1), self.classes).to(deter.dtype)  # mode of the prior
        return dict(deter=deter, logits=logits, stoch=stoch)

    def gru_step(self, prev, action):
        """h_t = GRU(h_{t-1}, [z_{t-1}, a_{t-1}]): LayerNorm'd gates, update gate biased towards keeping h."""
        x = self.img_in(torch.cat([prev["stoch"].flatten(-2), bound_action(action)], -1))
        reset, cand, update = self.gru(torch.cat([x, prev["deter"]], -1)).chunk(3, -1)
        reset, update = torch.sigmoid(reset), torch.sigmoid(update - 1.0)
        return update * torch.tanh(reset * cand) + (1.0 - update) * prev["deter"]

    def img_step(self, prev, action):
        """Prior step: h_t from the GRU, z_t ~ p(z | h_t)."""
        deter = self.gru_step(prev, action)
        logits = self.prior_logits(deter)
        return dict(deter=deter, logits=logits, stoch=sample_onehot(logits))

    def obs_step(self, prev, prev_action, embed, is_first, init=None):
        """Posterior step: reset to the initial state where is_first, advance h, then z_t ~ q(z | h_t, x_t).

        The prior p(z | h_t) is not computed here: it depends on h_t alone (see `prior_logits`)."""
        init = self.initial(embed.shape[0]) if init is None else init
        keep = (~is_first).to(embed.dtype)
        prev = {k: v * keep.view(-1, *[1] * (v.dim() - 1)) + init[k] * (1 - keep).view(-1, *[1] * (v.dim() - 1))
                for k, v in prev.items()}
        deter = self.gru_step(prev, prev_action * keep.unsqueeze(-1))
        logits = self._logits(self.obs_logits, self.obs_out(torch.cat([deter, embed], -1)))
        return dict(deter=deter, logits=logits, stoch=sample_onehot(logits))

    def observe(self, embed, action, is_first):
        """Posterior over a chunk [B, T]; action[:, t] is the action that led to observation t."""
        B, T = embed.shape[:2]
        init = self.initial(B)
        state, posts = {k: torch.zeros_like(v) for k, v in init.items()}, []
        for t in range(T):
            state = self.obs_step(state, action[:, t], embed[:, t], is_first[:, t], init)
            posts.append(state)
        post = {k: torch.stack([p[k] for p in posts], 1) for k in posts[0]}
        return post, self.prior_logits(post["deter"])


def kl_categorical(logits_p, logits_q):
    """KL(p || q) of independent categoricals given log-probs [..., S, C], summed over the S latents."""
    return (logits_p.exp() * (logits_p - logits_q)).sum((-2, -1))


class Actor(nn.Module):
    def __init__(self, feat_dim, act_dim, discrete, units, layers):
        super().__init__()
        self.discrete = discrete
        self.net = mlp(feat_dim, units, layers)
        self.out = nn.Linear(units, act_dim if discrete else 2 * act_dim)

    def forward(self, feat):
        return ActionDist(self.out(self.net(feat)), self.discrete)


class TwoHotHead(nn.Module):
    """MLP -> 255 two-hot logits, output layer zero-initialised (predicts 0 at the start: no early
    hallucinated rewards/values)."""

    def __init__(self, feat_dim, units, layers):
        super().__init__()
        self.net = mlp(feat_dim, units, layers)
        self.out = init_weights(nn.Linear(units, BINS), scale=0.0)  # Dreamer re-applies this after its init

    def forward(self, feat):
        return TwoHot(self.out(self.net(feat)))


class Ensemble(nn.Module):
    """Plan2Explore: ENSEMBLE_MEMBERS one-step models (deter_t, stoch_t, action_t) -> stoch_{t+1}, flattened.
    From different random initialisations on the same data, they agree where the data is and disagree
    where it is not: the std across members, averaged over dimensions, rewards novelty."""

    def __init__(self, inp, out, units, layers, members=ENSEMBLE_MEMBERS):
        super().__init__()
        self.members = nn.ModuleList(nn.Sequential(mlp(inp, units, layers), nn.Linear(units, out))
                                     for _ in range(members))

    def forward(self, x):  # [..., inp] -> predictions of every member [members, ..., out]
        return torch.stack([m(x) for m in self.members])

    def disagreement(self, x):  # [..., inp] -> [...]
        pred = self(x).float()
        var = ((pred - pred.mean(0)) ** 2).mean(0)  # = std(0, correction=0) ** 2; torch.std over the leading
        # dim is ~20x slower on CPU (a strided reduction). The floor keeps the gradient finite where all members
        # agree exactly (sqrt'(0) = inf gives NaN actions; seen with bf16 outputs on a GPU).
        return var.clamp(min=1e-16).sqrt().mean(-1)


@contextmanager
def frozen(*modules):
    """Parameters get no gradient inside (gradients still flow *through* the modules). None is skipped."""
    params = [p for m in modules if m is not None for p in m.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


# ---------------------------------------------------------------------------------------------
# Reward terms, in the order of their critics. Each has a scale flag: its weight in the actor's advantage,
# 0 = off (no critic, no head, not computed). The LABELLED terms get a label once per env step
# (`StepRewards`): a replay field of the term's name, fitted by a world-model head of the same name that
# gives the term's reward in imagination. `disagreement` exists only in imagination (the ensemble).
# ---------------------------------------------------------------------------------------------
REWARD_TERMS = {
    "density": "density_scale",  # VIPER: the video model's log-likelihood of the step's frame
    "disagreement": "disagreement_scale",  # Plan2Explore: the ensemble's disagreement about the transition
    "task": "task_scale",  # the env reward: the oracle's reward; VIPER runs only log it
}
LABELLED = ("task", "density")  # in the order of their heads


def term_scales(args):
    """{term: scale} of the terms that are on (scale != 0): one critic each, in REWARD_TERMS order."""
    return {k: float(getattr(args, flag)) for k, flag in REWARD_TERMS.items() if getattr(args, flag) != 0}


def density_bounded(log_p, lo, hi):
    """--density-bounds LO HI: clip((log_p - LO) / (HI - LO), 0, 1), per step (eval.py reference uses it too)."""
    return np.clip((np.asarray(log_p, np.float64) - lo) / (hi - lo), 0.0, 1.0)


class StepRewards:
    """Labels each step ONCE as it enters the replay: returns the LABELLED fields of the step.

    `task`: the env reward (received on arriving at the step's frame; 0 at a reset). With a reward model
    also `density`: each new frame is encoded once; the episode's last (L-1)k+1 codes are kept (all a window
    of L frames with skip k can reach) and the new step alone is scored (`first_step`=last), which equals
    `compute_rewards` over the whole episode. The reset frame is scored too (log p(x_0)): 0 would be the
    best possible log-likelihood, and the density head would learn that reset-like states are expert-like.
    With a background model (--background-model) the density is the log-likelihood ratio of the two models,
    each scoring the frame in its own window (its own codes).
    """

    def __init__(self, args, reward_model=None, background=None):
        self.env_id, self.mode, self.rm, self.bounds = args.env_id, args.reward_mode, reward_model, args.density_bounds
        self.background = background
        self.log_p = 0.0  # the last scored frame's log-likelihood (ratio) in nats, before --density-bounds (logs)
        self.fields = ("task",) if reward_model is None else ("task", "density")
        self.codes = None  # the current episode's last codes [n, h, w], as many as a window can reach
        self.background_codes = None  # the same for the background model
        self.seconds = 0.0  # wall time spent encoding and scoring (logged as a share of the run's)

    def _log_p(self, rm, codes, frame):
        """Encode the new frame, append it to the episode's codes, score it: (log p of the frame, codes kept)."""
        code = rm.encode(np.ascontiguousarray(frame)[None, None])[0]  # [1, h, w]
        keep = (rm.seq_len - 1) * rm.frame_skip + 1  # all a window of L frames with skip k can reach
        codes = code if codes is None else torch.cat([codes, code])[-keep:]
        r = rm.rewards_from_codes(codes[None], self.env_id, self.mode, first_step=len(codes) - 1)
        return float(r[0, 0]), codes

    def _density(self, frame):
        t0 = time.perf_counter()
        self.log_p, self.codes = self._log_p(self.rm, self.codes, frame)
        if self.background is not None:
            log_p, self.background_codes = self._log_p(self.background, self.background_codes, frame)
            self.log_p -= log_p
        self.seconds += time.perf_counter() - t0
        return self.log_p if self.bounds is None else float(density_bounded(self.log_p, *self.bounds))

    def reset(self, frame):
        """A new episode starts with this (reset) frame; returns the fields of that first step."""
        self.codes = self.background_codes = None
        return {"task": 0.0} if self.rm is None else {"task": 0.0, "density": self._density(frame)}

    def __call__(self, frame, env_reward):
        fields = {"task": float(env_reward)}
        if self.rm is not None:
            fields["density"] = self._density(frame)
        return fields


# ---------------------------------------------------------------------------------------------
# Replay
# ---------------------------------------------------------------------------------------------
class Replay:
    """Ring buffer of single env steps; samples uniformly chunks of consecutive steps.

    Step t holds the frame x_t, the action that led to it (zeros at a reset), the reward received on
    arriving at it, is_first (reset frame) and is_terminal (episode ended with no bootstrap).
    """

    def __init__(self, capacity, obs_shape, act_dim, reward_fields):
        self.capacity, self.size, self.ptr = capacity, 0, 0
        self.data = dict(image=np.zeros((capacity, *obs_shape), np.uint8), action=np.zeros((capacity, act_dim), np.float32),
                         is_first=np.zeros(capacity, bool), is_terminal=np.zeros(capacity, bool))
        for f in reward_fields:
            self.data[f] = np.zeros(capacity, np.float32)

    def __len__(self):
        return self.size

    def add(self, **step):
        for k, v in step.items():
            self.data[k][self.ptr] = v
        self.ptr = (self.ptr + 1) % self.capacity
        self.size = min(self.size + 1, self.capacity)

    def sample(self, batch, length, rng):
        if self.size < length:
            raise ValueError(f"replay holds {self.size} steps, fewer than one chunk of {length}")
        oldest = self.ptr if self.size == self.capacity else 0  # chunks must not wrap over the write head
        starts = (oldest + rng.integers(0, self.size - length + 1, batch)) % self.capacity
        idx = (starts[:, None] + np.arange(length)) % self.capacity
        out = {k: v[idx] for k, v in self.data.items()}
        out["is_first"][:, 0] = True  # every chunk starts from the initial latent
        return out

    def save(self, path, step):
        """Atomic write; `step` (the run's env step) pairs the file with the agent.pt saved after it. Compressed:
        env frames are mostly flat colour (cartpole: 53x smaller, and faster to write than the raw 12.3 KB/step)."""
        tmp = path + ".tmp.npz"
        np.savez_compressed(tmp, ptr=self.ptr, size=self.size, step=step,
                            **{k: v[: self.size] for k, v in self.data.items()})
        os.replace(tmp, path)

    def load(self, path, step):
        """Load a replay saved at env step `step` (the checkpoint's); any other step is an error."""
        try:
            arrays = read_replay(path, ["size", "ptr", *self.data])
        except ValueError as e:
            raise ValueError(f"{e}; delete it to resume with an empty replay") from e
        if "step" in arrays and int(arrays["step"]) != step:
            raise ValueError(f"{path} was saved at step {int(arrays['step'])} but agent.pt at step {step} (a save "
                             f"was interrupted between the two files): delete {path} to resume with an empty "
                             f"replay, or start the run again")
        size = int(arrays["size"])
        if size > self.capacity:
            raise ValueError(f"{path} holds {size} steps, more than --replay-capacity {self.capacity}")
        for k in self.data:
            self.data[k][:size] = arrays[k]
        self.size, self.ptr = size, int(arrays["ptr"]) % self.capacity if size == self.capacity else size


def read_replay(path, keys):
    """{key: array} of a replay.npz written by Replay.save, plus `step` when the file has it. ValueError naming
    the file when it is not a readable replay."""
    try:
        with np.load(path) as f:  # replays saved before the task term had one name store it as `reward`
            arrays = {k: f["reward" if k == "task" and "task" not in f.files else k] for k in keys}
            if "step" in f.files:
                arrays["step"] = f["step"]
            return arrays
    except (OSError, EOFError, KeyError, ValueError, zipfile.BadZipFile, zlib.error) as e:  # truncated, not npz
        raise ValueError(f"{path} is not a readable replay ({type(e).__name__}: {e})") from e


# ---------------------------------------------------------------------------------------------
# Agent
# ---------------------------------------------------------------------------------------------
def apply_gradients(opt, loss, params, clip):
    """Backward, clip the global gradient norm, Adam step. Returns the gradient norm before clipping."""
    params = list(params)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    norm = nn.utils.clip_grad_norm_(params, clip)
    opt.step()
    return norm.item()


def compile_update(agent):
    """--compile: torch.compile the two parts of an update made of many small sequential ops, the world-model
    loss (encoder, the RSSM's observe loop over the batch's steps, decoder, heads) and the imagination rollout;
    their backward passes are compiled with them. Inductor fuses the elementwise ops between the matmuls and
    convolutions, so an update spends less time between them. The actor and critic losses stay eager: compiling
    them measured no faster. fallback_random: the compiled code draws the same random numbers as eager code."""
    import torch._inductor.config

    torch._inductor.config.fallback_random = True
    agent.world_model_loss = torch.compile(agent.world_model_loss)
    agent.imagine = torch.compile(agent.imagine)
    return agent


class Dreamer(nn.Module):
    def __init__(self, args: Args, act_dim: int, discrete: bool):
        super().__init__()
        size = SIZES[args.size]
        self.act_dim, self.discrete, self.baseline_grad = act_dim, discrete, args.baseline_grad
        self.encoder = ConvEncoder(size["depth"])
        self.rssm = RSSM(act_dim, self.encoder.out_dim, size["deter"], size["units"], size["stoch"], size["classes"])
        feat = self.rssm.feat_dim
        self.decoder = ConvDecoder(feat, size["depth"])
        self.scales = term_scales(args)
        # world-model heads of the labelled terms that are on (official VIPER: `grad_heads: [decoder, density,
        # cont]`): with --task-scale 0 there is no task head, so the env reward reaches no gradient at all
        self.heads = nn.ModuleDict({k: TwoHotHead(feat, size["units"], size["layers"])
                                    for k in LABELLED if k in self.scales})
        self.cont = nn.Sequential(mlp(feat, size["units"], size["layers"]), nn.Linear(size["units"], 1))
        self.actor = Actor(feat, act_dim, discrete, size["units"], size["layers"])
        self.critics = nn.ModuleDict({k: TwoHotHead(feat, size["units"], size["layers"]) for k in self.scales})
        self.retnorms = nn.ModuleDict({k: ReturnNorm() for k in self.scales})
        self.ensemble = (Ensemble(feat + act_dim, size["stoch"] * size["classes"], size["units"], size["layers"])
                         if "disagreement" in self.scales else None)
        init_weights(self)
        for head in [*self.heads.values(), *self.critics.values()]:
            init_weights(head.out, scale=0.0)  # zero-initialised two-hot outputs
        self.slow_critics = copy.deepcopy(self.critics).requires_grad_(False)
        self.to(memory_format=torch.channels_last)
        self.world_model = nn.ModuleList([self.encoder, self.rssm, self.decoder, self.heads, self.cont])
        # foreach: each Adam op runs once over all tensors, not once per tensor (PyTorch's CPU default): the same
        # numbers bit for bit, the world model's step 3.7 -> 1.9 ms on one thread
        adam = dict(betas=(0.9, args.adam_beta2), foreach=True)
        self.model_opt = torch.optim.Adam(self.world_model.parameters(), lr=args.model_lr, eps=MODEL_EPS, **adam)
        self.actor_opt = torch.optim.Adam(self.actor.parameters(), lr=args.actor_lr, eps=AC_EPS, **adam)
        self.critic_opts = {k: torch.optim.Adam(c.parameters(), lr=args.critic_lr, eps=AC_EPS, **adam)
                            for k, c in self.critics.items()}
        # the ensemble's own optimiser (official `expl_opt`: lr 1e-4 = the model's, eps 1e-5, clip 100)
        self.ensemble_opt = (torch.optim.Adam(self.ensemble.parameters(), lr=args.model_lr, eps=AC_EPS, **adam)
                             if self.ensemble is not None else None)

    # --- acting ---------------------------------------------------------------------------------
    @torch.no_grad()
    def policy(self, obs, carry, explore):
        """One env step: obs uint8 [64, 64, 3]; carry = (latent, previous action) or None at a reset."""
        device = self.rssm.init_deter.device
        is_first = torch.tensor([carry is None], device=device)
        if carry is None:
            latent = {k: torch.zeros_like(v) for k, v in self.rssm.initial(1).items()}
            carry = (latent, torch.zeros(1, self.act_dim, device=device))
        embed = self.encoder(torch.as_tensor(np.ascontiguousarray(obs), device=device)[None])
        latent = self.rssm.obs_step(carry[0], carry[1], embed, is_first)
        dist = self.actor(self.rssm.feat(latent))
        action = dist.sample() if explore else dist.mode
        action = action.detach() if self.discrete else action.detach().clamp(-1.0, 1.0)
        return action[0], (latent, action)

    # --- learning -------------------------------------------------------------------------------
    def imagined_rewards(self, traj):
        """Reward of each imagined transition t -> t+1 [H, N] for every critic.

        task, density: the term's head at the state it arrives at (replay step t is labelled with the reward
        of arriving at frame t). disagreement: the ensemble's disagreement about that transition, from
        (h_t, z_t, a_t).
        """
        rewards = {k: self.heads[k](traj["feat"][1:]).mean for k in self.scales if k in self.heads}
        if "disagreement" in self.scales:
            # bounded like the GRU's input: the ensemble was trained on env-clipped actions, so raw |a| > 1
            # would be novelty by construction and the actor would be paid for out-of-range actions
            rewards["disagreement"] = self.ensemble.disagreement(
                torch.cat([traj["feat"][:-1], bound_action(traj["action"])], -1))
        return rewards

    def ensemble_loss(self, post, batch):
        """Each member regresses (MSE summed over dims) z_{t+1} on (h_t, z_t, a_{t+1}) of replayed posterior
        states (detached: the ensemble does not shape the world model). In the replay, action[t+1] led from
        step t to t+1; pairs that cross an episode start are skipped."""
        feat = self.rssm.feat({k: v.detach() for k, v in post.items()})
        inp = torch.cat([feat[:, :-1], batch["action"][:, 1:]], -1)
        target = post["stoch"][:, 1:].detach().flatten(-2)
        mask = (~batch["is_first"][:, 1:]).float()
        err = ((self.ensemble(inp).float() - target) ** 2).sum(-1)  # [members, B, T-1]
        return ((err * mask).sum((1, 2)) / mask.sum().clamp(min=1)).sum()

    def world_model_loss(self, batch):
        embed = self.encoder(batch["image"])
        post, prior_logits = self.rssm.observe(embed, batch["action"], batch["is_first"])
        feat = self.rssm.feat(post)
        target = batch["image"].permute(0, 1, 4, 2, 3).float() / 255.0
        err = self.decoder(feat).float() - target
        losses = {"image": (err * err).sum((-3, -2, -1))}  # MSE summed over pixels (x*x: faster than pow)
        for k, head in self.heads.items():
            losses[k] = -head(feat).log_prob(batch[k])
        cont_target = 1.0 - batch["is_terminal"].float()
        losses["cont"] = F.binary_cross_entropy_with_logits(self.cont(feat)[..., 0].float(), cont_target, reduction="none")
        post_logits, prior_logits = post["logits"].float(), prior_logits.float()
        dyn = kl_categorical(post_logits.detach(), prior_logits)
        rep = kl_categorical(post_logits, prior_logits.detach())
        losses["dyn"], losses["rep"] = torch.clamp(dyn, min=KL_FREE), torch.clamp(rep, min=KL_FREE)
        scales = {"dyn": KL_DYN, "rep": KL_REP}
        loss = sum(scales.get(k, 1.0) * v.mean() for k, v in losses.items())
        # tensors, read by train_step: .item() here would break a compiled graph in two
        metrics = {f"loss/{k}": v.detach().mean() for k, v in losses.items()}
        metrics.update({"world_model/kl": dyn.detach().mean(), "world_model/post_entropy":
                        -(post_logits.exp() * post_logits).detach().sum((-2, -1)).mean()})
        return loss, post, metrics

    def imagine(self, start, start_cont, backprop):
        """Roll the actor out in the world model for IMAG_HORIZON steps from start states [N]."""
        state, feats, actions, dists = start, [self.rssm.feat(start)], [], []
        for _ in range(IMAG_HORIZON):
            dist = self.actor(feats[-1].detach())  # the actor sees stop-gradient states
            action = dist.sample()
            with torch.set_grad_enabled(backprop):  # REINFORCE needs no gradient through the dynamics
                state = self.rssm.img_step(state, action if backprop else action.detach())
            feats.append(self.rssm.feat(state))
            actions.append(action)
            dists.append(dist)
        feat = torch.stack(feats)
        with torch.no_grad():
            cont = torch.cat([start_cont[None], (self.cont(feat[1:])[..., 0] > 0).float()])
            weight = torch.cumprod(GAMMA * cont, 0) / GAMMA  # share of each state still inside the episode
        return dict(feat=feat, action=torch.stack(actions), cont=cont, weight=weight), dists

    def actor_critic_loss(self, traj, dists, backprop):
        """Actor loss (mixing every critic's normalised advantage) and each critic's lambda-return target."""
        rewards = self.imagined_rewards(traj)
        adv, targets, metrics = 0.0, {}, {}
        total = sum(self.scales.values())
        for k, critic in self.critics.items():
            value = critic(traj["feat"]).mean  # gradient flows into the states only for backprop
            ret = lambda_returns(rewards[k].float(), value, traj["cont"][1:])
            self.retnorms[k].update(ret)
            scale = self.retnorms[k].scale()
            base = value[:-1] if self.baseline_grad else value[:-1].detach()
            adv = adv + self.scales[k] / total * (ret - base) / scale  # offset cancels in the difference
            targets[k] = ret.detach()
            metrics.update({f"imagination/{k}_reward": rewards[k].mean().item(), f"imagination/{k}_return":
                            ret.mean().item(), f"imagination/{k}_return_scale": scale.item()})
        logpi = torch.stack([d.log_prob(a.detach()) for d, a in zip(dists, traj["action"])])
        ent = torch.stack([d.entropy() for d in dists])
        loss = -adv if backprop else -logpi * adv.detach()
        loss = ((loss - ACTOR_ENT * ent) * traj["weight"][:-1]).mean()
        metrics.update({"loss/actor": loss.item(), "imagination/actor_entropy": ent.mean().item()})
        return loss, targets, metrics

    def critic_loss(self, k, traj, target):
        feat, w = traj["feat"][:-1].detach(), traj["weight"][:-1]
        dist = self.critics[k](feat)
        with torch.no_grad():
            slow = self.slow_critics[k](feat).mean
        return ((-dist.log_prob(target) - SLOWREG * dist.log_prob(slow)) * w).mean()

    def train_step(self, batch):
        """One update of world model, actor and critics on a batch of replayed chunks (numpy dict [B, T])."""
        device = self.rssm.init_deter.device
        batch = {k: torch.as_tensor(v, device=device) for k, v in batch.items()}
        autocast = torch.autocast("cuda", torch.bfloat16, enabled=device.type == "cuda")

        with autocast:
            model_loss, post, metrics = self.world_model_loss(batch)
        metrics = {k: v.item() for k, v in metrics.items()}
        metrics["grad_norm/model"] = apply_gradients(self.model_opt, model_loss, self.world_model.parameters(),
                                                     MODEL_CLIP)
        if self.ensemble is not None:
            with autocast:
                ens_loss = self.ensemble_loss(post, batch)
            metrics["loss/ensemble"] = ens_loss.item()
            metrics["grad_norm/ensemble"] = apply_gradients(self.ensemble_opt, ens_loss, self.ensemble.parameters(),
                                                            AC_CLIP)

        backprop = not self.discrete  # continuous: backprop through dynamics; discrete: REINFORCE
        start = {k: v.detach().flatten(0, 1) for k, v in post.items()}
        start_cont = 1.0 - batch["is_terminal"].flatten().float()
        with frozen(self.world_model, self.critics, self.ensemble), autocast:
            traj, dists = self.imagine(start, start_cont, backprop)
            actor_loss, targets, m = self.actor_critic_loss(traj, dists, backprop)
        metrics.update(m)
        metrics["grad_norm/actor"] = apply_gradients(self.actor_opt, actor_loss, self.actor.parameters(), AC_CLIP)

        traj = {k: v.detach() for k, v in traj.items()}
        for k in self.critics:
            with autocast:
                loss = self.critic_loss(k, traj, targets[k])
            metrics[f"loss/critic_{k}"] = loss.item()
            metrics[f"grad_norm/critic_{k}"] = apply_gradients(self.critic_opts[k], loss, self.critics[k].parameters(),
                                                    AC_CLIP)
            with torch.no_grad():  # slow critic: EMA of the critic, regularises its targets
                for p, sp in zip(self.critics[k].parameters(), self.slow_critics[k].parameters()):
                    sp.lerp_(p, SLOW_CRITIC_MIX)
        metrics["loss/model"] = model_loss.item()
        return metrics


# ---------------------------------------------------------------------------------------------
# Training loop
# ---------------------------------------------------------------------------------------------
def env_action(action, discrete):
    return int(action.argmax()) if discrete else action.cpu().numpy().astype(np.float32)


def action_spec(env):
    space = env.action_space
    if isinstance(space, gym.spaces.Discrete):
        return int(space.n), True
    if isinstance(space, gym.spaces.Box) and len(space.shape) == 1:
        return int(space.shape[0]), False
    raise ValueError(f"unsupported action space {space}")


def episode_seed(seed, episode):
    """The env seed of training episode number `episode`: a resumed run meets the same episodes."""
    return int(np.random.SeedSequence([seed, episode]).generate_state(1)[0] % 2 ** 31)


def new_episode(env, replay, labeler, seed, episode, act_dim):
    """Reset the env for episode number `episode` and store the reset step. Returns the first frame."""
    obs, _ = env.reset(seed=episode_seed(seed, episode))
    replay.add(image=obs, action=np.zeros(act_dim, np.float32), is_first=True, is_terminal=False,
               **labeler.reset(obs))
    return obs


def evaluate(agent, env, episodes, seed):
    """Greedy episodes with the true task return. Returns (returns, frames of the first episode)."""
    returns, frames = [], []
    for i in range(episodes):
        obs, _ = env.reset(seed=seed + i)
        carry, done, ret = None, False, 0.0
        while not done:
            if i == 0:
                frames.append(obs)
            action, carry = agent.policy(obs, carry, explore=False)
            obs, r, terminated, truncated, _ = env.step(env_action(action, agent.discrete))
            ret, done = ret + r, terminated or truncated
        returns.append(ret)
    return returns, np.stack(frames)


def main(args: Args):
    validate(args)
    launch = launch_info()  # the command and commit that run.json records
    name = "viper" if args.reward == "viper" else "dreamer"
    out = args.output_dir or os.path.join("runs", f"{args.env_id}__{name}__{args.seed}__{int(time.time())}")
    files = run_files(out, args.resume)  # paths of agent.pt, replay.npz, ...; refuses to overwrite a run
    device = run_device(args)
    # VIPER: the frozen video model (checked before anything is written; make_env gives 64px frames)
    reward_model = load_reward_model(args, device, 64) if args.reward == "viper" else None
    background = (load_reward_model(args, device, 64, args.background_model, "--background-model")
                  if args.background_model else None)
    os.makedirs(out, exist_ok=True)
    torch.set_num_threads(args.threads)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)

    env, eval_env = make_env(args.env_id, args.seed), make_env(args.env_id, args.seed + 1)
    act_dim, discrete = action_spec(env)
    agent = Dreamer(args, act_dim, discrete).to(device)
    if args.compile:
        compile_update(agent)
    labeler = StepRewards(args, reward_model, background)
    replay = Replay(args.replay_capacity, env.observation_space.shape, act_dim, labeler.fields)
    keep_freed_memory()  # after the replay's lazy allocation
    # episode_returns: (VIPER, task) returns of the last CORR_EPISODES episodes; wall_time_s: summed over resumes
    counters = dict(step=0, updates=0, credit=0.0, episodes=0, episode_returns=[], wall_time_s=0.0)
    obs, carry, ep_ret, ep_viper, ep_len = None, None, 0.0, 0.0, 0  # ep_viper: the VIPER return over ep_ret's steps
    if args.resume:  # weights, optimisers, counters, RNG states, replay and the episode in progress, as they were
        counters, rng, episode = resume(files, args, agent, replay, device)
        obs = continue_episode(env, replay, labeler, episode, episode_seed(args.seed, counters["episodes"]), discrete)
        if obs is not None:
            carry, ep_ret, ep_viper, ep_len = episode["carry"], episode["ep_ret"], episode["ep_viper"], episode["ep_len"]
    log = RunLog(out, args, counters, load_references(args))

    def episode_state():  # what a checkpoint needs to continue this episode exactly (see continue_episode)
        return dict(carry=carry, ep_ret=ep_ret, ep_viper=ep_viper, ep_len=ep_len, codes=labeler.codes,
                    background_codes=labeler.background_codes)

    if obs is None:
        obs = new_episode(env, replay, labeler, args.seed, counters["episodes"], act_dim)
    updates_per_step = args.train_ratio / (args.batch_size * args.batch_length)
    metrics, last_eval, t_start, wall_before = {}, None, time.time(), counters["wall_time_s"]
    bar = tqdm(total=args.total_steps, initial=counters["step"], desc=f"{name} {args.env_id}", smoothing=0.05)
    with deferred_stop() as interrupted:  # Ctrl-C or SIGTERM: finish this env step, save a checkpoint, exit
        while counters["step"] < args.total_steps and not interrupted:
            # act: uniform random actions during the prefill, then samples of the actor
            if counters["step"] < args.prefill:
                action = (F.one_hot(torch.tensor(rng.integers(act_dim)), act_dim).float() if discrete
                          else torch.as_tensor(rng.uniform(-1, 1, act_dim), dtype=torch.float32))
            else:
                action, carry = agent.policy(obs, carry, explore=True)
            action = action.cpu().numpy()
            obs, r, terminated, truncated, _ = env.step(env_action(torch.as_tensor(action), discrete))
            labels = labeler(obs, r)  # the step's rewards, computed once, here
            replay.add(image=obs, action=action, is_first=False, is_terminal=terminated, **labels)
            counters["step"] += 1
            ep_ret, ep_viper, ep_len = ep_ret + r, ep_viper + labeler.log_p, ep_len + 1
            bar.update(1)
            if terminated or truncated:
                counters["episodes"] += 1
                log.episode(counters, ep_ret, ep_viper if reward_model is not None else None, ep_len)
                bar.set_postfix(ret=f"{ep_ret:.1f}", eval=last_eval, upd=counters["updates"],
                                **({"viper": f"{ep_viper:.0f}"} if reward_model is not None else {}))
                obs = new_episode(env, replay, labeler, args.seed, counters["episodes"], act_dim)
                carry, ep_ret, ep_viper, ep_len = None, 0.0, 0.0, 0

            # learn: train_ratio replayed steps per env step, i.e. one update every 1 / updates_per_step steps
            if counters["step"] >= args.prefill and len(replay) >= args.batch_length:
                counters["credit"] += updates_per_step
                while counters["credit"] >= 1.0:
                    metrics = agent.train_step(replay.sample(args.batch_size, args.batch_length, rng))
                    counters["credit"] -= 1.0
                    counters["updates"] += 1
                    check_finite(metrics, counters, files["agent.pt"])

            s = counters["step"]
            if s % args.log_every == 0:
                log.scalars(s, counters, metrics, replay, labeler.seconds)
            if s % args.eval_every == 0 or s == args.total_steps:
                returns, frames = evaluate(agent, eval_env, args.eval_episodes, seed=10_000)
                grid = (open_loop(agent, replay.sample(4, args.batch_length, rng))  # [truth/model/error, n, T, ...]
                        if len(replay) >= args.batch_length else None)
                log.evaluation(s, returns, frames, grid, wall_before + time.time() - t_start)
                last_eval = f"{np.mean(returns):.1f}"
                bar.set_postfix(ret=f"{ep_ret:.1f}", eval=last_eval, upd=counters["updates"])
            if s % args.save_every == 0 or s == args.total_steps:
                counters["wall_time_s"] = wall_before + time.time() - t_start
                save_run(files, args, agent, replay, counters, act_dim, discrete, launch, rng, episode_state())
    bar.close()
    if interrupted:
        counters["wall_time_s"] = wall_before + time.time() - t_start
        save_run(files, args, agent, replay, counters, act_dim, discrete, launch, rng, episode_state())
    log.writer.close()
    env.close()
    eval_env.close()
    if interrupted:
        print(f"interrupted at step {counters['step']}: saved {files['agent.pt']}; continue with the same command "
              f"and --resume --output-dir {out}", file=sys.stderr)
        raise SystemExit(128 + interrupted[0])  # the shell's status for that signal (Ctrl-C: 130): a caller stops
    if reward_model is not None:
        wall = time.time() - t_start
        tqdm.write(f"VIPER reward computation: {labeler.seconds:.1f} s of {wall:.1f} s wall "
                   f"({100 * labeler.seconds / max(wall, 1e-9):.1f}%)")
    return agent, counters


# =============================================================================================
# Appendix A: run files and checks. Everything `main` needs that is not the algorithm: the output
# directory, resuming, logs and csv files, checkpoints, run.json, Ctrl-C and kill, flag checks, loading.
# =============================================================================================
def run_files(out, resume):
    """Paths of the run's files in `out`. Refuses to start a new run over a finished one (or to resume
    none), and removes the half-written files a kill during a save leaves."""
    files = {f: os.path.join(out, f) for f in ("agent.pt", "replay.npz", "eval.csv", "episodes.csv", "run.json")}
    if resume and not os.path.isfile(files["agent.pt"]):
        raise FileNotFoundError(f"--resume: no checkpoint at {files['agent.pt']}")
    for stale in (files["agent.pt"] + ".tmp", files["replay.npz"] + ".tmp.npz"):
        if os.path.isfile(stale):
            os.remove(stale)
    if not resume and os.path.isfile(files["agent.pt"]):
        raise FileExistsError(f"--output-dir {out!r} already holds a run (agent.pt): add --resume to continue it, "
                              f"or choose another --output-dir (a new run here would overwrite it)")
    return files


def resume(files, args, agent, replay, device):
    """Load the run as it was at its last checkpoint: weights, optimisers, RNG states, replay. Returns
    (counters, the numpy Generator of replay sampling and prefill actions, the episode in progress or None)."""
    ckpt = upgrade_checkpoint(torch.load(files["agent.pt"], map_location=device, weights_only=False))
    saved = args_from_checkpoint(ckpt["args"])
    for key in ["env_id", "size", "reward", "reward_mode"]:
        if getattr(saved, key) != getattr(args, key):
            raise ValueError(f"--resume: checkpoint has --{key.replace('_', '-')} {getattr(saved, key)!r}, "
                             f"this command {getattr(args, key)!r}")
    if term_scales(saved) != term_scales(args):
        raise ValueError(f"--resume: checkpoint has reward scales {term_scales(saved)}, this command "
                         f"{term_scales(args)} (--density-scale, --disagreement-scale, --task-scale)")
    agent.load_state_dict(ckpt["agent"])
    load_optim_state(agent, ckpt["optim"])
    run_json = files["run.json"]  # checkpoints older than wall_time_s: take run.json's
    old_wall = json.load(open(run_json)).get("wall_time_s", 0.0) if os.path.isfile(run_json) else 0.0
    counters = {"episode_returns": [], "wall_time_s": old_wall, **ckpt["counters"]}
    torch.set_rng_state(ckpt["rng"]["torch"])
    np.random.set_state(ckpt["rng"]["numpy"])
    random.setstate(ckpt["rng"]["python"])
    if os.path.isfile(files["replay.npz"]):
        replay.load(files["replay.npz"], counters["step"])
    else:
        tqdm.write(f"warning: {files['replay.npz']} not found; resuming with an empty replay")
    tqdm.write(f"resumed {os.path.dirname(files['agent.pt'])} at step {counters['step']} "
               f"({counters['updates']} updates, replay {len(replay)})")
    rng = np.random.default_rng([args.seed, counters["step"]])  # checkpoints before the Generator was saved
    if ckpt["rng"].get("generator") is not None:
        rng.bit_generator.state = ckpt["rng"]["generator"]
    return counters, rng, ckpt.get("episode")


def continue_episode(env, replay, labeler, episode, seed, discrete):
    """Bring the env back to the episode in progress at the checkpoint: reset it with the episode's seed and
    step it with the episode's actions from the replay (the env is deterministic given both), so that a run
    stopped and resumed goes on exactly as if it had never stopped. Returns the current frame, or None (a new
    episode starts, as before this existed) when the checkpoint or the replay lacks the episode."""
    if episode is None or len(replay) < episode["ep_len"] + 1:
        return None
    idx = (replay.ptr - episode["ep_len"] - 1 + np.arange(episode["ep_len"] + 1)) % replay.capacity
    obs, _ = env.reset(seed=seed)
    for i in idx[1:]:
        obs, *_ = env.step(env_action(torch.as_tensor(replay.data["action"][i]), discrete))
    if not replay.data["is_first"][idx[0]] or not np.array_equal(obs, replay.data["image"][idx[-1]]):
        tqdm.write("warning: replaying the interrupted episode's actions did not reproduce its last frame; "
                   "a new episode starts (the run goes on, but not exactly as an uninterrupted one)")
        return None
    labeler.codes, labeler.background_codes = episode["codes"], episode.get("background_codes")
    return obs


class RunLog:
    """Tensorboard, eval.csv (one row per evaluation) and episodes.csv (one row per training episode)."""

    def __init__(self, out, args, counters, references):
        from torch.utils.tensorboard import SummaryWriter

        self.out, self.references, self.args = out, references, args
        self.writer = SummaryWriter(out)
        if not args.resume:
            self.writer.add_text("args", "\n".join(f"{k}: {v}" for k, v in asdict(args).items()))
        if references:  # one chart: the agent's VIPER return per episode and the reference behaviours' as lines
            self.writer.add_custom_scalars({"VIPER return per episode": {"agent vs reference behaviour": [
                "Multiline", ["charts/episodic_viper_return", "reference/.*"]]}})
        # on --resume, rows written after the checkpoint are dropped (that stretch is run again)
        self.eval_csv, self.episodes_csv = os.path.join(out, "eval.csv"), os.path.join(out, "episodes.csv")
        start_csv(self.eval_csv, "step,return,wall_time_s", counters["step"])
        start_csv(self.episodes_csv, "step,return,viper_return,length", counters["step"])
        self.last = (time.time(), counters["step"], counters["updates"], 0.0)  # at the last scalars log: time,
        # env step, updates, seconds spent on VIPER rewards

    def episode(self, counters, ret, viper_ret, length):
        """A finished training episode: its true task return and, with VIPER, its VIPER return."""
        s, w = counters["step"], self.writer
        w.add_scalar("charts/episodic_return", ret, s)  # the true task return, whatever --reward is
        w.add_scalar("charts/episodic_length", length, s)
        with open(self.episodes_csv, "a") as f:
            f.write(f"{s},{ret:.2f},{viper_ret if viper_ret is not None else float('nan'):.2f},{length}\n")
        if viper_ret is not None:
            w.add_scalar("charts/episodic_viper_return", viper_ret, s)
            for name, value in self.references.items():
                w.add_scalar(f"reference/{name}", value, s)
            counters["episode_returns"] = (counters["episode_returns"] + [(viper_ret, ret)])[-CORR_EPISODES:]
            corr = pearson(*zip(*counters["episode_returns"]))
            if math.isfinite(corr):
                w.add_scalar("charts/viper_task_return_corr", corr, s)

    def scalars(self, s, counters, metrics, replay, reward_seconds):
        args, (t, step, updates, reward_s) = self.args, self.last
        dt, w = time.time() - t, self.writer
        w.add_scalar("charts/SPS", (s - step) / dt, s)
        w.add_scalar("charts/updates_per_second", (counters["updates"] - updates) / dt, s)
        w.add_scalar("charts/train_ratio", counters["updates"] * args.batch_size * args.batch_length /
                     max(1, s - args.prefill), s)
        w.add_scalar("charts/replay_size", len(replay), s)
        if args.reward == "viper":  # share of wall time spent encoding and scoring frames
            w.add_scalar("charts/reward_time_share", (reward_seconds - reward_s) / dt, s)
        for k, v in metrics.items():
            w.add_scalar(k, v, s)
        self.last = (time.time(), s, counters["updates"], reward_seconds)

    def evaluation(self, s, returns, frames, grid, wall_time_s):
        with open(self.eval_csv, "a") as f:
            f.write(f"{s},{np.mean(returns):.2f},{wall_time_s:.0f}\n")
        self.writer.add_scalar("eval/return", np.mean(returns), s)
        self.writer.add_scalar("eval/return_std", np.std(returns), s)
        self.writer.add_image("eval/episode", film_strip(frames), s, dataformats="HWC")
        save_gif(os.path.join(self.out, f"eval_{s}.gif"), frames)
        if grid is not None:  # open-loop predictions [truth/model/error, n, T, H, W, 3]: rows of 16 frames
            rows = [film_strip(grid[r, j, :32], 16) for j in range(grid.shape[1]) for r in range(3)]
            self.writer.add_image("world_model/open_loop_truth_model_error", np.concatenate(rows, 0), s,
                                  dataformats="HWC")


def check_finite(metrics, counters, ckpt_path):
    """Stop before a checkpoint can store broken weights over the last good ones. (Unlike the stage scripts'
    check_finite, which runs before their one optimiser step, this reads an update's metrics after its four.)"""
    bad = [k for k, v in metrics.items() if not math.isfinite(v)]
    if bad:
        raise FloatingPointError(
            f"update {counters['updates']} (env step {counters['step']}) gave non-finite {', '.join(bad)}; "
            f"{ckpt_path if os.path.isfile(ckpt_path) else 'no checkpoint'} holds the last good state. "
            f"Try lower learning rates (--model-lr, --actor-lr, --critic-lr)")


def save_run(files, args, agent, replay, counters, act_dim, discrete, launch, rng, episode):
    if args.save_replay:  # the replay first: a kill between the two files leaves a replay newer than
        replay.save(files["replay.npz"], counters["step"])  # agent.pt, which --resume detects by its step
    save_checkpoint(files["agent.pt"], agent, counters, args, act_dim, discrete, rng, episode)
    write_run_json(files["run.json"], args, counters, launch)


def optim_state(agent):
    return dict(model=agent.model_opt.state_dict(), actor=agent.actor_opt.state_dict(),
                critics={k: o.state_dict() for k, o in agent.critic_opts.items()},
                ensemble=None if agent.ensemble_opt is None else agent.ensemble_opt.state_dict())


def load_optim_state(agent, state):
    agent.model_opt.load_state_dict(state["model"])
    agent.actor_opt.load_state_dict(state["actor"])
    for k, o in agent.critic_opts.items():
        o.load_state_dict(state["critics"][k])
    if agent.ensemble_opt is not None:
        agent.ensemble_opt.load_state_dict(state["ensemble"])


@torch.no_grad()
def open_loop(agent, batch, context=5, n=4):
    """Frames [3 rows (truth, model, |error|) x n sequences, T, 64, 64, 3] uint8: the world model observes
    `context` frames, then predicts the rest from the replayed actions alone (logged at each evaluation)."""
    device = agent.rssm.init_deter.device
    b = {k: torch.as_tensor(v[:n], device=device) for k, v in batch.items()}
    post, _ = agent.rssm.observe(agent.encoder(b["image"][:, :context]), b["action"][:, :context],
                                 b["is_first"][:, :context])
    state, states = {k: v[:, -1] for k, v in post.items()}, []
    for t in range(context, b["image"].shape[1]):
        state = agent.rssm.img_step(state, b["action"][:, t])
        states.append(agent.rssm.feat(state))
    feat = torch.cat([agent.rssm.feat(post), torch.stack(states, 1)], 1)
    model = agent.decoder(feat).clamp(0, 1).permute(0, 1, 3, 4, 2)
    truth = b["image"].float() / 255.0
    frames = torch.stack([truth, model, (model - truth).abs()])
    return (frames * 255).to(torch.uint8).cpu().numpy()


def upgrade_checkpoint(ckpt):
    """Checkpoints written before the reward terms had one name each: the task head was `heads.reward`,
    the disagreement term `disag`, the ensemble's optimiser `expl`."""
    def rename(key):  # the heads are registered twice: as heads.<name> and inside world_model (index 3)
        for old in ("heads.reward.", "world_model.3.reward."):
            if key.startswith(old):
                key = old.replace("reward", "task") + key[len(old):]
        return key.replace(".disag.", ".disagreement.")

    ckpt["agent"] = {rename(k): v for k, v in ckpt["agent"].items()}
    if "optim" in ckpt:
        optim = ckpt["optim"]
        if "expl" in optim:
            optim["ensemble"] = optim.pop("expl")
        optim["critics"] = {("disagreement" if k == "disag" else k): v for k, v in optim["critics"].items()}
    return ckpt


def cli(argv=None):
    """Args from the command line. --size and --reward are read first and choose the other flags' defaults
    (`preset`), so `--help` shows the values a run will use; a flag given explicitly wins."""
    peek = argparse.ArgumentParser(add_help=False)
    peek.add_argument("--size", choices=list(SIZES), default="cpu")
    peek.add_argument("--reward", choices=["task", "viper"], default="task")
    try:
        known, _ = peek.parse_known_args(argv)
    except SystemExit:  # a bad value: let tyro print its error with the full usage
        known = argparse.Namespace(size="cpu", reward="task")
    return tyro.cli(Args, args=argv, default=Args(**preset(known.size, known.reward)))


# Flags renamed since older checkpoints were written (their args are read by `args_from_checkpoint`).
RENAMED_FLAGS = {"expl_scale": "disagreement_scale", "task_reward_scale": "task_scale"}


def args_from_checkpoint(saved: dict) -> Args:
    """The Args of a saved run. Older checkpoints load too: renamed flags, `device` (now --cuda), and None
    for "the preset's value" (the lrs and scales used to default to None)."""
    d = {RENAMED_FLAGS.get(k, k): v for k, v in saved.items()}
    if "device" in d:  # None meant "cuda if available", as --cuda does now
        device = d.pop("device")
        d["cuda"] = device is None or str(device).startswith("cuda")
    base = preset(d.get("size", "cpu"), d.get("reward", "task"))
    if saved.get("expl_scale", 0) is None and d.get("reward") == "viper":
        base["disagreement_scale"] = 1.0  # --reward viper's default when that flag was called --expl-scale
    d = {k: base[k] if v is None and k in base else v for k, v in d.items()}
    return Args(**{k: v for k, v in d.items() if k in Args.__dataclass_fields__})


def validate(args):
    if args.env_id not in VALID_ENV_IDS:
        raise ValueError(f"unknown --env-id {args.env_id!r}; valid ids: {', '.join(VALID_ENV_IDS)}")
    if args.size not in SIZES:
        raise ValueError(f"unknown --size {args.size!r}; choose from {', '.join(SIZES)}")
    for name in ["total_steps", "batch_size", "batch_length", "eval_every", "save_every", "log_every"]:
        if getattr(args, name) <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.train_ratio <= 0:
        raise ValueError(f"--train-ratio must be positive, got {args.train_ratio}")
    if args.prefill < args.batch_length:
        raise ValueError(f"--prefill ({args.prefill}) must be at least --batch-length ({args.batch_length})")
    if args.replay_capacity < args.prefill:
        raise ValueError(f"--replay-capacity ({args.replay_capacity}) must hold the --prefill ({args.prefill}) steps")
    for name in ["model_lr", "actor_lr", "critic_lr", "adam_beta2"]:
        if not 0 < getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be in (0, 1), got {getattr(args, name)}")
    if args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")
    if args.eval_episodes < 1:
        raise ValueError(f"--eval-episodes must be >= 1, got {args.eval_episodes}")
    if args.resume and not args.output_dir:
        raise ValueError("--resume needs --output-dir of the run to continue")
    if args.reward not in ("task", "viper"):
        raise ValueError(f"unknown --reward {args.reward!r}; choose task or viper")
    if args.reward_mode not in ("conditional", "joint"):
        raise ValueError(f"unknown --reward-mode {args.reward_mode!r}; choose conditional or joint")
    if args.reward == "viper" and not args.reward_model:
        raise ValueError("--reward viper needs --reward-model PATH (videogpt.pt written by train_videogpt.py)")
    if args.reward == "task" and args.reward_model:
        raise ValueError("--reward-model is only used with --reward viper")
    if args.background_model and args.reward != "viper":
        raise ValueError("--background-model divides the video model's likelihood: it needs --reward viper")
    if args.background_model and args.reference_returns:
        raise ValueError("--reference-returns are VIPER returns without --background-model (eval.py reference "
                         "scores the reward model alone): drop one of the two flags")
    if args.density_bounds is not None:
        if args.reward != "viper":
            raise ValueError("--density-bounds rescales the video model's reward: it needs --reward viper")
        lo, hi = args.density_bounds
        if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
            raise ValueError(f"--density-bounds LO HI needs finite LO < HI (nats per step, e.g. the random "
                             f"policy's and the expert's reward per step from eval.py reference), got {lo} {hi}")
    if args.reward == "task" and args.reference_returns:
        raise ValueError("--reference-returns is only used with --reward viper")
    for flag in REWARD_TERMS.values():
        if not (math.isfinite(getattr(args, flag)) and getattr(args, flag) >= 0):
            raise ValueError(f"--{flag.replace('_', '-')} must be a finite number >= 0, got {getattr(args, flag)}")
    if args.reward == "task" and args.density_scale != 0:
        raise ValueError("--density-scale needs --reward viper (the density is the video model's reward)")
    if not term_scales(args):
        raise ValueError("--density-scale, --disagreement-scale and --task-scale are all 0: nothing to learn")
    if args.reward == "viper" and args.density_scale == 0:
        raise ValueError("--reward viper with --density-scale 0 would load the video model and ignore it; in code, "
                         "build Args(**preset(reward='viper'), ...) to get VIPER's defaults")


def run_device(args):
    """--cuda and what this machine has -> the device the run trains and scores on."""
    return torch.device("cuda" if args.cuda and torch.cuda.is_available() else "cpu")


def native_bf16(device):
    """True where bf16 matmuls run in hardware: CUDA, or a CPU with AVX512-BF16 or AMX. Other CPUs emulate
    bf16 (measured ~70x slower than fp32 on one host)."""
    if torch.device(device).type == "cuda":
        return True
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:  # not Linux: no way to tell, so the safe choice
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def reward_bf16(precision, device):
    """--reward-precision -> whether the reward model scores in bf16."""
    return native_bf16(device) if precision == "auto" else precision == "bf16"


def load_reward_model(args, device, frame_size, path=None, flag="--reward-model"):
    """videogpt.pt (--reward-model, or `path` given as `flag`) -> RewardModel, checked against this run: its
    class map must know --env-id (the task label) and its VQ-GAN must take the env's frames."""
    path = path or args.reward_model
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{flag} {path!r} does not exist")
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    rm = load_videogpt(ckpt, device, bf16=reward_bf16(args.reward_precision, device))
    rm.labels(args.env_id)  # raises, listing the known tasks, if the class map lacks this one
    tasks = ckpt.get("tasks")  # an unconditional model has no class map: its training tasks say what it knows
    if tasks is not None and args.env_id not in tasks and not args.allow_new_task:
        raise ValueError(f"{flag} {path!r} was trained on {tasks}, not on {args.env_id!r}: "
                         f"its likelihood does not describe this task (add --allow-new-task to use it anyway)")
    for module in (rm.model, rm.vqgan):
        if not all(torch.isfinite(p).all() for p in module.state_dict().values() if p.is_floating_point()):
            raise ValueError(f"{flag} {path!r} has non-finite (NaN/inf) weights: retrain it "
                             f"(train_videogpt.py / train_vqgan.py with a lower learning rate)")
    if rm.vqgan.image_size != frame_size:
        raise ValueError(f"{flag} {path!r} takes {rm.vqgan.image_size}px frames; "
                         f"{args.env_id} gives {frame_size}px")
    return rm


def load_references(args):
    """{behaviour: mean VIPER return} from --reference-returns (eval.py reference's reference.json), checked
    to be scored for this run's task and reward mode; {} without the flag."""
    if not args.reference_returns:
        return {}
    if not os.path.isfile(args.reference_returns):
        raise FileNotFoundError(f"--reference-returns {args.reference_returns!r} does not exist "
                                f"(write it with: python eval.py reference --reward-model ... --env-id {args.env_id})")
    with open(args.reference_returns) as f:
        ref = json.load(f)
    if (ref.get("env_id"), ref.get("mode")) != (args.env_id, args.reward_mode):
        raise ValueError(f"--reference-returns {args.reference_returns!r} was scored for {ref.get('env_id')!r} "
                         f"({ref.get('mode')}), this run is {args.env_id!r} ({args.reward_mode})")
    return {k.replace(" ", "_").replace(",", ""): v["viper_return_mean"] for k, v in ref["behaviours"].items()}


def start_csv(path, header, step):
    """Create a csv with its header, or (on --resume) keep only the rows up to the checkpoint's step, so
    that rows of a stretch that was run past the last checkpoint and is now repeated are not doubled."""
    rows = []
    if os.path.isfile(path):
        with open(path) as f:
            rows = [r for r in f.read().splitlines()[1:] if r and int(r.split(",")[0]) <= step]
    with open(path, "w") as f:
        f.write("\n".join([header, *rows]) + "\n")


def pearson(x, y):
    """Pearson correlation of two sequences; nan when either is constant or has fewer than 3 values."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if len(x) < 3 or x.std() == 0 or y.std() == 0:
        return float("nan")
    return float(np.corrcoef(x, y)[0, 1])


def film_strip(frames, n=16):
    """[T, H, W, 3] -> one [H, n*W, 3] image of n evenly spaced frames."""
    idx = np.linspace(0, len(frames) - 1, min(n, len(frames))).astype(int)
    return np.concatenate(list(frames[idx]), 1)


def save_gif(path, frames, fps=25):
    from PIL import Image

    imgs = [Image.fromarray(f) for f in frames]
    tmp = path + ".tmp.gif"
    imgs[0].save(tmp, save_all=True, append_images=imgs[1:], duration=int(1000 / fps), loop=0)
    os.replace(tmp, path)


def save_checkpoint(path, agent, counters, args, act_dim, discrete, rng=None, episode=None):
    """rng: the Generator of replay sampling; episode: the episode in progress (main's episode_state)."""
    ckpt = dict(kind="agent", agent=agent.state_dict(), optim=optim_state(agent), counters=counters, args=asdict(args),
                act_dim=act_dim, discrete=discrete, episode=episode,
                rng=dict(torch=torch.get_rng_state(), numpy=np.random.get_state(), python=random.getstate(),
                         generator=None if rng is None else rng.bit_generator.state))
    tmp = path + ".tmp"
    torch.save(ckpt, tmp)
    os.replace(tmp, path)


def launch_info():
    """(command, commit) of this process, for run.json; `main` reads it at start, before the code on disk can
    change under a long run."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        commit = subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=40"], cwd=here,
                                capture_output=True, text=True, timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        commit = "unknown"
    return shlex.join(["python", os.path.basename(sys.argv[0]), *sys.argv[1:]]), commit


def write_run_json(path, args, counters, launch):
    """run.json: what a results table needs (see README, Results). The command and commit are those that
    started the run; a --resume adds its own to `resumed_with`. eval.py agent adds the final_return_* keys."""
    info = {}
    if os.path.isfile(path):
        with open(path) as f:
            info = json.load(f)
    command, commit = launch
    if "command" not in info:
        info.update(command=command, commit=commit)
    elif args.resume and (command, commit) not in [tuple(x) for x in info.get("resumed_with", [])]:
        info["resumed_with"] = info.get("resumed_with", []) + [[command, commit]]
    if "final_return_mean" in info and info.get("final_env_steps", info.get("env_steps")) != counters["step"]:
        # the run went on past its final evaluation (e.g. resumed with a larger --total-steps): that result is
        # now an earlier one, kept under earlier_finals, and the tables must not read it as this run's final
        old = {k: info.pop(k) for k in [k for k in info if k.startswith("final_")]}
        old.setdefault("final_env_steps", info.get("env_steps"))
        info["earlier_finals"] = info.get("earlier_finals", []) + [old]
    info.update(env_id=args.env_id, reward=args.reward, seed=args.seed, env_steps=counters["step"],
                updates=counters["updates"], wall_time_s=round(counters["wall_time_s"], 1))
    if args.reward == "viper":  # what --reward-precision auto chose on this host
        info["reward_precision"] = "bf16" if reward_bf16(args.reward_precision, run_device(args)) else "fp32"
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(info, f, indent=1)
    os.replace(tmp, path)


@contextmanager
def deferred_stop():
    """Inside: Ctrl-C (SIGINT) or a polite kill (SIGTERM: `kill`, a batch scheduler's preemption, a session's
    end) only appends the signal number to the yielded list, which the main loop checks after every env step,
    so the run stops between steps (never in the middle of an update) and saves there. A second signal of
    the same kind acts at once (Ctrl-C raises KeyboardInterrupt, SIGTERM ends the process)."""
    flag = []
    if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
        yield flag
        return
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}

    def handler(signum, frame):
        flag.append(signum)
        signal.signal(signum, previous[signum])

    for sig in previous:
        signal.signal(sig, handler)
    try:
        yield flag
    finally:
        for sig, h in previous.items():
            signal.signal(sig, h)


def keep_freed_memory():
    """glibc returns every freed block over 32 MB to the OS, so each update re-faults its large
    activations page by page (~30% of CPU time at batch 16 x 64). Keep freed memory in the heap instead."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-4, 0)  # M_MMAP_MAX: serve large blocks from the heap, not fresh mmaps
        libc.mallopt(-1, 2 ** 30)  # M_TRIM_THRESHOLD: do not give back the heap top below 1 GB free
    except (OSError, AttributeError):  # not glibc: nothing to tune
        pass


class AgentPolicy:
    """Stateful policy (mode, or samples if explore): obs -> env action, keeping the RSSM latent between calls.

    Call `reset()` at each episode start (the env's reset() is also hooked to do it).
    """

    def __init__(self, agent: Dreamer, env, explore=False):
        self.agent, self.env, self.explore, self.carry = agent, env, explore, None

    def reset(self):
        self.carry = None

    def __call__(self, obs):
        action, self.carry = self.agent.policy(obs, self.carry, self.explore)
        return env_action(action, self.agent.discrete)


def load_agent_policy(checkpoint_path, env, device="cpu", explore=False):
    """Load agent.pt written by this script and return a stateful policy (callable obs -> action, reset())
    that acts with the mode of the actor, or with samples if explore."""
    if not os.path.isfile(checkpoint_path):
        raise FileNotFoundError(f"agent checkpoint {checkpoint_path!r} does not exist")
    ckpt = upgrade_checkpoint(torch.load(checkpoint_path, map_location=device, weights_only=False))
    args = args_from_checkpoint(ckpt["args"])
    act_dim, discrete = action_spec(env)
    if (act_dim, discrete) != (ckpt["act_dim"], ckpt["discrete"]):
        raise ValueError(f"{checkpoint_path} was trained on {args.env_id} (action dim {ckpt['act_dim']}, "
                         f"discrete={ckpt['discrete']}); this env has action dim {act_dim}, discrete={discrete}")
    agent = Dreamer(args, act_dim, discrete).to(device)
    agent.load_state_dict(ckpt["agent"])
    agent.eval()
    policy = AgentPolicy(agent, env, explore)
    env_reset = env.reset

    def reset(*a, **kw):  # a new episode must start from a fresh latent, even if the caller forgets
        policy.reset()
        return env_reset(*a, **kw)

    env.reset = reset
    return policy


# =============================================================================================
# Appendix B: the frozen VIPER reward model. Inference-only copies of the VQ-GAN's encoder half (train_vqgan.py)
# and of the VideoGPT with its reward (train_videogpt.py): what scoring frames runs, no decoder, no sampling.
# Loaded from the self-contained videogpt.pt by `load_videogpt`. Not part of the agent's story: the agent
# only calls `RewardModel` (encode, score).
# =============================================================================================
# ==== VQGAN_ENCODER: copied verbatim from train_vqgan.py into train_videogpt.py, train_viper_dreamer.py; tests/test_parity.py keeps the copies identical ====
def vq_norm(c):
    return nn.GroupNorm(math.gcd(32, c), c, eps=1e-6)


class ResBlock(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.norm1, self.conv1 = vq_norm(cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2, self.conv2 = vq_norm(cout), nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        return self.skip(x) + self.conv2(F.silu(self.norm2(h)))


class AttnBlock(nn.Module):
    """Single-head self-attention over all positions of the coarsest grid."""

    def __init__(self, c):
        super().__init__()
        self.norm, self.qkv, self.proj = vq_norm(c), nn.Conv2d(c, 3 * c, 1), nn.Conv2d(c, c, 1)

    def forward(self, x):
        B, C, H, W = x.shape
        q, k, v = self.qkv(self.norm(x)).flatten(2).transpose(1, 2).unsqueeze(1).chunk(3, dim=-1)
        h = F.scaled_dot_product_attention(q, k, v).squeeze(1).transpose(1, 2)
        return x + self.proj(h.reshape(B, C, H, W))


class Encoder(nn.Sequential):
    def __init__(self, ch, ch_mult, num_res_blocks, embed_dim):
        layers, c = [nn.Conv2d(3, ch, 3, padding=1)], ch
        for i, m in enumerate(ch_mult):
            for _ in range(num_res_blocks):
                layers.append(ResBlock(c, ch * m))
                c = ch * m
            if i < len(ch_mult) - 1:
                layers.append(nn.Conv2d(c, c, 3, stride=2, padding=1))  # downsample 2x
        layers += [ResBlock(c, c), AttnBlock(c), ResBlock(c, c)]  # middle block at the token resolution
        layers += [vq_norm(c), nn.SiLU(), nn.Conv2d(c, embed_dim, 3, padding=1)]
        super().__init__(*layers)


class Quantizer(nn.Module):
    """Nearest codebook entry by cosine similarity (l2-normalised codes, as in ViT-VQGAN)."""

    def __init__(self, codebook_size, embed_dim):
        super().__init__()
        self.codebook = nn.Embedding(codebook_size, embed_dim)

    def forward(self, z):  # unit vectors [B,D,h,w] -> codes long [B,h,w]
        with torch.autocast(z.device.type, enabled=False):  # pick codes in fp32
            sim = torch.einsum("bdhw,kd->bhwk", z.float(), F.normalize(self.codebook.weight.float(), dim=-1))
        return sim.argmax(-1)


def pixel_mask(mask, image_size):
    """None (no mask) or a [H, W] array of 0/1 (1 = keep the pixel, 0 = blank it) -> None or uint8 tensor [H, W]."""
    if mask is None:
        return None
    mask = torch.as_tensor(mask)
    if mask.shape != (image_size, image_size) or not ((mask == 0) | (mask == 1)).all():
        raise ValueError(f"a pixel mask is [{image_size}, {image_size}] of 0/1, got {mask.dtype} {tuple(mask.shape)}")
    return mask.to(torch.uint8)


def apply_mask(frames, mask):
    """uint8 frames [..., H, W, 3] with the masked pixels set to 0 (black); unchanged (the same tensor) for None."""
    return frames if mask is None else frames * mask[..., None]


class VQEncoder(nn.Module):
    """The tokenizer half of the VQ-GAN, all that turning frames into codes needs: frames -> encoder -> unit
    vectors z -> nearest codes. VQGAN (below in train_vqgan.py and train_videogpt.py) adds the decoder; the
    attribute names are VQGAN's, so both load from the state dict in vqgan.pt.

    mask: an optional pixel mask ([H, W], 1 = keep, 0 = blank; e.g. the score digits of an Atari game) that
    `encode` multiplies into every frame first. It is the buffer `mask` of the state dict, so vqgan.pt (and the
    videogpt.pt that embeds it) carries it to every later stage; a model without a mask has no such entry."""

    def __init__(self, image_size=64, base_channels=128, channel_mult=(1, 2, 2, 2), num_res_blocks=1,
                 codebook_size=256, embed_dim=64, mask=None):
        super().__init__()
        self.encoder = Encoder(base_channels, channel_mult, num_res_blocks, embed_dim)
        self.quantizer = Quantizer(codebook_size, embed_dim)
        self.image_size, self.codebook_size = image_size, codebook_size
        self.token_hw = (image_size // 2 ** (len(channel_mult) - 1),) * 2
        self.register_buffer("mask", pixel_mask(mask, image_size))

    @torch.inference_mode()
    def encode(self, frames, chunk_size=256):
        """uint8 [N,H,W,3] (tensor or array) -> codes long [N,h,w], on the model's device."""
        frames = torch.as_tensor(frames)
        if frames.dtype != torch.uint8 or frames.shape[1:] != (self.image_size, self.image_size, 3):
            raise ValueError(f"encode expects uint8 [N,{self.image_size},{self.image_size},3], "
                             f"got {frames.dtype} {tuple(frames.shape)}")
        device = self.quantizer.codebook.weight.device
        codes = [torch.zeros(0, *self.token_hw, dtype=torch.long, device=device)]
        for i in range(0, len(frames), chunk_size):
            x = apply_mask(frames[i:i + chunk_size].to(device), self.mask)
            x = x.permute(0, 3, 1, 2).float() / 127.5 - 1.0
            codes.append(self.quantizer(F.normalize(self.encoder(x), dim=1)))
        return torch.cat(codes)


def vq_config(ckpt):
    """The constructor arguments of the model in a vqgan.pt dict (train_vqgan.py), checked to be one."""
    if not isinstance(ckpt, dict) or ckpt.get("kind") != "vqgan":
        raise ValueError("not a VQGAN checkpoint (expected the vqgan.pt dict written by train_vqgan.py)")
    a = ckpt["args"]
    return (ckpt["image_size"], a["base_channels"], tuple(ckpt["channel_mult"]), a["num_res_blocks"],
            ckpt["codebook_size"], ckpt["embed_dim"])


def load_vq_encoder(ckpt, device="cpu"):
    """Rebuild the VQEncoder (eval mode) of a vqgan.pt dict: its encoder and codebook weights, not the decoder's."""
    model = VQEncoder(*vq_config(ckpt), mask=ckpt["model"].get("mask"))  # checkpoints before masks have none
    model.load_state_dict({k: ckpt["model"][k] for k in model.state_dict()})
    return model.to(device).eval()
# ==== END VQGAN_ENCODER ====


# ==== VIDEOGPT: copied verbatim from train_videogpt.py into train_viper_dreamer.py; tests/test_parity.py keeps the copies identical ====
class CausalSelfAttention(nn.Module):
    def __init__(self, width, heads, dropout):
        super().__init__()
        assert width % heads == 0, f"width {width} is not divisible by {heads} heads"
        self.heads, self.dropout = heads, dropout
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.resid_drop = nn.Dropout(dropout)

    def forward(self, x, queries=None):
        """x [B, S, C] -> [B, S, C]; with `queries`, only the last `queries` positions: [B, queries, C]
        (each still attends to every position up to its own)."""
        B, S, C = x.shape
        q, k, v = self.qkv(x).view(B, S, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        p = self.dropout if self.training else 0.0
        if queries is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=S > 1, dropout_p=p)
        else:  # is_causal would align the mask to the first key; query i is position S - queries + i
            mask = torch.ones(queries, S, dtype=torch.bool, device=x.device).tril(S - queries)
            y = F.scaled_dot_product_attention(q[:, :, S - queries:], k, v, attn_mask=mask, dropout_p=p)
        return self.resid_drop(self.proj(y.transpose(1, 2).reshape(B, y.shape[2], C)))


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, width, heads, mlp_dim, dropout):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attn = CausalSelfAttention(width, heads, dropout)
        self.mlp = nn.Sequential(nn.Linear(width, mlp_dim), nn.GELU(), nn.Linear(mlp_dim, width), nn.Dropout(dropout))

    def forward(self, x, queries=None):
        x = (x if queries is None else x[:, x.shape[1] - queries:]) + self.attn(self.ln1(x), queries)
        return x + self.mlp(self.ln2(x))


class VideoGPT(nn.Module):
    """Causal transformer over a clip's codes [B, n, h, w] (n <= seq_len frames), raster order (time, row, col).

    Position i of the input holds token i-1 (a learned start token at i = 0) plus the embedding of
    position i = (t, r, c), so the output at i predicts token i knowing where it lies.
    """

    def __init__(self, vocab_size, seq_len, token_hw, width=256, num_layers=8, num_heads=8, mlp_dim=1024,
                 dropout=0.1, num_classes=0):
        super().__init__()
        h, w = token_hw
        self.vocab_size, self.seq_len, self.token_hw = vocab_size, seq_len, (h, w)
        self.tok_emb = nn.Embedding(vocab_size, width)
        self.start = nn.Parameter(0.02 * torch.randn(width))
        self.pos_t = nn.Parameter(0.02 * torch.randn(seq_len, width))  # factorised: time + row + col
        self.pos_r = nn.Parameter(0.02 * torch.randn(h, width))
        self.pos_c = nn.Parameter(0.02 * torch.randn(w, width))
        self.class_emb = nn.Embedding(num_classes, width) if num_classes > 0 else None
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(width, num_heads, mlp_dim, dropout) for _ in range(num_layers))
        self.ln_f = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab_size, bias=False)
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)

    def pos_emb(self):
        """[seq_len*h*w, width] embedding of every position in raster order."""
        return (self.pos_t[:, None, None] + self.pos_r[None, :, None] + self.pos_c[None, None, :]).flatten(0, 2)

    def _check_labels(self, labels, batch):
        if (self.class_emb is None) != (labels is None):
            raise ValueError("a class-conditional model needs labels; an unconditional one takes none")
        return 0 if labels is None else self.class_emb(labels.expand(batch))[:, None]

    def forward(self, codes, labels=None, queries=None, fp32_head=False):
        """codes long [B, n, h, w] -> logits [B, n*h*w, vocab]; logits[:, i] predict flattened token i.
        With `queries`, the logits of the last `queries` positions only: the last block and the output
        layer run there alone (the earlier blocks still run everywhere: they give the last block its keys).
        fp32_head: the output layer in fp32 even under bf16 autocast (log-likelihoods for rewards)."""
        B, n = codes.shape[:2]
        if n > self.seq_len or tuple(codes.shape[2:]) != self.token_hw:
            raise ValueError(f"codes {tuple(codes.shape)} do not fit [B, <={self.seq_len}, *{self.token_hw}]")
        tokens = codes.flatten(1)
        x = torch.cat([self.start.expand(B, 1, -1), self.tok_emb(tokens[:, :-1])], 1)
        x = self.drop(x + self.pos_emb()[:tokens.shape[1]] + self._check_labels(labels, B))
        for i, block in enumerate(self.blocks):
            x = block(x, queries if i == len(self.blocks) - 1 else None)
        if fp32_head:  # bf16 logits over the codebook cost accuracy (summed over a frame's tokens) and, on CPU, time
            with torch.autocast(x.device.type, enabled=False):
                return self.head(self.ln_f(x.float()))
        return self.head(self.ln_f(x))

    def frame_log_probs(self, codes, labels=None):
        """log p of every frame of the clip given the frames before it: [B, n] (sum over its h*w tokens)."""
        B, n = codes.shape[:2]
        logp = self(codes, labels, fp32_head=True).float().log_softmax(-1)
        logp = logp.gather(-1, codes.flatten(1)[..., None])[..., 0]
        return logp.view(B, n, -1).sum(-1)

    def last_frame_log_prob(self, codes, labels=None):
        """log p of the clip's last frame given the frames before it: [B], = frame_log_probs(...)[:, -1] with
        the last block and the output layer run for that frame's tokens only (~20% of the FLOPs saved)."""
        last = codes[:, -1].flatten(1)
        logp = self(codes, labels, queries=last.shape[1], fp32_head=True).float().log_softmax(-1)
        return logp.gather(-1, last[..., None])[..., 0].sum(-1)


class RewardModel:
    """VQ-GAN encoder + VideoGPT: frames -> VIPER rewards. (Open-loop samples: sample_video, train_videogpt.py.)

    model and vqgan (a VQEncoder, or the whole VQGAN) are in eval mode; seq_len L and frame_skip k are those
    the model was trained with; class_map ({task: label}) is None for an unconditional model (then `task` is ignored).
    max_tokens bounds the tokens per forward pass (memory). bf16: the transformer blocks under bf16 autocast;
    the output layer, the log-probabilities and the VQ-GAN encoder (so the codes) stay fp32. Faster where
    bf16 is native; the rewards move by a few hundredths of a nat per step (README, bf16 reward scoring).
    """

    def __init__(self, model, vqgan, seq_len, frame_skip, class_map=None, max_tokens=32768, bf16=False):
        self.model, self.vqgan = model.eval(), vqgan.eval()
        self.seq_len, self.frame_skip, self.class_map = seq_len, frame_skip, class_map
        self.max_tokens, self.bf16 = max_tokens, bf16

    @property
    def device(self):
        return self.model.start.device

    def labels(self, task):
        if self.class_map is None:
            return None
        if task not in self.class_map:
            raise ValueError(f"task {task!r} is not in the video model's class map; known tasks: {sorted(self.class_map)}")
        return torch.tensor([self.class_map[task]], device=self.device)

    @torch.inference_mode()
    def encode(self, frames):
        """uint8 frames [B, T, H, W, 3] (tensor or array) -> codes long [B, T, h, w] on self.device."""
        frames = torch.as_tensor(frames)
        if frames.dim() != 5 or frames.shape[-1] != 3 or frames.dtype != torch.uint8:
            raise ValueError(f"frames must be uint8 [B, T, H, W, 3], got {frames.dtype} {tuple(frames.shape)}")
        return self.vqgan.encode(frames.flatten(0, 1)).view(*frames.shape[:2], *self.model.token_hw).long()

    @torch.inference_mode()
    def rewards_from_codes(self, codes, task=None, mode="conditional", first_step=0):
        """VIPER rewards from codes long [B, T, h, w]: float [B, T - first_step] (CPU), steps first_step..T-1.

        The window ending at step t holds frames t-(L-1)k, ..., t-k, t. First-steps rule: while t < (L-1)k
        the window is the available prefix with the same skip, frames t - jk >= 0 (n = t//k + 1 of them,
        so step 0 is scored by log p(x_0) alone). conditional: r_t = log p(x_t | earlier frames of the
        window); joint: r_t = log p(all frames of the window). first_step lets a caller that keeps an
        episode's codes score only its new steps (the history before first_step is used as context).
        """
        if mode not in ("conditional", "joint"):
            raise ValueError(f"reward mode must be 'conditional' or 'joint', got {mode!r}")
        labels = self.labels(task)
        codes = codes.to(self.device).long()
        B, T = codes.shape[:2]
        L, k = self.seq_len, self.frame_skip
        t = torch.arange(first_step, T, device=self.device)
        if len(t) == 0:
            return torch.zeros(B, 0)
        n = (t // k + 1).clamp(max=L)  # frames in the window ending at t
        j = torch.arange(L, device=self.device)
        idx = t[:, None] - (n[:, None] - 1 - j) * k  # slot j of window t -> frame index
        idx = torch.where(j < n[:, None], idx, t[:, None])  # slots past the prefix: any frame (causal: ignored)

        def score(rows, frames, fn):  # fn on the first `frames` slots of windows `rows` of every episode
            windows = torch.arange(B * len(rows), device=self.device)  # w: episode w // len(rows), row w % len(rows)
            per_pass = max(1, self.max_tokens // (frames * codes[0, 0].numel()))
            return torch.cat([fn(codes[w[:, None] // len(rows), idx[rows[w % len(rows)], :frames]], labels)
                              for w in windows.split(per_pass)]).view(B, len(rows), -1)

        with torch.autocast(self.device.type, torch.bfloat16, enabled=self.bf16):
            if mode == "joint":
                r = score(torch.arange(len(t), device=self.device), L, self.model.frame_log_probs)
                r = (r * (j < n[:, None])).sum(-1)
            else:  # only the window's last frame is scored; the first steps' shorter windows go in groups by length
                r = torch.empty(B, len(t), device=self.device)
                for m in n.unique().tolist():
                    rows = (n == m).nonzero()[:, 0]
                    r[:, rows] = score(rows, m, self.model.last_frame_log_prob)[..., 0]
        return r.float().cpu()

    def compute_rewards(self, frames, task=None, mode="conditional", first_step=0):
        """VIPER rewards of uint8 frames [B, T, H, W, 3] -> float [B, T - first_step]; see rewards_from_codes."""
        return self.rewards_from_codes(self.encode(frames), task, mode, first_step)


def load_videogpt(ckpt, device="cpu", bf16=False):
    """videogpt.pt dict (torch.load) -> RewardModel on device, EMA weights (bf16: see RewardModel)."""
    if not isinstance(ckpt, dict) or ckpt.get("kind") != "videogpt":
        raise ValueError("not a videogpt.pt checkpoint (expected a dict with kind='videogpt')")
    a, class_map = ckpt["args"], ckpt["class_map"]
    model = VideoGPT(ckpt["vqgan"]["codebook_size"], ckpt["seq_len"], tuple(ckpt["token_hw"]), a["width"],
                     a["num_layers"], a["num_heads"], a["mlp_dim"], a["dropout"], len(class_map) if class_map else 0)
    model.load_state_dict(ckpt["model"])
    vqgan = load_vq_encoder(ckpt["vqgan"], device)  # scoring encodes frames: no decoder
    return RewardModel(model.to(device), vqgan, ckpt["seq_len"], ckpt["frame_skip"], class_map, bf16=bf16)
# ==== END VIDEOGPT ====


if __name__ == "__main__":
    main(cli())
