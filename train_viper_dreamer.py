"""DreamerV3 from 64x64 pixels, in one file: the agent VIPER trains (part 1: the task-reward oracle).

Follows DreamerV3 as first published: Hafner et al., "Mastering Diverse Domains through World Models",
arXiv:2301.04104 **v1 (January 2023)** and its code of that time, which is the version VIPER built on.

Algorithm
---------
World model (trained on replayed 64-step chunks, batch 16, Adam lr 1e-4, eps 1e-8, grad-norm clip 1000):
  * CNN encoder: 4 stride-2 4x4 convs (64->32->16->8->4 px, channels d, 2d, 4d, 8d), LayerNorm + SiLU;
    input is image/255 - 0.5.
  * RSSM: deterministic state h from a GRU whose gates come from one LayerNorm'd linear layer (update
    gate biased by -1); stochastic state z = 32 categoricals with 32 classes, each mixed with 1% uniform
    ("unimix") and sampled with straight-through gradients. Posterior q(z|h,x), prior p(z|h).
    The initial h is learned (tanh of a parameter); z0 is the prior's mode.
  * Heads on feat = [h, z]: decoder (transposed CNN, mirror of the encoder, MSE summed over pixels),
    reward (two-hot over 255 bins spaced evenly in symlog space on [-20, 20], zero-initialised output
    layer), continue (Bernoulli logit, target 1 - is_terminal).
  * KL balancing: 0.5 * max(1, KL[sg(q) || p]) + 0.1 * max(1, KL[q || sg(p)]) (free bits 1 nat, per step).
Actor-critic (learned in imagination, Adam lr 3e-5, eps 1e-5, grad-norm clip 100):
  * Imagine 15 steps from every posterior state of the batch (16 x 64 starts) with the actor.
  * lambda-returns (lambda 0.95, discount 1 - 1/333) bootstrapped with the critic; steps after a predicted
    episode end are down-weighted by the cumulative product of predicted continue flags.
  * Critic: two-hot over symlog bins (zero-init output), trained on the lambda-returns plus a regulariser
    towards the prediction of a slow copy (EMA, 2% per update), both as two-hot log-likelihoods.
  * Returns normalised by S = max(1, P95 - P5), percentiles tracked with an EMA of decay 0.99.
  * Actor: REINFORCE for discrete actions (Atari), backpropagation through the learned dynamics for
    continuous actions (DMC); entropy bonus 3e-4; discrete: 1% unimix; continuous: Normal(tanh(mu),
    sigma) with sigma in [0.1, 1].
  * Critics are a dict keyed by reward term, each with its own slow copy, optimiser and return
    normaliser; the actor's advantage is the scale-weighted mean of their normalised advantages
    (DreamerV3 code's `critics`/`scales`). Part 1 has one term, `task`.
Data: one environment; uniform replay of 64-step chunks; `--train-ratio` replayed steps per env step,
i.e. one update every batch_size * batch_length / train_ratio env steps once `--prefill` random steps
are collected.

Reward seam (VIPER, part 2): `StepRewards` labels each step once as it enters the replay (task: the env
reward; VIPER will add the video-model likelihood); `Dreamer.imagined_rewards` turns imagined states into
one reward per critic (task: the reward head); `WM_HEADS` lists the two-hot heads the world model fits to
replay fields.

Model sizes (`--size`; the paper's table: GRU units / dense units / CNN multiplier d / MLP layers):
  XS 256/256/24/1, S 512/512/32/2, M 1024/640/48/3, L 2048/768/64/4, XL 4096/1024/96/5 (32x32 latents).
  `cpu` (ours, for 2 CPU cores): GRU 128, dense 128, d 8, 1 layer, 16x16 latents; 1.2M parameters,
  ~0.5 CPU-s per update at batch 16 x 32 (S: ~11 CPU-s at 16 x 64; bench/bench_dreamer.py).
The paper trains DMC from pixels with train ratio 512 (one update every 2 env steps): ~50k updates per
100k env steps, far beyond 2 CPU cores. The CPU recipe for dmc_cartpole_balance (~6k updates, ~1 h):
    python train_viper_dreamer.py --env-id dmc_cartpole_balance --size cpu --batch-length 32 --train-ratio 32

Deliberate deviations from the paper/code (v1):
  * `cpu` size preset: smaller nets and 16x16 latents, and a faster optimiser for its ~10x fewer updates:
    learning rates 3e-4 (model) / 1e-4 (actor, critic) and Adam beta2 0.99 instead of 1e-4 / 3e-5 / 0.999
    (reason at CPU_OPT). Other sizes use the paper's values; flags override either.
  * One environment instead of several; the replay is one stream and a sampled chunk may cross episode
    boundaries (is_first resets the latent, as in the paper); every chunk starts from the learned initial
    latent (its first step is treated as is_first) instead of a latent carried over from earlier training.
  * `--prefill` env steps with uniform random actions before learning starts.
  * Evaluation acts with the mode of the policy (training samples).
  * Replay stores the clipped action the env executed; layers followed by LayerNorm have no bias (the
    norm's offset plays its role); prior logits are computed for the whole chunk after the posterior
    loop (same values, fewer sequential ops).
  * bf16 autocast only on CUDA (untested here: no GPU); fp32 on CPU. No parallel data loaders.

Files in --output-dir (default runs/<run name>): tensorboard events (episodic return/length, losses,
SPS, achieved train ratio, eval return, eval film strips and open-loop predictions), eval.csv (one row per
evaluation: step, mean return over --eval-episodes greedy episodes), eval_<step>.gif (first eval episode),
agent.pt (all networks, optimisers, return normalisers, counters, RNG states, args as a dict; written
atomically) and, with --save-replay, replay.npz (the replay, written atomically, so that --resume
continues exactly enough: same weights, optimiser moments, normalisers, step, replay; the interrupted
episode restarts).
Replay memory: uint8 frames, 64*64*3 + 4*(action dims + 1) + 2 bytes ~= 12.3 KB per env step, allocated
lazily: 100k steps = 1.2 GB, the 1M-step default capacity = 12.3 GB at most.

    python train_viper_dreamer.py --env-id dmc_cartpole_balance --size cpu --batch-length 32 --train-ratio 32
    python train_viper_dreamer.py --env-id dmc_walker_walk --size S --train-ratio 512   # paper DMC setting
    python train_viper_dreamer.py --env-id atari_pong --size S --train-ratio 64
    python train_viper_dreamer.py --output-dir runs/x --resume         # continue runs/x
"""

import copy
import csv
import ctypes
import math
import os
import random
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Literal, Optional

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
    reward: Literal["task"] = "task"
    """reward the agent learns from: `task` = the environment's reward (the oracle baseline)"""
    size: Literal["cpu", "XS", "S", "M", "L", "XL"] = "cpu"
    """model size preset (paper sizes XS..XL, or `cpu`: small enough for 2 CPU cores)"""
    total_steps: int = 100_000
    """env steps (agent decisions; DMC repeats each action for 2 simulator steps, Atari for 4 frames)"""
    train_ratio: float = 32.0
    """replayed steps per env step (one update of batch_size * batch_length steps every that / ratio env
    steps); paper: 512 for DMC from pixels, 32 in its default config"""
    prefill: int = 2500
    """env steps with uniform random actions before learning starts"""
    model_lr: Optional[float] = None
    """world model Adam learning rate (default: paper 1e-4; `cpu` size 3e-4)"""
    actor_lr: Optional[float] = None
    """actor Adam learning rate (default: paper 3e-5; `cpu` size 1e-4)"""
    critic_lr: Optional[float] = None
    """critic Adam learning rate (default: paper 3e-5; `cpu` size 1e-4)"""
    adam_beta2: Optional[float] = None
    """Adam second-moment decay of all optimisers (default: paper 0.999; `cpu` size 0.99)"""
    batch_size: int = 16
    """replayed chunks per update"""
    batch_length: int = 64
    """steps per replayed chunk"""
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
    seed: int = 0
    """seed of torch, numpy, the env (seed) and the eval env (seed + 1)"""
    output_dir: Optional[str] = None
    """where logs and checkpoints go (default runs/<env-id>__dreamer__<seed>__<time>)"""
    resume: bool = False
    """continue the run in --output-dir from its agent.pt (and replay.npz if present)"""
    device: Optional[str] = None
    """torch device (default: cuda if available, else cpu)"""
    threads: int = 1
    """torch CPU threads. 1 is fastest on cores shared with other processes: there, 2 OpenMP threads wait
    on each other at every op and one update can take 10x longer"""


# Model sizes: GRU units, dense units, CNN multiplier, MLP layers, latents, classes per latent.
SIZES = {
    "cpu": dict(deter=128, units=128, depth=8, layers=1, stoch=16, classes=16),
    "XS": dict(deter=256, units=256, depth=24, layers=1, stoch=32, classes=32),
    "S": dict(deter=512, units=512, depth=32, layers=2, stoch=32, classes=32),
    "M": dict(deter=1024, units=640, depth=48, layers=3, stoch=32, classes=32),
    "L": dict(deter=2048, units=768, depth=64, layers=4, stoch=32, classes=32),
    "XL": dict(deter=4096, units=1024, depth=96, layers=5, stoch=32, classes=32),
}
# Fixed hyperparameters of the paper (same for every domain and size).
UNIMIX = 0.01  # uniform share mixed into every categorical (latents and discrete actions)
BINS = 255  # two-hot bins, evenly spaced in symlog space on [-20, 20]
KL_FREE, KL_DYN, KL_REP = 1.0, 0.5, 0.1  # free nats, dynamics and representation KL scales
IMAG_HORIZON, GAMMA, LAMBDA = 15, 1.0 - 1.0 / 333, 0.95
ACTOR_ENT = 3e-4
SLOW_CRITIC_MIX, SLOWREG = 0.02, 1.0
RETNORM_DECAY, RETNORM_LO, RETNORM_HI = 0.99, 0.05, 0.95
MODEL_EPS, MODEL_CLIP = 1e-8, 1000.0  # Adam epsilon and global grad-norm clip of the world model
AC_EPS, AC_CLIP = 1e-5, 100.0  # same, actor and critics
PAPER_OPT = dict(model_lr=1e-4, actor_lr=3e-5, critic_lr=3e-5, adam_beta2=0.999)
# `cpu` size: a CPU affords ~5k updates in 100k env steps, not the paper's ~50k. The first updates'
# large image-loss gradients inflate Adam's second moment; with beta2 0.999 the encoder then learns
# ~1000x slower than its learning rate for thousands of updates and the posterior ignores the small
# cartpole (measured: no escape in 1000 updates). beta2 0.99 forgets them 10x sooner (escape after
# ~600 updates), and larger learning rates make up for the fewer updates.
CPU_OPT = dict(model_lr=3e-4, actor_lr=1e-4, critic_lr=1e-4, adam_beta2=0.99)


def optimiser_settings(args):
    """Learning rates and Adam beta2: flags where given, else the size's defaults."""
    base = CPU_OPT if args.size == "cpu" else PAPER_OPT
    return {k: v if getattr(args, k) is None else getattr(args, k) for k, v in base.items()}


# ==== ENV: copied verbatim into train_viper_dreamer.py; tests/test_parity.py keeps the copies identical ====
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


class Encoder(nn.Module):
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


class Decoder(nn.Module):
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
        action = action * (1.0 / torch.clamp(action.abs(), min=1.0)).detach()  # keep actions in [-1, 1]
        x = self.img_in(torch.cat([prev["stoch"].flatten(-2), action], -1))
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


@contextmanager
def frozen(*modules):
    """Parameters get no gradient inside (gradients still flow *through* the modules)."""
    params = [p for m in modules for p in m.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


# ---------------------------------------------------------------------------------------------
# Reward seam (VIPER, part 2 hooks in here)
# ---------------------------------------------------------------------------------------------
# World-model two-hot heads: head name -> replay field it is trained to predict. VIPER adds
# `density` -> the video-model reward (and keeps `reward` out of the model's gradients).
WM_HEADS = {"reward": "reward"}


class StepRewards:
    """Labels each step ONCE as it enters the replay: returns the replay reward fields of the step.

    `--reward task`: the env reward. VIPER (part 2) adds the video-model log-likelihood of the frame,
    scored here in batches at insert time from the episode's recent frames, and never recomputed.
    """

    fields = ("reward",)

    def __init__(self, args):
        self.args = args

    def reset(self, frame):
        """A new episode starts with this (reset) frame; returns the fields of that first step."""
        return {"reward": 0.0}

    def __call__(self, frame, env_reward):
        return {"reward": float(env_reward)}


def critic_scales(args):
    """Reward terms the actor maximises, each with its own critic, and their weights."""
    return {"task": 1.0}


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

    def save(self, path):
        tmp = path + ".tmp.npz"
        np.savez(tmp, ptr=self.ptr, size=self.size, **{k: v[: self.size] for k, v in self.data.items()})
        os.replace(tmp, path)

    def load(self, path):
        with np.load(path) as f:
            size = int(f["size"])
            if size > self.capacity:
                raise ValueError(f"{path} holds {size} steps, more than --replay-capacity {self.capacity}")
            for k in self.data:
                self.data[k][:size] = f[k]
            self.size, self.ptr = size, int(f["ptr"]) % self.capacity if size == self.capacity else size


# ---------------------------------------------------------------------------------------------
# Agent
# ---------------------------------------------------------------------------------------------
class Dreamer(nn.Module):
    def __init__(self, args: Args, act_dim: int, discrete: bool):
        super().__init__()
        if args.size not in SIZES:
            raise ValueError(f"unknown --size {args.size!r}; choose from {', '.join(SIZES)}")
        s = SIZES[args.size]
        self.act_dim, self.discrete = act_dim, discrete
        self.encoder = Encoder(s["depth"])
        self.rssm = RSSM(act_dim, self.encoder.out_dim, s["deter"], s["units"], s["stoch"], s["classes"])
        feat = self.rssm.feat_dim
        self.decoder = Decoder(feat, s["depth"])
        self.heads = nn.ModuleDict({name: TwoHotHead(feat, s["units"], s["layers"]) for name in WM_HEADS})
        self.cont = nn.Sequential(mlp(feat, s["units"], s["layers"]), nn.Linear(s["units"], 1))
        self.actor = Actor(feat, act_dim, discrete, s["units"], s["layers"])
        self.scales = critic_scales(args)
        self.critics = nn.ModuleDict({k: TwoHotHead(feat, s["units"], s["layers"]) for k in self.scales})
        self.retnorms = nn.ModuleDict({k: ReturnNorm() for k in self.scales})
        init_weights(self)
        for head in [*self.heads.values(), *self.critics.values()]:
            init_weights(head.out, scale=0.0)  # zero-initialised two-hot outputs
        self.slow_critics = copy.deepcopy(self.critics).requires_grad_(False)
        self.to(memory_format=torch.channels_last)
        self.world_model = nn.ModuleList([self.encoder, self.rssm, self.decoder, self.heads, self.cont])
        opt = optimiser_settings(args)
        betas = (0.9, opt["adam_beta2"])
        self.model_opt = torch.optim.Adam(self.world_model.parameters(), lr=opt["model_lr"], eps=MODEL_EPS, betas=betas)
        self.actor_opt = torch.optim.Adam(self.actor.parameters(), lr=opt["actor_lr"], eps=AC_EPS, betas=betas)
        self.critic_opts = {k: torch.optim.Adam(c.parameters(), lr=opt["critic_lr"], eps=AC_EPS, betas=betas)
                            for k, c in self.critics.items()}

    def optim_state(self):
        return dict(model=self.model_opt.state_dict(), actor=self.actor_opt.state_dict(),
                    critics={k: o.state_dict() for k, o in self.critic_opts.items()})

    def load_optim_state(self, state):
        self.model_opt.load_state_dict(state["model"])
        self.actor_opt.load_state_dict(state["actor"])
        for k, o in self.critic_opts.items():
            o.load_state_dict(state["critics"][k])

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
        """Reward of each imagined transition t -> t+1 for every critic, from the states it arrives at.

        VIPER (part 2) adds `density` (the density head) and `disag` (Plan2Explore ensemble disagreement).
        """
        return {"task": self.heads["reward"](traj["feat"][1:]).mean}

    def world_model_loss(self, batch):
        embed = self.encoder(batch["image"])
        post, prior_logits = self.rssm.observe(embed, batch["action"], batch["is_first"])
        feat = self.rssm.feat(post)
        target = batch["image"].permute(0, 1, 4, 2, 3).float() / 255.0
        err = self.decoder(feat).float() - target
        losses = {"image": (err * err).sum((-3, -2, -1))}  # MSE summed over pixels (x*x: faster than pow)
        for name, field in WM_HEADS.items():
            losses[name] = -self.heads[name](feat).log_prob(batch[field])
        cont_target = 1.0 - batch["is_terminal"].float()
        losses["cont"] = F.binary_cross_entropy_with_logits(self.cont(feat)[..., 0].float(), cont_target, reduction="none")
        post_logits, prior_logits = post["logits"].float(), prior_logits.float()
        dyn = kl_categorical(post_logits.detach(), prior_logits)
        rep = kl_categorical(post_logits, prior_logits.detach())
        losses["dyn"], losses["rep"] = torch.clamp(dyn, min=KL_FREE), torch.clamp(rep, min=KL_FREE)
        scales = {"dyn": KL_DYN, "rep": KL_REP}
        loss = sum(scales.get(k, 1.0) * v.mean() for k, v in losses.items())
        metrics = {f"loss/{k}": v.mean().item() for k, v in losses.items()}
        metrics.update({"world_model/kl": dyn.mean().item(), "world_model/post_entropy":
                        -(post_logits.exp() * post_logits).sum((-2, -1)).mean().item()})
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
            adv = adv + self.scales[k] / total * (ret - value[:-1]) / scale  # offset cancels in the difference
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
        metrics["grad_norm/model"] = step(self.model_opt, model_loss, self.world_model.parameters(), MODEL_CLIP)

        backprop = not self.discrete  # continuous: backprop through dynamics; discrete: REINFORCE
        start = {k: v.detach().flatten(0, 1) for k, v in post.items()}
        start_cont = 1.0 - batch["is_terminal"].flatten().float()
        with frozen(self.world_model, self.critics), autocast:
            traj, dists = self.imagine(start, start_cont, backprop)
            actor_loss, targets, m = self.actor_critic_loss(traj, dists, backprop)
        metrics.update(m)
        metrics["grad_norm/actor"] = step(self.actor_opt, actor_loss, self.actor.parameters(), AC_CLIP)

        traj = {k: v.detach() for k, v in traj.items()}
        for k in self.critics:
            with autocast:
                loss = self.critic_loss(k, traj, targets[k])
            metrics[f"loss/critic_{k}"] = loss.item()
            metrics[f"grad_norm/critic_{k}"] = step(self.critic_opts[k], loss, self.critics[k].parameters(),
                                                    AC_CLIP)
            with torch.no_grad():  # slow critic: EMA of the critic, regularises its targets
                for p, sp in zip(self.critics[k].parameters(), self.slow_critics[k].parameters()):
                    sp.lerp_(p, SLOW_CRITIC_MIX)
        metrics["loss/model"] = model_loss.item()
        return metrics

    @torch.no_grad()
    def open_loop(self, batch, context=5, n=4):
        """Frames [3 rows (truth, model, |error|) x n sequences, T, 64, 64, 3] uint8: the model observes
        `context` frames, then predicts the rest from the replayed actions alone."""
        device = self.rssm.init_deter.device
        b = {k: torch.as_tensor(v[:n], device=device) for k, v in batch.items()}
        post, _ = self.rssm.observe(self.encoder(b["image"][:, :context]), b["action"][:, :context],
                                    b["is_first"][:, :context])
        state, states = {k: v[:, -1] for k, v in post.items()}, []
        for t in range(context, b["image"].shape[1]):
            state = self.rssm.img_step(state, b["action"][:, t])
            states.append(self.rssm.feat(state))
        feat = torch.cat([self.rssm.feat(post), torch.stack(states, 1)], 1)
        model = self.decoder(feat).clamp(0, 1).permute(0, 1, 3, 4, 2)
        truth = b["image"].float() / 255.0
        frames = torch.stack([truth, model, (model - truth).abs()])
        return (frames * 255).to(torch.uint8).cpu().numpy()


def step(opt, loss, params, clip):
    """Backward, clip the global gradient norm, Adam step. Returns the gradient norm before clipping."""
    params = list(params)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    norm = nn.utils.clip_grad_norm_(params, clip)
    opt.step()
    return norm.item()


# ---------------------------------------------------------------------------------------------
# Policy for other scripts (collect_expert_videos.py --policy agent)
# ---------------------------------------------------------------------------------------------
class AgentPolicy:
    """Stateful greedy policy: obs -> env action, keeping the RSSM latent between calls.

    Call `reset()` at each episode start (the env's reset() is also hooked to do it).
    """

    def __init__(self, agent: Dreamer, env, explore=False):
        self.agent, self.env, self.explore, self.carry = agent, env, explore, None

    def reset(self):
        self.carry = None

    def __call__(self, obs):
        action, self.carry = self.agent.policy(obs, self.carry, self.explore)
        return env_action(action, self.agent.discrete)


def env_action(action, discrete):
    return int(action.argmax()) if discrete else action.cpu().numpy().astype(np.float32)


def action_spec(env):
    space = env.action_space
    if isinstance(space, gym.spaces.Discrete):
        return int(space.n), True
    if isinstance(space, gym.spaces.Box) and len(space.shape) == 1:
        return int(space.shape[0]), False
    raise ValueError(f"unsupported action space {space}")


def load_agent_policy(checkpoint_path, env, device="cpu"):
    """Load agent.pt written by this script and return a stateful policy (callable obs -> action, reset())."""
    if not os.path.isfile(checkpoint_path):
        raise FileNotFoundError(f"agent checkpoint {checkpoint_path!r} does not exist")
    ckpt = torch.load(checkpoint_path, map_location=device, weights_only=False)
    args = Args(**ckpt["args"])
    act_dim, discrete = action_spec(env)
    if (act_dim, discrete) != (ckpt["act_dim"], ckpt["discrete"]):
        raise ValueError(f"{checkpoint_path} was trained on {args.env_id} (action dim {ckpt['act_dim']}, "
                         f"discrete={ckpt['discrete']}); this env has action dim {act_dim}, discrete={discrete}")
    agent = Dreamer(args, act_dim, discrete).to(device)
    agent.load_state_dict(ckpt["agent"])
    agent.eval()
    policy = AgentPolicy(agent, env)
    env_reset = env.reset

    def reset(*a, **kw):  # a new episode must start from a fresh latent, even if the caller forgets
        policy.reset()
        return env_reset(*a, **kw)

    env.reset = reset
    return policy


# ---------------------------------------------------------------------------------------------
# Training loop
# ---------------------------------------------------------------------------------------------
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


def save_checkpoint(path, agent, counters, args, act_dim, discrete):
    ckpt = dict(agent=agent.state_dict(), optim=agent.optim_state(), counters=counters, args=asdict(args),
                act_dim=act_dim, discrete=discrete,
                rng=dict(torch=torch.get_rng_state(), numpy=np.random.get_state(), python=random.getstate()))
    tmp = path + ".tmp"
    torch.save(ckpt, tmp)
    os.replace(tmp, path)


def keep_freed_memory():
    """glibc returns every freed block over 32 MB to the OS, so each update re-faults its large
    activations page by page (~30% of CPU time at batch 16 x 64). Keep freed memory in the heap instead."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-4, 0)  # M_MMAP_MAX: serve large blocks from the heap, not fresh mmaps
        libc.mallopt(-1, 2 ** 30)  # M_TRIM_THRESHOLD: do not give back the heap top below 1 GB free
    except (OSError, AttributeError):  # not glibc: nothing to tune
        pass


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
    for name, value in optimiser_settings(args).items():
        if not 0 < value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be in (0, 1), got {value}")
    if args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")
    if args.eval_episodes < 1:
        raise ValueError(f"--eval-episodes must be >= 1, got {args.eval_episodes}")
    if args.resume and not args.output_dir:
        raise ValueError("--resume needs --output-dir of the run to continue")


def main(args: Args):
    validate(args)
    from torch.utils.tensorboard import SummaryWriter

    out = args.output_dir or os.path.join("runs", f"{args.env_id}__dreamer__{args.seed}__{int(time.time())}")
    ckpt_path, replay_path, csv_path = (os.path.join(out, f) for f in ("agent.pt", "replay.npz", "eval.csv"))
    if args.resume and not os.path.isfile(ckpt_path):
        raise FileNotFoundError(f"--resume: no checkpoint at {ckpt_path}")
    os.makedirs(out, exist_ok=True)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.set_num_threads(args.threads)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)

    env, eval_env = make_env(args.env_id, args.seed), make_env(args.env_id, args.seed + 1)
    act_dim, discrete = action_spec(env)
    agent = Dreamer(args, act_dim, discrete).to(device)
    labeler = StepRewards(args)
    replay = Replay(args.replay_capacity, env.observation_space.shape, act_dim, labeler.fields)
    keep_freed_memory()  # after the replay's lazy allocation
    counters = dict(step=0, updates=0, credit=0.0, episodes=0)
    if args.resume:
        ckpt = torch.load(ckpt_path, map_location=device, weights_only=False)
        for key in ["env_id", "size", "reward"]:
            if ckpt["args"][key] != getattr(args, key):
                raise ValueError(f"--resume: checkpoint has --{key.replace('_', '-')} {ckpt['args'][key]!r}, "
                                 f"this command {getattr(args, key)!r}")
        agent.load_state_dict(ckpt["agent"])
        agent.load_optim_state(ckpt["optim"])
        counters = ckpt["counters"]
        torch.set_rng_state(ckpt["rng"]["torch"])
        np.random.set_state(ckpt["rng"]["numpy"])
        random.setstate(ckpt["rng"]["python"])
        rng = np.random.default_rng([args.seed, counters["step"]])
        if os.path.isfile(replay_path):
            replay.load(replay_path)
        else:
            tqdm.write(f"warning: {replay_path} not found; resuming with an empty replay")
        tqdm.write(f"resumed {out} at step {counters['step']} ({counters['updates']} updates, replay {len(replay)})")
    writer = SummaryWriter(out)
    if not args.resume:
        writer.add_text("args", "\n".join(f"{k}: {v}" for k, v in asdict(args).items()))
    if not os.path.isfile(csv_path):
        with open(csv_path, "w") as f:
            f.write("step,return\n")

    def new_episode():
        seed = int(np.random.SeedSequence([args.seed, counters["episodes"]]).generate_state(1)[0] % 2 ** 31)
        obs, _ = env.reset(seed=seed)
        replay.add(image=obs, action=np.zeros(act_dim, np.float32), is_first=True, is_terminal=False,
                   **labeler.reset(obs))
        return obs

    def run_eval():
        rets, frames = evaluate(agent, eval_env, args.eval_episodes, seed=10_000)
        step_ = counters["step"]
        with open(csv_path, "a") as f:
            csv.writer(f).writerow([step_, f"{np.mean(rets):.2f}"])
        writer.add_scalar("eval/return", np.mean(rets), step_)
        writer.add_scalar("eval/return_std", np.std(rets), step_)
        writer.add_image("eval/episode", film_strip(frames), step_, dataformats="HWC")
        save_gif(os.path.join(out, f"eval_{step_}.gif"), frames)
        if len(replay) >= args.batch_length:
            grid = agent.open_loop(replay.sample(4, args.batch_length, rng))  # [3, n, T, H, W, 3]
            rows = [film_strip(grid[r, j, :32], 16) for j in range(grid.shape[1]) for r in range(3)]
            writer.add_image("world_model/open_loop_truth_model_error", np.concatenate(rows, 0), step_,
                             dataformats="HWC")
        return float(np.mean(rets))

    def checkpoint():
        save_checkpoint(ckpt_path, agent, counters, args, act_dim, discrete)
        if args.save_replay:
            replay.save(replay_path)

    obs, carry, ep_ret, ep_len = new_episode(), None, 0.0, 0
    updates_per_step = args.train_ratio / (args.batch_size * args.batch_length)
    last_eval, t_log, step_log, upd_log, metrics = None, time.time(), counters["step"], counters["updates"], {}
    bar = tqdm(total=args.total_steps, initial=counters["step"], desc=f"dreamer {args.env_id}", smoothing=0.05)
    while counters["step"] < args.total_steps:
        if counters["step"] < args.prefill:
            action = (F.one_hot(torch.tensor(rng.integers(act_dim)), act_dim).float() if discrete
                      else torch.as_tensor(rng.uniform(-1, 1, act_dim), dtype=torch.float32))
        else:
            action, carry = agent.policy(obs, carry, explore=True)
        action = action.cpu().numpy()
        obs, r, terminated, truncated, _ = env.step(env_action(torch.as_tensor(action), discrete))
        replay.add(image=obs, action=action, is_first=False, is_terminal=terminated, **labeler(obs, r))
        counters["step"] += 1
        ep_ret, ep_len = ep_ret + r, ep_len + 1
        bar.update(1)
        if terminated or truncated:
            counters["episodes"] += 1
            writer.add_scalar("charts/episodic_return", ep_ret, counters["step"])
            writer.add_scalar("charts/episodic_length", ep_len, counters["step"])
            bar.set_postfix(ret=f"{ep_ret:.1f}", eval=last_eval, upd=counters["updates"])
            obs, carry, ep_ret, ep_len = new_episode(), None, 0.0, 0

        if counters["step"] >= args.prefill and len(replay) >= args.batch_length:
            counters["credit"] += updates_per_step
            while counters["credit"] >= 1.0:
                metrics = agent.train_step(replay.sample(args.batch_size, args.batch_length, rng))
                counters["credit"] -= 1.0
                counters["updates"] += 1

        s = counters["step"]
        if s % args.log_every == 0:
            dt = time.time() - t_log
            writer.add_scalar("charts/SPS", (s - step_log) / dt, s)
            writer.add_scalar("charts/updates_per_second", (counters["updates"] - upd_log) / dt, s)
            writer.add_scalar("charts/train_ratio", counters["updates"] * args.batch_size * args.batch_length /
                              max(1, s - args.prefill), s)
            writer.add_scalar("charts/replay_size", len(replay), s)
            for k, v in metrics.items():
                writer.add_scalar(k, v, s)
            t_log, step_log, upd_log = time.time(), s, counters["updates"]
        if s % args.eval_every == 0 or s == args.total_steps:
            last_eval = f"{run_eval():.1f}"
            bar.set_postfix(ret=f"{ep_ret:.1f}", eval=last_eval, upd=counters["updates"])
        if s % args.save_every == 0 or s == args.total_steps:
            checkpoint()
    bar.close()
    writer.close()
    env.close()
    eval_env.close()
    return agent, counters


if __name__ == "__main__":
    main(tyro.cli(Args))
