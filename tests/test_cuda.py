"""The CUDA code paths (bf16 autocast, device moves, GPU checkpoints used on a CPU). Skipped without a GPU;
on one: `python -m pytest -q tests/test_cuda.py`."""
import os

import numpy as np
import pytest
import torch

import train_videogpt as tv
import train_viper_dreamer as td
import train_vqgan
from conftest import TASK, make_dataset, make_videogpt, run_agent, small_frames, vqgan_args

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_vqgan_trains_on_cuda_and_its_checkpoint_encodes_the_same_on_cpu(tmp_path):
    data = make_dataset(tmp_path / "data", tasks=("only",))
    res = train_vqgan.main(vqgan_args(data, tmp_path / "run", total_steps=20, disc_start=10, cuda=True))
    assert np.isfinite(res["psnr"])
    ckpt = torch.load(tmp_path / "run" / "vqgan.pt", map_location="cpu", weights_only=False)
    frames, _ = train_vqgan.load_split(str(data), ["only"], "test", 64)
    on_cpu = train_vqgan.load_vqgan(ckpt, "cpu").encode(frames)
    on_gpu = train_vqgan.load_vqgan(ckpt, "cuda").encode(frames.cuda()).cpu()
    assert (on_cpu == on_gpu).float().mean() > 0.99  # fp32 on both; rare ties may flip a code


def test_videogpt_trains_on_cuda_and_scores_like_cpu(workdir, tmp_path):
    out = str(tmp_path / "run")
    tv.main(tv.Args(vqgan=os.path.join(workdir, "vq", "vqgan.pt"), data_dir=os.path.join(workdir, "data"),
                    output_dir=out, class_cond=True, seq_len=3, frame_skip=2, width=32, num_layers=2,
                    num_heads=4, mlp_dim=64, batch_size=8, warmup_steps=5, learning_rate=3e-3, total_steps=10,
                    eval_every=10, eval_clips=16, sample_every=10, cuda=True))
    ckpt = torch.load(os.path.join(out, "videogpt.pt"), map_location="cpu")
    frames = small_frames(workdir, "dmc_b")
    r_cpu = tv.load_videogpt(ckpt, "cpu").compute_rewards(frames, "dmc_b")
    r_gpu = tv.load_videogpt(ckpt, "cuda").compute_rewards(frames.cuda(), "dmc_b").cpu()
    assert torch.isfinite(r_gpu).all()
    torch.testing.assert_close(r_gpu, r_cpu, atol=1e-2, rtol=1e-3)


@pytest.mark.parametrize("reward", ["task", "viper"])
def test_agent_trains_on_cuda_and_its_checkpoint_acts_on_cpu(tmp_path, reward):
    model = make_videogpt(tmp_path / "videogpt.pt")
    # VIPER with the ensemble (off by default): its bf16 disagreement once gave NaN actions on a GPU
    kw = dict(baseline_grad=False) if reward == "task" else dict(disagreement_scale=1.0)
    agent, counters, _ = run_agent(tmp_path / "run", model, cuda=True, reward=reward,
                                   reward_model=model if reward == "viper" else None, **kw)
    assert counters["updates"] > 0
    assert all(p.is_cuda and torch.isfinite(p).all() for p in agent.parameters())
    with open(tmp_path / "run" / "eval.csv") as f:
        assert np.isfinite(float(f.read().splitlines()[-1].split(",")[1]))
    env = td.make_env(TASK)  # the env run_agent() trained on
    policy = td.load_agent_policy(str(tmp_path / "run" / "agent.pt"), env, "cpu")
    obs, _ = env.reset(seed=0)
    for _ in range(5):
        action = policy(obs)
        assert action.shape == env.action_space.shape and np.all(np.abs(action) <= 1)
        obs, *_ = env.step(action)
