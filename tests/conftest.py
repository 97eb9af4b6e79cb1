"""Shared test setup and the helpers more than one test module uses (import them with `from conftest import ...`;
fixtures here reach every module by themselves)."""
import os
import sys

import pytest
import torch

os.environ.setdefault("MUJOCO_GL", "egl")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import gymnasium as gym  # noqa: E402
import numpy as np  # noqa: E402

import train_videogpt  # noqa: E402
import train_viper_dreamer  # noqa: E402
import train_vqgan  # noqa: E402


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """Tiny models run fastest, and reproducibly, on one thread; two OpenMP threads on the shared
    2-core machine stall each other at every small op."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def interrupt_at_third_clip(monkeypatch, sig):
    """Ctrl-C (SIGINT: a KeyboardInterrupt, what Python makes of it; a background job ignores a real SIGINT)
    or `kill` (a real SIGTERM) at the third clip_grad_norm_ call of a training script: inside an optimiser step,
    so the test sees what an interrupt in the middle of training saves."""
    import signal

    clip, calls = torch.nn.utils.clip_grad_norm_, []

    def clip_then_interrupt(*a, **kw):
        calls.append(1)
        if len(calls) == 3:
            if sig == "SIGINT":
                raise KeyboardInterrupt
            os.kill(os.getpid(), signal.SIGTERM)
        return clip(*a, **kw)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clip_then_interrupt)


# --- VQ-GAN: a small synthetic dataset and tiny train_vqgan.py flags -------------------------------------
TINY = dict(base_channels=8, channel_mult=(1, 2, 2, 2), num_res_blocks=1, codebook_size=32, embed_dim=8)


def synthetic_video(rng, T=8, size=64):
    """Coloured rectangles on a gradient: simple enough for a tiny model to learn quickly."""
    y, x = np.mgrid[:size, :size]
    frames = []
    for _ in range(T):
        img = np.stack([x * 2, y * 2, np.full_like(x, 90)], -1).astype(np.float64)
        for _ in range(2):
            x0, y0 = rng.integers(0, size - 24, 2)
            img[y0:y0 + 20, x0:x0 + 20] = rng.integers(0, 256, 3)
        frames.append(img)
    return np.clip(frames, 0, 255).astype(np.uint8)


def make_dataset(root, tasks=("task_a", "task_b"), episodes=2, T=8, seed=0):
    """root/<task>/{train,test}/*.npz of synthetic_video episodes (`episodes` train, 1 test per task); returns root."""
    rng = np.random.default_rng(seed)
    for task in tasks:
        for split, n in (("train", episodes), ("test", 1)):
            os.makedirs(root / task / split, exist_ok=True)
            for i in range(n):
                np.savez_compressed(root / task / split / f"{i:06d}.npz", video=synthetic_video(rng, T),
                                    reward=np.zeros(T, np.float32))
    return root


def vqgan_args(data_dir, out_dir, **kw):
    """train_vqgan.Args for a TINY model and a few CPU steps; keyword arguments override."""
    base = dict(data_dir=str(data_dir), output_dir=str(out_dir), batch_size=4, total_steps=4, learning_rate=1e-3,
                warmup_steps=1, disc_start=2, dead_code_steps=1, eval_every=1000, eval_frames=16, log_every=1,
                cuda=False, seed=3, threads=1, **TINY)
    base.update(kw)
    return train_vqgan.Args(**base)


# --- VideoGPT: expert-like episodes and a tiny VQ-GAN trained on them ------------------------------------
def make_episodes(root, tasks, splits, T=12, moving=True, seed=0):
    """A white square on black: per task it moves right or down (expert-like); `moving=False` jumps at random."""
    rng = np.random.default_rng(seed)
    for ti, task in enumerate(tasks):
        for split, n in splits.items():
            os.makedirs(os.path.join(root, task, split), exist_ok=True)
            for e in range(n):
                v = np.zeros((T, 64, 64, 3), np.uint8)
                x, y = rng.integers(0, 48, 2)
                for t in range(T):
                    if moving:
                        x, y = (x + 4 * (ti == 0)) % 48, (y + 4 * (ti == 1)) % 48
                    else:
                        x, y = rng.integers(0, 48, 2)
                    v[t, y:y + 16, x:x + 16] = 255
                np.savez_compressed(os.path.join(root, task, split, f"{e:03d}.npz"), video=v)


def write_mp4(path, video):
    """Writes uint8 RGB frames [T, H, W, 3] as an mp4 file."""
    import cv2

    writer = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*"mp4v"), 10, video.shape[1:3][::-1])
    for frame in video:
        writer.write(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
    writer.release()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A folder with data/ (tasks dmc_a, dmc_b; one user mp4), random/ (jumping squares) and vq/vqgan.pt (16px)."""
    root = str(tmp_path_factory.mktemp("videogpt"))
    make_episodes(os.path.join(root, "data"), ["dmc_a", "dmc_b"], {"train": 3, "test": 1})
    write_mp4(os.path.join(root, "data", "dmc_b", "train", "user_video.mp4"),  # users may bring their own videos
              np.load(os.path.join(root, "data", "dmc_b", "train", "000.npz"))["video"])
    make_episodes(os.path.join(root, "random"), ["dmc_a", "dmc_b"], {"train": 1, "test": 1}, moving=False, seed=5)
    train_vqgan.main(train_vqgan.Args(
        data_dir=os.path.join(root, "data"), image_size=16, base_channels=8, channel_mult=(1, 2, 2), codebook_size=16,
        embed_dim=8, total_steps=2, batch_size=4, warmup_steps=1, eval_every=2, disc_start=1000, cuda=False,
        output_dir=os.path.join(root, "vq")))
    return root


def small_frames(workdir, task, split="test", name="000.npz"):
    """One workdir episode read at 16px as a batch of one: [1, T, 16, 16, 3] uint8."""
    video = train_videogpt.read_video(os.path.join(workdir, "data", task, split, name), 16)
    return torch.from_numpy(video)[None]  # [1, T, 16, 16, 3]


# --- VIPER agent: a tiny random-weight video model and short end-to-end runs -----------------------------
TASK = "dmc_cartpole_balance"
EPISODE = 50  # the end-to-end runs cut DMC episodes to this many steps


def make_videogpt(path, seq_len=3, frame_skip=2, seed=0):
    """A tiny random-weight videogpt.pt in the format train_videogpt.py writes (VQ-GAN 64px -> 4x4 codes)."""
    tv = train_videogpt
    torch.manual_seed(seed)
    vq = tv.VQGAN(64, 8, (1, 1, 1, 1, 1), 1, 16, 8)
    vq_ckpt = {"kind": "vqgan", "args": {"base_channels": 8, "num_res_blocks": 1}, "model": vq.state_dict(),
               "image_size": 64, "token_hw": vq.token_hw, "codebook_size": 16, "embed_dim": 8,
               "channel_mult": [1, 1, 1, 1, 1]}
    args = tv.Args(seq_len=seq_len, frame_skip=frame_skip, width=32, num_layers=2, num_heads=4, mlp_dim=64,
                   class_cond=True)
    model = tv.VideoGPT(16, seq_len, vq.token_hw, 32, 2, 4, 64, 0.1, num_classes=2)
    class_map = {TASK: 0, "dmc_reacher_easy": 1}
    torch.save(tv.make_checkpoint(args, model, class_map, vq.token_hw, vq_ckpt, step=0), path)
    return str(path)


def frames(T, seed):
    """A white square wandering over noise: varied codes."""
    rng = np.random.default_rng(seed)
    video = rng.integers(0, 60, (T, 64, 64, 3), dtype=np.uint8)
    for t, (x, y) in enumerate(rng.integers(0, 48, (T, 2))):
        video[t, y:y + 16, x:x + 16] = 255
    return video


def viper_args(tmp, model, **kw):
    """train_viper_dreamer.Args for a 200-step CPU run on TASK with --reward viper; keyword arguments override."""
    td = train_viper_dreamer
    base = dict(env_id=TASK, reward="viper", reward_model=model, size="cpu", total_steps=200, prefill=64,
                batch_size=4, batch_length=16, train_ratio=8.0, eval_every=200, eval_episodes=1, save_every=200,
                log_every=100, replay_capacity=1000, output_dir=str(tmp), seed=0)
    base.update(kw)
    return td.Args(**{**td.preset(base["size"], base["reward"]), **base})


class ShortEpisodes(gym.Wrapper):
    """Cuts episodes to EPISODE steps (several episodes in a short run); optionally replaces the env reward."""

    def __init__(self, env, poison=None):
        super().__init__(env)
        self.poison, self.t = poison, 0

    def reset(self, **kw):
        self.t = 0
        return self.env.reset(**kw)

    def step(self, action):
        obs, r, terminated, truncated, info = self.env.step(action)
        self.t += 1
        r = r if self.poison is None else self.poison
        return obs, r, terminated, truncated or self.t >= EPISODE, info


def run_agent(out, model, poison=None, **kw):
    """main() on short episodes, counting every call of the video model's scorer and the steps it scores."""
    td = train_viper_dreamer
    calls = []
    score = td.RewardModel.rewards_from_codes
    make_env = td.make_env

    def counted(self, codes, *a, **k):
        r = score(self, codes, *a, **k)
        calls.append(r.shape[1])
        return r

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(td.RewardModel, "rewards_from_codes", counted)
        mp.setattr(td, "make_env", lambda env_id, seed=0: ShortEpisodes(make_env(env_id, seed), poison))
        agent, counters = td.main(viper_args(out, model, **kw))
    return agent, counters, calls
