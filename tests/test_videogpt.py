"""train_videogpt.py: the transformer, the VIPER reward, sampling, checkpoints and a smoke run."""
import json
import os

import numpy as np
import pytest
import torch

import train_videogpt as tv
from conftest import interrupt_at_third_clip, small_frames

H, W = 3, 2  # tiny token grid
VOCAB = 11




def tiny_model(seq_len=4, num_classes=0, seed=0):
    torch.manual_seed(seed)
    return tv.VideoGPT(VOCAB, seq_len, (H, W), width=32, num_layers=2, num_heads=4, mlp_dim=64, dropout=0.1,
                       num_classes=num_classes).eval()


def random_codes(*shape, seed=1):
    return torch.randint(VOCAB, shape, generator=torch.Generator().manual_seed(seed))


def test_causality():
    m = tiny_model(num_classes=2)
    codes = random_codes(2, 4, H, W)
    labels = torch.tensor([0, 1])
    p = 13  # change token 13 (flattened); logits 0..13 must not move, later ones must
    other = codes.clone().flatten(1)
    other[:, p] = (other[:, p] + 1) % VOCAB
    other = other.view_as(codes)
    with torch.no_grad():
        a, b = m(codes, labels), m(other, labels)
    assert torch.equal(a[:, :p + 1], b[:, :p + 1])
    assert (a[:, p + 1:] - b[:, p + 1:]).abs().amax() > 1e-4


def test_last_frame_only_equals_the_full_forward():
    """The reward's shortcut: the last block and the output layer run for the scored frame's tokens only."""
    m = tiny_model(4, num_classes=2).eval()
    codes, labels = random_codes(3, 4, H, W), torch.tensor([0, 1, 1])
    with torch.no_grad():
        full = m(codes, labels)
        torch.testing.assert_close(m(codes, labels, queries=H * W), full[:, -H * W:], atol=1e-5, rtol=1e-5)
        for n in (1, 2, 4):  # the first steps' windows hold fewer frames
            torch.testing.assert_close(m.last_frame_log_prob(codes[:, :n], labels),
                                       m.frame_log_probs(codes[:, :n], labels)[:, -1], atol=1e-4, rtol=1e-5)


def naive_rewards(model, codes, label, seq_len, skip, mode):
    """One window at a time, built by hand from the definition."""
    B, T = codes.shape[:2]
    out = torch.zeros(B, T)
    for b in range(B):
        for t in range(T):
            frames = [t - j * skip for j in range(seq_len) if t - j * skip >= 0][::-1]
            with torch.no_grad():
                logp = model.frame_log_probs(codes[b:b + 1, frames], label)[0]
            out[b, t] = logp[-1] if mode == "conditional" else logp.sum()
    return out


@pytest.mark.parametrize("skip", [1, 2])
@pytest.mark.parametrize("mode", ["conditional", "joint"])
def test_rewards_match_naive_window_loop(skip, mode):
    L, T = 4, 9  # T > (L-1)*skip + 1, so first steps and full windows are both covered
    m = tiny_model(L, num_classes=2)
    rm = tv.RewardModel(m, torch.nn.Identity(), L, skip, {"a": 0, "b": 1}, max_tokens=5 * L * H * W)  # several passes
    codes = random_codes(2, T, H, W)
    r = rm.rewards_from_codes(codes, "b", mode)
    ref = naive_rewards(m, codes, torch.tensor([1]), L, skip, mode)
    assert r.shape == (2, T)
    torch.testing.assert_close(r, ref, atol=1e-4, rtol=1e-5)
    # first_step scores the tail only, with the earlier frames as context
    torch.testing.assert_close(rm.rewards_from_codes(codes, "b", mode, first_step=6), ref[:, 6:], atol=1e-4, rtol=1e-5)
    if mode == "conditional":  # step 0 is log p(x_0) alone; joint of a 1-frame window is the same number
        torch.testing.assert_close(r[:, 0], rm.rewards_from_codes(codes, "b", "joint")[:, 0])


@pytest.mark.parametrize("mode", ["conditional", "joint"])
def test_bf16_rewards_stay_near_fp32(mode):
    """RewardModel(bf16=True) (the agent's --reward-precision bf16): the transformer's matmuls run in bf16,
    which moves each reward by a small fraction of a nat; the rewards still come back as fp32."""
    m = tiny_model(4, num_classes=2)
    codes = random_codes(2, 9, H, W)
    r32 = tv.RewardModel(m, torch.nn.Identity(), 4, 2, {"a": 0, "b": 1}).rewards_from_codes(codes, "b", mode)
    r16 = tv.RewardModel(m, torch.nn.Identity(), 4, 2, {"a": 0, "b": 1}, bf16=True).rewards_from_codes(codes, "b", mode)
    assert r16.dtype == torch.float32 and r16.shape == r32.shape
    assert not torch.equal(r16, r32)  # bf16 really ran
    assert (r16 - r32).abs().max() < 0.05


def test_class_conditioning_and_unknown_task():
    m = tiny_model(num_classes=2)
    with torch.no_grad():  # a trained model would rely on it; an untrained one must at least see it
        m.class_emb.weight.normal_(0, 1.0)
    rm = tv.RewardModel(m, torch.nn.Identity(), 4, 1, {"dmc_a": 0, "dmc_b": 1})
    codes = random_codes(1, 6, H, W)
    ra, rb = rm.rewards_from_codes(codes, "dmc_a"), rm.rewards_from_codes(codes, "dmc_b")
    assert (ra - rb).abs().amax() > 1e-3
    with pytest.raises(ValueError, match=r"dmc_c.*\['dmc_a', 'dmc_b'\]"):
        rm.rewards_from_codes(codes, "dmc_c")
    with pytest.raises(ValueError, match="reward mode"):
        rm.rewards_from_codes(codes, "dmc_a", mode="bogus")


def test_sample_shapes_and_kv_cache_equals_full_recompute():
    m = tiny_model(seq_len=4, num_classes=2)
    context = random_codes(3, 1, H, W)
    labels = torch.tensor([0, 1, 1])
    with torch.no_grad():
        s = tv.sample_codes(m, context, 2, temperature=1.0, labels=labels, generator=torch.Generator().manual_seed(0))
        assert s.shape == (3, 3, H, W) and s.dtype == torch.long
        assert torch.equal(s[:, :1], context) and s.min() >= 0 and s.max() < VOCAB
        greedy = tv.sample_codes(m, context, 3, temperature=0.0, labels=labels)
        # reference: no cache, full forward over the sequence so far, argmax of the next token
        seq = context.flatten(1)
        for _ in range(3 * H * W):
            padded = torch.cat([seq, torch.zeros(3, 4 * H * W - seq.shape[1], dtype=torch.long)], 1)
            logits = m(padded.view(3, 4, H, W), labels)
            seq = torch.cat([seq, logits[:, seq.shape[1]].argmax(-1, keepdim=True)], 1)
    assert torch.equal(greedy, seq.view(3, 4, H, W))
    with pytest.raises(ValueError, match="exceed"):
        tv.sample_codes(m, context, 4)


# ---------------------------------------------------------------------------------------------------------
# With a real (tiny) VQ-GAN checkpoint made by train_vqgan.py, and synthetic episodes (the workdir fixture).
def vqgan_ckpt(workdir):
    return torch.load(os.path.join(workdir, "vq", "vqgan.pt"), map_location="cpu", weights_only=False)


def test_inline_vqgan_copy_matches_train_vqgan(workdir):
    import train_vqgan

    ckpt = vqgan_ckpt(workdir)
    frames = torch.from_numpy(np.load(os.path.join(workdir, "data", "dmc_a", "test", "000.npz"))["video"])
    frames = torch.nn.functional.interpolate(frames.permute(0, 3, 1, 2).float(), size=16).round().byte().permute(0, 2, 3, 1)
    ours, theirs = tv.load_vqgan(ckpt, "cpu").encode(frames), train_vqgan.load_vqgan(ckpt, "cpu").encode(frames)
    assert ours.shape == (12, 4, 4) and torch.equal(ours, theirs)
    encoder = tv.load_vq_encoder(ckpt, "cpu")  # the encoder half alone gives the same codes
    assert torch.equal(encoder.encode(frames), ours) and not hasattr(encoder, "decoder")


def test_checkpoint_save_load_gives_identical_rewards(workdir, tmp_path):
    ckpt = vqgan_ckpt(workdir)
    args = tv.Args(seq_len=3, frame_skip=2, width=32, num_layers=2, num_heads=4, mlp_dim=64, class_cond=True)
    torch.manual_seed(0)
    model = tv.VideoGPT(16, 3, (4, 4), 32, 2, 4, 64, 0.1, num_classes=2)
    class_map = {"dmc_a": 0, "dmc_b": 1}
    before = tv.RewardModel(model, tv.load_vqgan(ckpt, "cpu"), 3, 2, class_map)
    path = str(tmp_path / "videogpt.pt")
    tv.atomic_save(tv.make_checkpoint(args, model, class_map, (4, 4), ckpt, step=7), path)
    loaded = tv.load_videogpt(torch.load(path), "cpu")  # plain types only: loads with weights_only=True
    frames = torch.cat([small_frames(workdir, "dmc_a"), small_frames(workdir, "dmc_b")])
    for mode in ("conditional", "joint"):
        r = before.compute_rewards(frames, "dmc_b", mode)
        assert r.shape == (2, 12) and torch.isfinite(r).all()
        assert torch.equal(r, loaded.compute_rewards(frames, "dmc_b", mode))
    assert (loaded.seq_len, loaded.frame_skip, loaded.class_map) == (3, 2, class_map)
    with pytest.raises(ValueError, match="uint8"):
        loaded.compute_rewards(frames.float(), "dmc_a")
    with pytest.raises(ValueError, match="not a videogpt"):
        tv.load_videogpt(ckpt)


def test_training_smoke_resume_and_report(workdir, capsys):
    out = os.path.join(workdir, "run")
    common = dict(vqgan=os.path.join(workdir, "vq", "vqgan.pt"), data_dir=os.path.join(workdir, "data"),
                  random_data_dir=os.path.join(workdir, "random"), output_dir=out, class_cond=True, seq_len=3,
                  frame_skip=2, width=32, num_layers=2, num_heads=4, mlp_dim=64, batch_size=8, warmup_steps=5,
                  learning_rate=3e-3, eval_every=10, eval_clips=16, sample_every=20, keep_every=20, cuda=False)
    tv.main(tv.Args(total_steps=20, **common))
    ckpt = torch.load(os.path.join(out, "videogpt.pt"))
    assert ckpt["kind"] == "videogpt" and ckpt["step"] == 20 and ckpt["class_map"] == {"dmc_a": 0, "dmc_b": 1}
    assert (ckpt["seq_len"], ckpt["frame_skip"], tuple(ckpt["token_hw"])) == (3, 2, (4, 4))
    assert ckpt["vqgan"]["kind"] == "vqgan" and "opt" not in ckpt["vqgan"]
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(out))
    text = capsys.readouterr().out
    assert "held-out NLL per token" in text and "unigram entropy" in text and "AUROC" in text
    assert "7 train / 2 test episodes" in text  # dmc_b/train has 3 npz + 1 mp4
    report = json.load(open(os.path.join(out, "results.json")))
    lo, hi = round(report["dmc_a/random_reward"]), round(report["dmc_a/expert_reward"])
    assert (f"--density-bounds {lo} {hi}" in text) == (lo < hi)  # the agent's bounds, from this model's own check

    tv.main(tv.Args(total_steps=30, resume=True, **common))  # continues at step 20 from the cached tokens
    text = capsys.readouterr().out
    assert "resumed" in text and "at step 20" in text and "tokenising episodes" not in text
    ckpt = torch.load(os.path.join(out, "videogpt.pt"))
    assert ckpt["step"] == 30
    # --keep-every 20: the copy at step 20 is the step-20 model, and no copy was made at 10 or 30
    assert sorted(f for f in os.listdir(out) if f.startswith("videogpt_step")) == ["videogpt_step20.pt"]
    kept = torch.load(os.path.join(out, "videogpt_step20.pt"))
    assert kept["step"] == 20 and any(not torch.equal(v, ckpt["model"][k]) for k, v in kept["model"].items())
    rm = tv.load_videogpt(ckpt)
    assert not hasattr(rm.vqgan, "decoder")  # scoring loads the encoder half of the VQ-GAN
    sampler = tv.load_videogpt_with_decoder(ckpt)
    video = tv.sample_video(sampler, small_frames(workdir, "dmc_a")[:, :1], 2, temperature=1.0, task="dmc_a")
    assert video.shape == (1, 3, 16, 16, 3) and video.dtype == torch.uint8
    frames = small_frames(workdir, "dmc_a")
    assert torch.equal(sampler.compute_rewards(frames, "dmc_a"), rm.compute_rewards(frames, "dmc_a"))
    with pytest.raises(ValueError, match=r"known tasks: \['dmc_a', 'dmc_b'\]"):
        rm.compute_rewards(small_frames(workdir, "dmc_a"), "dmc_cartpole_swingup")


def test_bad_inputs(workdir, tmp_path):
    vq = os.path.join(workdir, "vq", "vqgan.pt")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        tv.main(tv.Args(vqgan=vq, data_dir=str(tmp_path / "nope"), output_dir=str(tmp_path / "o"), cuda=False))
    with pytest.raises(FileNotFoundError, match="vqgan"):
        tv.main(tv.Args(vqgan=str(tmp_path / "missing.pt"), data_dir=workdir, output_dir=str(tmp_path / "o"), cuda=False))
    with pytest.raises(FileNotFoundError, match=r"\['dmc_zzz'\] not found"):
        tv.main(tv.Args(vqgan=vq, data_dir=os.path.join(workdir, "data"), tasks=["dmc_zzz"], output_dir=str(tmp_path / "o"),
                        cuda=False))
    bad = tmp_path / "bad" / "dmc_a" / "train"
    bad.mkdir(parents=True)
    np.savez(bad / "x.npz", video=np.zeros((5, 64, 64), np.uint8))
    with pytest.raises(ValueError, match="x.npz"):
        tv.main(tv.Args(vqgan=vq, data_dir=str(tmp_path / "bad"), output_dir=str(tmp_path / "o"), cuda=False))


def test_tiny_model_learns_frame_dynamics():
    """Each frame is the previous one shifted by one token: predictable only from the past frame, so a
    working model (shift, positions, attention) gets far below the unigram entropy (~log 11 nats)."""
    torch.manual_seed(0)
    m = tv.VideoGPT(VOCAB, 3, (H, W), width=48, num_layers=2, num_heads=4, mlp_dim=96, dropout=0.0).train()
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)

    def batch(n):
        first = torch.randint(VOCAB, (n, 1, H * W))
        frames = [first.roll(t, dims=-1) for t in range(3)]
        return torch.cat(frames, 1).view(n, 3, H, W)

    for _ in range(150):
        codes = batch(32)
        loss = torch.nn.functional.cross_entropy(m(codes).flatten(0, 1), codes.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    codes = batch(64)
    with torch.no_grad():
        logp = m.eval().frame_log_probs(codes)  # [64, 3]
    # frame 0 is random (log 11 per token); frames 1, 2 are determined by frame 0
    assert (-logp[:, 1:].mean() / (H * W)) < 0.2 < np.log(VOCAB) - 0.5


def test_ddp_two_cpu_processes(workdir, tmp_path):
    import subprocess
    import sys

    out = str(tmp_path / "ddp")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", os.path.join(tv.__file__),
           "--vqgan", os.path.join(workdir, "vq", "vqgan.pt"), "--data-dir", os.path.join(workdir, "data"),
           "--class-cond", "--seq-len", "3", "--width", "32", "--num-layers", "2", "--num-heads", "4",
           "--mlp-dim", "64", "--batch-size", "8", "--total-steps", "6", "--eval-every", "3", "--eval-clips", "8",
           "--sample-every", "6", "--output-dir", out, "--no-cuda"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert torch.load(os.path.join(out, "videogpt.pt"))["step"] == 6


# ---------------------------------------------------------------------------------------------------------
# Reliability: reused folders, NaN, the tokenizer behind the codes, bad flags, Ctrl-C, changed architecture.
def tiny_args(workdir, out, **kw):
    base = dict(vqgan=os.path.join(workdir, "vq", "vqgan.pt"), data_dir=os.path.join(workdir, "data"),
                output_dir=str(out), seq_len=3, frame_skip=2, width=32, num_layers=2, num_heads=4, mlp_dim=64,
                batch_size=8, warmup_steps=1, learning_rate=3e-3, total_steps=2, eval_every=1000, eval_clips=8,
                sample_every=1000, cuda=False)
    base.update(kw)
    return tv.Args(**base)


def test_reusing_an_output_dir_without_resume_is_an_error(workdir, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "videogpt_resume.pt").write_bytes(b"an earlier run")
    with pytest.raises(FileExistsError, match=r"run.*add --resume to continue.*another --output-dir"):
        tv.main(tiny_args(workdir, out))
    assert os.listdir(out) == ["videogpt_resume.pt"]  # nothing written: no token cache, no logs


def test_nan_loss_stops_the_run_and_a_nan_tokenizer_is_refused(workdir, tmp_path):
    out = tmp_path / "run"  # --learning-rate 1e4 diverges; --eval-every 1 saves after every step
    with pytest.raises(FloatingPointError, match=r"diverged at step \d.*lower --learning-rate"):
        tv.main(tiny_args(workdir, out, learning_rate=1e4, total_steps=20, eval_every=1))
    ckpt = torch.load(out / "videogpt.pt")
    assert ckpt["step"] < 20 and all(torch.isfinite(v).all() for v in ckpt["model"].values())
    vq = vqgan_ckpt(workdir)
    next(iter(vq["model"].values())).fill_(float("nan"))
    torch.save(vq, tmp_path / "nan_vqgan.pt")
    with pytest.raises(ValueError, match=r"nan_vqgan.pt.*non-finite"):
        tv.main(tiny_args(workdir, tmp_path / "run2", vqgan=str(tmp_path / "nan_vqgan.pt")))


def test_checkpoint_records_tasks_and_tokenizer_and_resume_refuses_another(workdir, tmp_path):
    out = tmp_path / "run"
    tv.main(tiny_args(workdir, out))  # unconditional: no class map, but the tasks are recorded
    ckpt = torch.load(out / "videogpt.pt")
    assert ckpt["class_map"] is None and ckpt["tasks"] == ["dmc_a", "dmc_b"]
    assert ckpt["vqgan_hash"] == tv.weights_hash(vqgan_ckpt(workdir)["model"])
    other = vqgan_ckpt(workdir)  # same architecture, other weights (a retrained tokenizer)
    next(iter(other["model"].values())).add_(0.01)
    torch.save(other, tmp_path / "other_vqgan.pt")
    with pytest.raises(ValueError, match=r"videogpt_resume.pt.*vq/vqgan.pt.*other_vqgan.pt"):
        tv.main(tiny_args(workdir, out, vqgan=str(tmp_path / "other_vqgan.pt"), total_steps=3, resume=True))
    # files written before these keys existed still load and resume
    tv.load_videogpt({k: v for k, v in ckpt.items() if k not in ("tasks", "vqgan_hash")})
    state = torch.load(out / "videogpt_resume.pt", weights_only=False)
    torch.save({k: v for k, v in state.items() if k not in ("args", "tasks", "vqgan_hash")}, out / "videogpt_resume.pt")
    tv.main(tiny_args(workdir, out, total_steps=3, resume=True))
    assert torch.load(out / "videogpt.pt")["step"] == 3


@pytest.mark.parametrize("flag", ["total_steps", "batch_size", "eval_every", "frame_skip", "seq_len"])
def test_bad_flags_name_the_flag(workdir, tmp_path, flag):
    with pytest.raises(ValueError, match=f"--{flag.replace('_', '-')} 0"):
        tv.main(tiny_args(workdir, tmp_path / "run", **{flag: 0}))
    assert not os.path.exists(tmp_path / "run")


def test_keep_every_must_fall_on_a_checkpoint_step(workdir, tmp_path):
    with pytest.raises(ValueError, match="--keep-every 15: must be 0 or a multiple of --eval-every 10"):
        tv.main(tiny_args(workdir, tmp_path / "run", eval_every=10, keep_every=15))
    assert not os.path.exists(tmp_path / "run")


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])  # Ctrl-C, and `kill` (a scheduler's preemption)
def test_ctrl_c_saves_and_exits_with_how_to_resume(workdir, tmp_path, monkeypatch, capsys, sig):
    import signal

    interrupt_at_third_clip(monkeypatch, sig)  # clipped once per step: steps 1, 2 finish, step 3 is interrupted
    out = tmp_path / "run"
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as stop:
        try:
            tv.main(tiny_args(workdir, out, total_steps=4))
        except KeyboardInterrupt:
            pytest.fail("Ctrl-C escaped main() as a traceback, nothing saved")
    assert stop.value.code == 128 + getattr(signal, sig)  # 130, 143: the shell's status for the signal
    assert signal.getsignal(signal.SIGTERM) is before  # the handler is put back
    assert f"interrupted at step 2: saved {out / 'videogpt_resume.pt'}" in capsys.readouterr().out
    assert torch.load(out / "videogpt_resume.pt", weights_only=False)["step"] == 2
    assert torch.load(out / "videogpt.pt")["step"] == 2


def test_resume_with_another_architecture_names_the_flag(workdir, tmp_path):
    tv.main(tiny_args(workdir, tmp_path / "run", total_steps=1))
    with pytest.raises(ValueError, match="--width 32 there, 64 here"):
        tv.main(tiny_args(workdir, tmp_path / "run", total_steps=2, resume=True, width=64))


def test_short_test_episodes_and_random_bytes_are_named(tmp_path):
    import train_vqgan

    with pytest.raises(ValueError, match="no test/ episode has the 7 frames .*longest: 5"):
        tv.ClipSampler([torch.zeros(5, 2, 2, dtype=torch.long)], [0], 4, 2, split="test")
    junk = tmp_path / "junk.npz"
    junk.write_bytes(os.urandom(3000))
    for read in (tv.read_video, train_vqgan.read_video):
        with pytest.raises(ValueError, match="junk.npz.*not a numpy .npz archive"):
            read(str(junk), 64)
