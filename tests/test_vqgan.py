"""train_vqgan.py: token shapes, straight-through gradients, learning, save/load, resume, bad inputs, DDP."""
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import train_vqgan as tv
from conftest import interrupt_at_third_clip, make_dataset, vqgan_args


@pytest.mark.parametrize("mult,hw", [((1, 2, 2, 2), 8), ((1, 2, 2), 16)])
def test_encode_decode_shapes_and_chunking(mult, hw):
    torch.manual_seed(0)
    model = tv.VQGAN(64, 8, mult, 1, 16, 8).eval()
    assert model.token_hw == (hw, hw)
    frames = torch.randint(0, 256, (5, 64, 64, 3), dtype=torch.uint8)
    codes = model.encode(frames)
    assert codes.dtype == torch.long and codes.shape == (5, hw, hw)
    assert codes.min() >= 0 and codes.max() < 16
    assert torch.equal(model.encode(frames, chunk_size=2), codes)  # chunking changes nothing
    assert model.encode(frames[:0]).shape == (0, hw, hw)
    out = model.decode(codes)
    assert out.dtype == torch.uint8 and out.shape == (5, 64, 64, 3)
    with torch.inference_mode():
        diff = (model.decode(codes, chunk_size=3).int() - out.int()).abs()
        assert diff.max() <= 1  # batch size may change float rounding, never the picture
    with pytest.raises(ValueError, match="uint8"):
        model.encode(frames.float())


def test_quantizer_picks_most_similar_code():
    q = tv.Quantizer(10, 4)
    z = F.normalize(q.codebook.weight[[3, 7, 7, 0]].detach() + 0.01, dim=-1)  # [4, D] near codes 3,7,7,0
    codes = q(z.T.reshape(1, 4, 2, 2))
    assert codes.flatten().tolist() == [3, 7, 7, 0]


def test_gradients_reach_encoder_through_quantizer():
    torch.manual_seed(0)
    model = tv.VQGAN(64, 8, (1, 2, 2), 1, 16, 8)
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    recon, z, e, codes = model(x)
    (recon - x).abs().mean().backward()  # reconstruction only: codebook gets no gradient
    assert model.encoder[0].weight.grad is not None and model.encoder[0].weight.grad.abs().sum() > 0
    assert model.quantizer.codebook.weight.grad is None or model.quantizer.codebook.weight.grad.abs().sum() == 0


def test_tiny_model_learns_and_checkpoint_round_trips(tmp_path):
    data = make_dataset(tmp_path / "data", tasks=("only",), episodes=1, T=6)
    # train = test here (same frames): we only ask that the loop learns to reconstruct
    shutil.copy(data / "only" / "train" / "000000.npz", data / "only" / "test" / "000000.npz")
    args = vqgan_args(data, tmp_path / "run", total_steps=60, batch_size=6, disc_start=10_000, dead_code_steps=20,
                     learning_rate=3e-3, warmup_steps=5, base_channels=16, codebook_size=64, embed_dim=16)
    frames, task_ids = tv.load_split(str(data), ["only"], "test", 64)
    torch.manual_seed(args.seed)
    untrained = tv.VQGAN(64, 16, args.channel_mult, 1, 64, 16)
    before = tv.evaluate(untrained, frames, task_ids, ["only"])["psnr"]
    res = tv.main(args)
    assert res["psnr"] > before + 8, (before, res["psnr"])
    assert os.path.exists(tmp_path / "run" / "reconstructions.png")

    ckpt = torch.load(tmp_path / "run" / "vqgan.pt", weights_only=False)
    for key in ("kind", "args", "model", "image_size", "token_hw", "codebook_size", "embed_dim", "channel_mult",
                "tasks", "step"):
        assert key in ckpt
    assert ckpt["kind"] == "vqgan" and ckpt["step"] == 60 and tuple(ckpt["token_hw"]) == (8, 8)
    assert ckpt["tasks"] == ["only"] and isinstance(ckpt["args"], dict) and "opt" not in ckpt
    model = tv.load_vqgan(ckpt)
    assert not model.training
    again = tv.evaluate(model, frames, task_ids, ["only"])
    assert again["psnr"] == pytest.approx(res["psnr"], abs=1e-6)  # the saved model is the trained one
    assert torch.equal(model.encode(frames), tv.load_vqgan(ckpt).encode(frames))
    encoder = tv.load_vq_encoder(ckpt)  # the encoder half (what the agent loads): same codes, no decoder weights
    assert torch.equal(encoder.encode(frames), model.encode(frames)) and not encoder.training
    assert set(encoder.state_dict()) == {k for k in ckpt["model"] if not k.startswith("decoder.")}
    with pytest.raises(ValueError, match="not a VQGAN checkpoint"):
        tv.load_vqgan({"kind": "videogpt"})


def test_vqgan_makes_its_modules_in_the_order_encoder_decoder_quantizer():
    """That order fixes a seed's initial weights and the parameter order of saved models and optimisers."""
    model = tv.VQGAN(64, 8, (1, 2), 1, 16, 8)
    assert list(model._modules) == ["encoder", "decoder", "quantizer"]
    assert isinstance(model, tv.VQEncoder) and list(tv.VQEncoder(64, 8, (1, 2), 1, 16, 8)._modules) == [
        "encoder", "quantizer"]


def test_resume_continues_at_saved_step_and_matches_uninterrupted_run(tmp_path):
    data = make_dataset(tmp_path / "data")
    straight = tv.main(vqgan_args(data, tmp_path / "a", total_steps=6))
    tv.main(vqgan_args(data, tmp_path / "b", total_steps=3))
    assert torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=False)["step"] == 3
    resumed = tv.main(vqgan_args(data, tmp_path / "b", total_steps=6, resume=True))
    assert resumed["step"] == 6
    a = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=False)
    b = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=False)
    assert b["step"] == 6
    # --dead-code-steps 1: every code was either picked or restarted in the last step
    assert (b["last_used"] == 5).all()
    for k in a["model"]:  # same batches, optimiser state, GAN and dead-code restarts: same weights
        assert torch.allclose(a["model"][k], b["model"][k], atol=1e-6), k
    assert straight["psnr"] == pytest.approx(resumed["psnr"], abs=1e-3)
    with pytest.raises(FileNotFoundError, match="checkpoint"):
        tv.main(vqgan_args(data, tmp_path / "nothing_here", resume=True))


def test_bad_inputs_give_errors_naming_them(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        tv.find_tasks(str(tmp_path / "missing"), ())
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no task folders"):
        tv.find_tasks(str(tmp_path / "empty"), ())
    data = make_dataset(tmp_path / "data", tasks=("task_a",))
    with pytest.raises(FileNotFoundError, match=r"nope.*available: \['task_a'\]"):
        tv.find_tasks(str(data), ("nope",))
    # a task folder with no episode files: the error says what was searched
    os.makedirs(data / "bare" / "train")
    with pytest.raises(FileNotFoundError, match=r"\*\.npz/\*\.mp4/\*\.avi in .*bare.*train"):
        tv.main(vqgan_args(data, tmp_path / "run", tasks=("bare",)))

    bad = data / "task_a" / "train"
    np.savez(bad / "wrong_shape.npz", video=np.zeros((4, 64, 64), np.uint8))
    with pytest.raises(ValueError, match="wrong_shape.npz.*uint8 \\[T,H,W,3\\]"):
        tv.load_split(str(data), ["task_a"], "train", 64)
    os.remove(bad / "wrong_shape.npz")
    np.savez(bad / "no_video.npz", frames=np.zeros((4, 64, 64, 3), np.uint8))
    with pytest.raises(ValueError, match="no_video.npz"):
        tv.load_split(str(data), ["task_a"], "train", 64)
    os.remove(bad / "no_video.npz")
    (bad / "corrupt.npz").write_bytes(b"not a zip file")
    with pytest.raises(ValueError, match="corrupt.npz"):
        tv.load_split(str(data), ["task_a"], "train", 64)
    os.remove(bad / "corrupt.npz")
    (bad / "broken.mp4").write_bytes(b"\x00" * 100)
    with pytest.raises(ValueError, match="broken.mp4"):
        tv.load_split(str(data), ["task_a"], "train", 64)


def test_reads_avi_and_resizes(tmp_path):
    import cv2

    folder = tmp_path / "data" / "cam" / "train"
    folder.mkdir(parents=True)
    np.savez(folder / "small.npz", video=np.full((3, 32, 32, 3), 200, np.uint8))
    (folder / "partial.tmp.npz").write_bytes(b"interrupted write")  # skipped like collect_expert_videos leaves it
    writer = cv2.VideoWriter(str(folder / "clip.avi"), cv2.VideoWriter_fourcc(*"MJPG"), 10, (48, 40))
    for _ in range(5):
        writer.write(np.full((40, 48, 3), (0, 0, 255), np.uint8))  # pure red in OpenCV's BGR
    writer.release()
    frames, task_ids = tv.load_split(str(tmp_path / "data"), ["cam"], "train", 64)
    assert frames.shape == (8, 64, 64, 3) and frames.dtype == torch.uint8 and (task_ids == 0).all()
    clip = frames[:5].float().mean((0, 1, 2))  # files are read in name order: clip.avi first
    assert clip[0] > 200 and clip[2] < 50  # RGB order
    assert (frames[5:] == 200).all()


def test_perceptual_loss_from_weights_file(tmp_path):
    torch.manual_seed(0)
    vgg = tv.VGGPerceptual.__new__(tv.VGGPerceptual)  # build the layers only, to write a weights file
    torch.nn.Module.__init__(vgg)
    layers, c = [], 3
    for v in tv.VGGPerceptual.CFG:
        layers += [torch.nn.MaxPool2d(2)] if v == "M" else [torch.nn.Conv2d(c, v, 3, padding=1), torch.nn.ReLU()]
        c = c if v == "M" else v
    state = {f"features.{k}": v for k, v in torch.nn.Sequential(*layers).state_dict().items()}
    state["classifier.0.weight"] = torch.zeros(2, 2)  # torchvision files also hold the classifier: ignored
    torch.save(state, tmp_path / "vgg16.pth")
    loss_fn = tv.VGGPerceptual(str(tmp_path / "vgg16.pth"))
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    y = (x + 0.3 * torch.randn_like(x)).requires_grad_(True)
    assert loss_fn(x, x).item() == pytest.approx(0.0, abs=1e-6)
    loss = loss_fn(x, y)
    loss.backward()
    assert loss.item() > 0 and y.grad.abs().sum() > 0
    assert all(p.grad is None for p in loss_fn.parameters())
    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="other.pth.*VGG16"):
        tv.VGGPerceptual(str(tmp_path / "other.pth"))


def test_ddp_two_cpu_processes(tmp_path):
    data = make_dataset(tmp_path / "data")
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           os.path.join(os.path.dirname(tv.__file__), "train_vqgan.py"), "--data-dir", str(data),
           "--output-dir", str(out), "--total-steps", "3", "--batch-size", "2", "--disc-start", "1",
           "--dead-code-steps", "1", "--eval-frames", "8", "--threads", "1", "--no-cuda",
           "--base-channels", "8", "--codebook-size", "32", "--embed-dim", "8"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "2 process(es)" in proc.stdout
    ckpt = torch.load(out / "vqgan.pt", weights_only=False)
    assert ckpt["step"] == 3
    tv.load_vqgan(ckpt)


def test_reusing_an_output_dir_without_resume_is_an_error(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoint.pt").write_bytes(b"an earlier run")
    with pytest.raises(FileExistsError, match=r"run.*add --resume to continue.*another --output-dir"):
        tv.main(vqgan_args(make_dataset(tmp_path / "data"), out, total_steps=1))
    assert os.listdir(out) == ["checkpoint.pt"] and (out / "checkpoint.pt").read_bytes() == b"an earlier run"


def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path):
    # --learning-rate 1e4 diverges within a few steps; --eval-every 1 saves after every step
    data = make_dataset(tmp_path / "data")
    with pytest.raises(FloatingPointError, match=r"diverged at step \d.*lower --learning-rate"):
        tv.main(vqgan_args(data, tmp_path / "run", learning_rate=1e4, total_steps=6, eval_every=1, dead_code_steps=0))
    for name in ("vqgan.pt", "checkpoint.pt"):
        ckpt = torch.load(tmp_path / "run" / name, weights_only=False)
        assert ckpt["step"] < 6 and all(torch.isfinite(v).all() for v in ckpt["model"].values()), name


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])  # Ctrl-C, and `kill` (a scheduler's preemption)
def test_ctrl_c_saves_and_resume_matches_an_uninterrupted_run(tmp_path, monkeypatch, capsys, sig):
    import signal

    data = make_dataset(tmp_path / "data")
    tv.main(vqgan_args(data, tmp_path / "a", total_steps=4))
    interrupt_at_third_clip(monkeypatch, sig)  # steps 0, 1 clip once each; step 2 (first GAN step) is interrupted
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as stop:
        try:
            tv.main(vqgan_args(data, tmp_path / "b", total_steps=4))
        except KeyboardInterrupt:
            pytest.fail("Ctrl-C escaped main() as a traceback, nothing saved")
    assert stop.value.code == 128 + getattr(signal, sig)  # 130, 143: the shell's status for the signal
    assert signal.getsignal(signal.SIGTERM) is before  # the handler is put back
    assert f"interrupted at step 2: saved {tmp_path / 'b' / 'checkpoint.pt'}" in capsys.readouterr().out
    assert torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=False)["step"] == 2
    monkeypatch.undo()
    tv.main(vqgan_args(data, tmp_path / "b", total_steps=4, resume=True))
    a, b = (torch.load(tmp_path / d / "checkpoint.pt", weights_only=False) for d in "ab")
    assert b["step"] == 4
    for k in a["model"]:
        assert torch.allclose(a["model"][k], b["model"][k], atol=1e-6), k


def test_resume_with_another_architecture_names_the_flag(tmp_path):
    data = make_dataset(tmp_path / "data")
    tv.main(vqgan_args(data, tmp_path / "run", total_steps=1))
    with pytest.raises(ValueError, match="--base-channels 8 there, 16 here"):
        tv.main(vqgan_args(data, tmp_path / "run", total_steps=2, resume=True, base_channels=16))
    with pytest.raises(ValueError, match="--mask-top-rows 0 there, 7 here"):  # another mask: other frames
        tv.main(vqgan_args(data, tmp_path / "run", total_steps=2, resume=True, mask_top_rows=7))
    path = tmp_path / "run" / "checkpoint.pt"  # a run from before masks: no --mask-top-rows in its args
    ck = torch.load(path, weights_only=False)
    del ck["args"]["mask_top_rows"]
    torch.save(ck, path)
    assert tv.main(vqgan_args(data, tmp_path / "run", total_steps=2, resume=True))["step"] == 2


# --- the pixel mask (--mask-top-rows): blanks the score digits of Atari frames before tokenising ----------
def test_a_pixel_mask_blanks_its_pixels_before_encoding():
    mask = tv.top_rows_mask(64, 7)
    assert mask.dtype == torch.uint8 and (mask[:7] == 0).all() and (mask[7:] == 1).all()
    assert tv.top_rows_mask(64, 0) is None
    frames = torch.randint(0, 256, (4, 64, 64, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    other = frames.clone()
    other[:, :7] = 255 - other[:, :7]  # differs only in the masked pixels
    blanked = frames.clone()
    blanked[:, :7] = 0
    for cls in (tv.VQGAN, tv.VQEncoder):
        torch.manual_seed(0)
        plain = cls(64, 8, (1, 2, 2), 1, 16, 8).eval()
        torch.manual_seed(0)
        masked = cls(64, 8, (1, 2, 2), 1, 16, 8, mask=mask).eval()  # the mask draws no random numbers
        assert not torch.equal(plain.encode(frames), plain.encode(other))  # without the mask those rows count
        assert torch.equal(masked.encode(frames), masked.encode(other))
        assert torch.equal(masked.encode(frames), plain.encode(blanked))  # masked pixels are set to 0
        assert torch.equal(masked.state_dict()["mask"], mask) and "mask" not in plain.state_dict()
    with pytest.raises(ValueError, match=r"pixel mask is \[64, 64\]"):
        tv.VQEncoder(64, 8, (1, 2, 2), 1, 16, 8, mask=torch.ones(32, 32))
    with pytest.raises(ValueError, match="of 0/1"):
        tv.VQEncoder(64, 8, (1, 2, 2), 1, 16, 8, mask=torch.full((64, 64), 2))
    with pytest.raises(ValueError, match="--mask-top-rows"):
        tv.main(vqgan_args("unused", "unused", mask_top_rows=64))


def _scribble_top_rows(src, dst, rows, seed=0):
    """A copy of the dataset at src whose frames differ from the original only in their top rows (noise)."""
    rng = np.random.default_rng(seed)
    shutil.copytree(src, dst)
    for path in sorted(dst.rglob("*.npz")):
        with np.load(path) as f:
            ep = dict(f)
        ep["video"][:, :rows] = rng.integers(0, 256, ep["video"][:, :rows].shape, dtype=np.uint8)
        np.savez_compressed(path, **ep)
    return dst


def test_training_with_a_mask_never_sees_the_masked_pixels_and_vqgan_pt_keeps_the_mask(tmp_path):
    """Inputs, reconstruction targets, discriminator and held-out PSNR all see masked frames: two datasets that
    differ only under the mask train identical models (GAN steps included); vqgan.pt carries the mask."""
    data = make_dataset(tmp_path / "data")
    other = _scribble_top_rows(data, tmp_path / "other", rows=7)
    a = tv.main(vqgan_args(data, tmp_path / "a", mask_top_rows=7))
    b = tv.main(vqgan_args(other, tmp_path / "b", mask_top_rows=7))
    ca, cb = (torch.load(tmp_path / d / "vqgan.pt", weights_only=True) for d in "ab")
    assert list(ca["model"]) == list(cb["model"])
    for k in ca["model"]:
        assert torch.equal(ca["model"][k], cb["model"][k]), k
    assert a["psnr"] == b["psnr"]
    assert torch.equal(ca["model"]["mask"], tv.top_rows_mask(64, 7)) and ca["args"]["mask_top_rows"] == 7
    assert torch.equal(tv.load_vq_encoder(ca).mask, tv.top_rows_mask(64, 7))
    tv.main(vqgan_args(data, tmp_path / "c"))  # the default: no mask, no mask entry
    assert "mask" not in torch.load(tmp_path / "c" / "vqgan.pt", weights_only=True)["model"]


def test_the_mask_travels_through_videogpt_pt_to_the_agent_and_eval(tmp_path):
    """vqgan.pt -> train_videogpt.py -> videogpt.pt -> every loader of a reward model applies the training mask."""
    import train_videogpt
    import train_viper_dreamer

    data = make_dataset(tmp_path / "data", T=10)
    tv.main(vqgan_args(data, tmp_path / "vq", mask_top_rows=7))
    train_videogpt.main(train_videogpt.Args(
        vqgan=str(tmp_path / "vq" / "vqgan.pt"), data_dir=str(data), output_dir=str(tmp_path / "gpt"), seq_len=3,
        width=32, num_layers=2, num_heads=4, mlp_dim=64, batch_size=4, total_steps=2, warmup_steps=1, eval_every=2,
        eval_clips=4, sample_every=1000, cuda=False, threads=1))
    ckpt = torch.load(tmp_path / "gpt" / "videogpt.pt", weights_only=True)
    assert torch.equal(ckpt["vqgan"]["model"]["mask"], tv.top_rows_mask(64, 7))
    video = torch.from_numpy(np.load(data / "task_a" / "test" / "000000.npz")["video"])[None]
    other = video.clone()
    other[..., :7, :, :] = 255 - other[..., :7, :, :]  # differs only under the mask
    loaders = (train_videogpt.load_videogpt, train_videogpt.load_videogpt_with_decoder,  # eval.py uses these
               train_viper_dreamer.load_videogpt)  # the agent's reward
    for load in loaders:
        rm = load(ckpt)
        assert torch.equal(rm.vqgan.mask, tv.top_rows_mask(64, 7))
        assert torch.equal(rm.compute_rewards(video), rm.compute_rewards(other))


def test_a_checkpoint_from_before_masks_loads_unmasked():
    """vqgan.pt files written before masks existed hold no `mask` entry: every loader reads them, without a mask."""
    import train_videogpt
    import train_viper_dreamer

    torch.manual_seed(0)
    model = tv.VQGAN(64, 8, (1, 2, 2), 1, 16, 8).eval()
    old = {"kind": "vqgan", "args": {"base_channels": 8, "num_res_blocks": 1}, "model": model.state_dict(),
           "image_size": 64, "token_hw": model.token_hw, "codebook_size": 16, "embed_dim": 8, "channel_mult": [1, 2, 2]}
    frames = torch.randint(0, 256, (3, 64, 64, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    codes = model.encode(frames)
    for script in (tv, train_videogpt, train_viper_dreamer):
        encoder = script.load_vq_encoder(old)
        assert encoder.mask is None and torch.equal(encoder.encode(frames), codes)
    for script in (tv, train_videogpt):
        assert script.load_vqgan(old).mask is None and torch.equal(script.load_vqgan(old).encode(frames), codes)
