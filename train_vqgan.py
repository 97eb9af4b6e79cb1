"""Train the VQ-GAN video tokenizer of VIPER (stage 1 of the pipeline).

VIPER's reward model is an autoregressive video transformer over *discrete tokens*; this
script learns the tokenizer. Every 64x64 frame is encoded by a convolutional encoder into an
h x w grid of vectors, each vector is replaced by its nearest entry of a learned codebook
(vector quantisation), and a mirrored decoder reconstructs the frame from those codebook
entries. The code indices are the tokens the next stage (train_videogpt.py) models.

Model (taming-transformers VQ-GAN, as in the official VIPER code): ResBlocks with GroupNorm
and swish, stride-2 convolutions down, nearest-neighbour upsampling + convolution up, one
self-attention block in the middle of the encoder and of the decoder. One ResBlock per level, a
codebook of 256 entries of dimension 64, discriminator weight 0.1. `--size` picks one of two recipes
(PRESETS, below Args; a flag given explicitly overrides its preset value):
  * `cpu` (the default, measured on 2 CPU cores; `bash run.sh full` trains it): base width 16,
    `--channel-mult 1 2 4 4` (8x8 tokens from 64x64 frames), batch 16, lr 1e-3 with 100 warm-up steps,
    2,000 steps with the discriminator from step 1,200;
  * `paper` (VIPER's DMC settings): base width 128, `--channel-mult 1 2 2 2` (8x8 tokens), batch 128,
    lr 1e-4 with 1000 warm-up steps, 100k steps (VIPER's DMC config: 1M) with the discriminator from 10k.
The reconstruction loss is the one deliberate change from VIPER (below). `--size paper --channel-mult
1 2 2 --codebook-size 1024` is the Atari setting (16x16 tokens).

Losses:
  reconstruction: L2 by default. VIPER uses L1 next to a pretrained perceptual (LPIPS) loss;
    without the perceptual loss an L1 model left the thin reacher arm out of its
    reconstructions in our CPU runs, while L2 (whose large errors dominate) drew it.
    `--rec-loss l1` restores VIPER's choice.
  + codebook loss ||sg[z] - e||^2 + beta * commitment loss ||z - sg[e]||^2 (beta = 0.25),
    with the straight-through estimator carrying decoder gradients into the encoder
  + adversarial loss from a patch discriminator (non-saturating GAN loss, R1 penalty on real
    frames), switched on at `--disc-start`
  + optional perceptual loss (LPIPS-style distance of VGG16 features): off by default, because
    pretrained VGG weights cannot be downloaded here; turn it on with `--perceptual-weights`.

Codebook usage. Two things keep many codes alive (held-out usage is a measured target):
  * l2-normalised lookup (ViT-VQGAN): encoder outputs and codebook entries are unit vectors and
    the nearest code is the one with the largest cosine similarity, so no code can sit far
    away from all encoder outputs;
  * dead-code restarts: a code that no frame of any training batch picked for
    `--dead-code-steps` steps is re-initialised to an encoder output of the current batch,
    drawn with probability proportional to its distance from its current code (k-means++
    style), so that the new codes go to the patterns the codebook represents worst.

Score mask (`--mask-top-rows N`, default none): the top N pixel rows of every frame are blanked (set to
black) before tokenising. On Atari they hold the score digits, which VIPER masks (its paper reports that it
helps): a video model that sees the score spends its likelihood on digits, not on play. The mask blanks the
training frames, so the model's inputs and its reconstruction targets alike, and the held-out frames that PSNR
and the image grid compare with. It is the `mask` buffer of the model's state dict in vqgan.pt (uint8 [H, W],
1 = keep, 0 = blank; absent when there is none, as in older files), and `encode` multiplies it into every frame:
train_videogpt.py (whose videogpt.pt embeds vqgan.pt), eval.py and the agent's reward all tokenise frames with
exactly the training mask. Pong: `--mask-top-rows 7` (the digits fill rows 0-6 of a 64x64 frame; the wall
below them is static).

Data: `<data-dir>/<task>/{train,test}/*.npz` (key `video`, uint8 [T,H,W,3]; made by
collect_expert_videos.py) and `*.mp4` / `*.avi` files in the same folders, read with OpenCV.
Frames are resized to `--image-size`. The test split is held out: PSNR and codebook usage are
measured on it, and a grid of originals (top) and reconstructions (bottom) is written to
`<output-dir>/reconstructions.png`.

Output: `<output-dir>/vqgan.pt`, a plain dict read by `load_vqgan` (the whole model; copied into
train_videogpt.py) and `load_vq_encoder` (the encoder half, all that scoring frames needs; copied into both
later stages), and `<output-dir>/checkpoint.pt` with the optimiser and RNG state for `--resume`. An output
dir that holds a checkpoint.pt is only reused with `--resume`; Ctrl-C or `kill` saves both files and exits; a
non-finite (NaN/inf) loss stops the run before it reaches the weights or a checkpoint.

Examples:
    python train_vqgan.py --data-dir data/experts --threads 1      # cpu recipe, ~25 min on one core
    python train_vqgan.py --data-dir data/experts --size paper     # VIPER's DMC size (GPU)
    torchrun --nproc_per_node 4 train_vqgan.py --data-dir data/experts --size paper   # DistributedDataParallel
"""

import argparse
import gc
import math
import os
import random
import signal
import sys
import time
from dataclasses import dataclass
from typing import Literal, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import tyro
from tqdm import tqdm


@dataclass
class Args:
    size: Literal["cpu", "paper"] = "cpu"
    """recipe whose values (PRESETS) are the defaults of the flags below: cpu (measured on 2 CPU cores) or paper
    (VIPER's DMC settings); `--size paper --help` shows its values"""
    data_dir: str = "data/experts"
    """folder holding <task>/{train,test}/ episode files (*.npz with key `video`, *.mp4, *.avi)"""
    tasks: Tuple[str, ...] = ()
    """task folders of --data-dir to train on (default: every folder that has train/ or test/)"""
    image_size: int = 64
    """frames are resized to image-size x image-size"""
    mask_top_rows: int = 0
    """blank (set to black) the top N pixel rows of every frame before tokenising: Atari score digits (Pong: 7 at
    64x64). The mask is stored in vqgan.pt, so the video model and the VIPER reward apply the same one; 0: no mask"""
    base_channels: int = 16
    """width of the first encoder level"""
    channel_mult: Tuple[int, ...] = (1, 2, 4, 4)
    """width multiplier per resolution level; L levels downsample 2^(L-1)x (4 levels: 8x8 tokens from 64x64)"""
    num_res_blocks: int = 1
    """ResBlocks per encoder level (the decoder has one more), VIPER DMC: 1"""
    codebook_size: int = 256
    """number of codebook entries, i.e. token vocabulary (VIPER DMC: 256, Atari: 1024)"""
    embed_dim: int = 64
    """dimension of a codebook entry"""
    rec_loss: Literal["l1", "l2"] = "l2"
    """reconstruction loss: l2 (keeps thin details without a perceptual loss) or l1 (VIPER's)"""
    beta: float = 0.25
    """commitment loss weight"""
    dead_code_steps: int = 50
    """re-initialise a code that no training batch used for this many steps (0: never)"""
    disc_start: int = 1200
    """step at which the adversarial loss and discriminator training start"""
    disc_weight: float = 0.1
    """weight of the generator's adversarial loss"""
    disc_channels: int = 32
    """width of the first discriminator layer"""
    r1_gamma: float = 1.0
    """R1 penalty weight: gamma/2 * E||grad_x D(x_real)||^2"""
    perceptual_weights: Optional[str] = None
    """torchvision-format VGG16 state dict file (keys features.N.*); turns the perceptual loss on"""
    perceptual_weight: float = 0.1
    """weight of the perceptual loss (only with --perceptual-weights)"""
    total_steps: int = 2000
    """optimiser updates to train for"""
    batch_size: int = 16
    """frames per update and process (under torchrun the global batch is this x processes)"""
    learning_rate: float = 1e-3
    """peak learning rate of both AdamW optimisers"""
    warmup_steps: int = 100
    """linear learning-rate warm-up from 0"""
    weight_decay: float = 1e-4
    """AdamW weight decay"""
    grad_clip: float = 1.0
    """clip the global gradient norm of each model to this"""
    eval_every: int = 1000
    """measure held-out PSNR / codebook usage, write the image grid and checkpoints every N steps"""
    eval_frames: int = 2048
    """held-out frames used for evaluation (evenly spaced over the test split)"""
    log_every: int = 50
    """write training losses to tensorboard every N steps"""
    seed: int = 1
    """seed of the weights and of the batch sampling"""
    cuda: bool = True
    """use CUDA when available (bf16 autocast there; fp32 on CPU)"""
    threads: int = 0
    """torch CPU threads per process (0: torch's default, which follows OMP_NUM_THREADS)"""
    output_dir: Optional[str] = None
    """where checkpoints, tensorboard logs and images go (default: runs/<run_name>)"""
    resume: bool = False
    """continue from <output-dir>/checkpoint.pt (model, optimisers, step, RNG)"""


# The two recipes (--size): only the flags that differ. Args' own defaults are the cpu recipe.
PRESETS = {
    "cpu": dict(base_channels=16, channel_mult=(1, 2, 4, 4), disc_channels=32, dead_code_steps=50, batch_size=16,
                learning_rate=1e-3, warmup_steps=100, total_steps=2000, disc_start=1200),
    "paper": dict(base_channels=128, channel_mult=(1, 2, 2, 2), disc_channels=64, dead_code_steps=100, batch_size=128,
                  learning_rate=1e-4, warmup_steps=1000, total_steps=100_000, disc_start=10_000),
}


def parse_args(argv=None) -> Args:
    """tyro.cli with the --size recipe as the defaults: --help prints its values, explicit flags override them."""
    peek = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    peek.add_argument("--size", default="cpu")
    size = peek.parse_known_args(sys.argv[1:] if argv is None else argv)[0].size
    size = size if size in PRESETS else "cpu"  # tyro names the bad value
    return tyro.cli(Args, default=Args(size=size, **PRESETS[size]), args=argv)


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


# ==== VQGAN_DECODER: copied verbatim from train_vqgan.py into train_videogpt.py; tests/test_parity.py keeps the copies identical ====
class Decoder(nn.Sequential):
    def __init__(self, ch, ch_mult, num_res_blocks, embed_dim):
        c = ch * ch_mult[-1]
        layers = [nn.Conv2d(embed_dim, c, 3, padding=1), ResBlock(c, c), AttnBlock(c), ResBlock(c, c)]
        for i in reversed(range(len(ch_mult))):
            for _ in range(num_res_blocks + 1):
                layers.append(ResBlock(c, ch * ch_mult[i]))
                c = ch * ch_mult[i]
            if i > 0:
                layers += [nn.Upsample(scale_factor=2.0, mode="nearest"), nn.Conv2d(c, c, 3, padding=1)]
        layers += [vq_norm(c), nn.SiLU(), nn.Conv2d(c, 3, 3, padding=1)]
        super().__init__(*layers)


class VQGAN(VQEncoder):
    """The whole VQ-GAN: VQEncoder's frames -> codes, plus codes -> codebook vectors -> decoder -> frames."""

    def __init__(self, image_size=64, base_channels=128, channel_mult=(1, 2, 2, 2), num_res_blocks=1,
                 codebook_size=256, embed_dim=64, mask=None):
        nn.Module.__init__(self)  # not VQEncoder.__init__: the decoder is made between the encoder and the
        # quantizer, the order that fixes a seed's initial weights and the parameter order of every checkpoint
        self.encoder = Encoder(base_channels, channel_mult, num_res_blocks, embed_dim)
        self.decoder = Decoder(base_channels, channel_mult, num_res_blocks, embed_dim)
        self.quantizer = Quantizer(codebook_size, embed_dim)
        self.image_size, self.codebook_size = image_size, codebook_size
        self.token_hw = (image_size // 2 ** (len(channel_mult) - 1),) * 2
        self.register_buffer("mask", pixel_mask(mask, image_size))

    def lookup(self, codes):  # long [B,h,w] -> unit codebook vectors [B,D,h,w]
        return F.normalize(self.quantizer.codebook(codes), dim=-1).permute(0, 3, 1, 2)

    def forward(self, x):
        """x float [B,3,H,W] in [-1,1] -> (reconstruction, z, codebook vectors e, codes)."""
        z = F.normalize(self.encoder(x), dim=1)
        codes = self.quantizer(z)
        e = self.lookup(codes)
        return self.decoder(z + (e - z).detach()), z, e, codes  # straight-through estimator

    @torch.inference_mode()
    def decode(self, codes, chunk_size=256):
        """codes long [N,h,w] -> frames uint8 [N,H,W,3], on the model's device."""
        device = self.quantizer.codebook.weight.device
        out = [torch.zeros(0, self.image_size, self.image_size, 3, dtype=torch.uint8, device=device)]
        for i in range(0, len(codes), chunk_size):
            x = self.decoder(self.lookup(codes[i:i + chunk_size].to(device)))
            out.append(((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1))
        return torch.cat(out)


def load_vqgan(ckpt, device="cpu"):
    """Rebuild a trained VQGAN (eval mode) from the dict saved as vqgan.pt by train_vqgan.py."""
    model = VQGAN(*vq_config(ckpt), mask=ckpt["model"].get("mask"))  # checkpoints before masks have none
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval()
# ==== END VQGAN_DECODER ====


# ---------------------------------------------------------------------------------------------
# Data and checkpoint files
# ---------------------------------------------------------------------------------------------
# ==== FILES: copied verbatim from train_vqgan.py into train_videogpt.py; tests/test_parity.py keeps the copies identical ====
VIDEO_EXTENSIONS = (".npz", ".mp4", ".avi")


def read_video(path: str, image_size: int) -> np.ndarray:
    """One episode file -> uint8 [T, image_size, image_size, 3] RGB; errors name the file."""
    import cv2

    if path.endswith(".npz"):
        try:
            with np.load(path) as f:
                video = f["video"]
        except Exception as e:  # corrupt zip, missing key, pickled object ...
            if "pickled" in str(e):  # np.load's guess for a file that is neither .npz nor .npy
                raise ValueError(f"cannot read 'video' from {path}: not a numpy .npz archive (corrupt or another "
                                 f"format)") from e
            raise ValueError(f"cannot read 'video' from {path}: {type(e).__name__}: {e}") from e
    else:
        cap, frames = cv2.VideoCapture(path), []
        while True:
            ok, frame = cap.read()
            if not ok:
                break
            frames.append(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB))
        cap.release()
        if not frames:
            raise ValueError(f"OpenCV could not decode any frame of {path}")
        video = np.stack(frames)
    if video.dtype != np.uint8 or video.ndim != 4 or video.shape[-1] != 3 or len(video) == 0:
        raise ValueError(f"{path}: expected video uint8 [T,H,W,3] with T > 0, got {video.dtype} {video.shape}")
    if video.shape[1:3] != (image_size, image_size):
        video = np.stack([cv2.resize(f, (image_size, image_size), interpolation=cv2.INTER_AREA) for f in video])
    return video


def atomic_save(obj, path: str):
    tmp = path + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def sigterm_as_interrupt(signum, frame):
    """SIGTERM handler (`kill`, a batch scheduler's preemption): stop as Ctrl-C does, so the run saves where it is;
    the signal number rides along for the exit status."""
    raise KeyboardInterrupt(signum)


def interrupt_exit_status(stop: KeyboardInterrupt) -> int:
    """128 + the number of the signal that stopped the run (Ctrl-C: 130, SIGTERM: 143), the shell's status as if
    the signal had ended the process, so a calling script stops too. A bare KeyboardInterrupt counts as Ctrl-C."""
    return 128 + (stop.args[0] if stop.args and isinstance(stop.args[0], int) else signal.SIGINT)


def check_finite(step: int, **values):
    """Stop at the first NaN/inf loss or gradient norm, before the optimiser step: one such update turns
    every weight into NaN, and the next save would write them over the last good checkpoint."""
    bad = {k: v.item() for k, v in values.items() if not math.isfinite(v.item())}  # 0-d tensors
    if bad:
        raise FloatingPointError(f"training diverged at step {step}: {bad}. Nothing of this step was saved (the "
                                 f"last checkpoint is kept); try a lower --learning-rate")
# ==== END FILES ====


# not train_videogpt.list_tasks on purpose: no class labels here, so --tasks keep their order (batches follow it)
def top_rows_mask(image_size: int, rows: int):
    """--mask-top-rows: None for 0 rows, else uint8 [H, W], 0 on the top `rows` rows (blanked), 1 below (kept)."""
    if rows == 0:
        return None
    mask = torch.ones(image_size, image_size, dtype=torch.uint8)
    mask[:rows] = 0
    return mask


def find_tasks(data_dir: str, tasks) -> list:
    if not os.path.isdir(data_dir):
        raise FileNotFoundError(f"data dir {data_dir!r} does not exist")
    found = sorted(t for t in os.listdir(data_dir) if os.path.isdir(os.path.join(data_dir, t, "train"))
                   or os.path.isdir(os.path.join(data_dir, t, "test")))
    missing = [t for t in tasks if t not in found]
    if missing:
        raise FileNotFoundError(f"task folder(s) {missing} not found in {data_dir!r} (with train/ or test/); "
                                f"available: {found}")
    if not found:
        raise FileNotFoundError(f"no task folders with train/ or test/ subfolders in {data_dir!r}")
    return list(tasks) or found


def load_split(data_dir: str, tasks, split: str, image_size: int):
    """All frames of one split -> (uint8 tensor [N,H,W,3], task index per frame [N])."""
    frames, task_ids = [], []
    for i, task in enumerate(tasks):
        folder = os.path.join(data_dir, task, split)
        files = sorted(f for f in os.listdir(folder) if f.endswith(VIDEO_EXTENSIONS) and not f.endswith(".tmp.npz")) \
            if os.path.isdir(folder) else []
        for f in files:
            video = read_video(os.path.join(folder, f), image_size)
            frames.append(video)
            task_ids.append(np.full(len(video), i))
    if not frames:
        return torch.zeros(0, image_size, image_size, 3, dtype=torch.uint8), np.zeros(0, int)
    return torch.from_numpy(np.concatenate(frames)), np.concatenate(task_ids)


# ---------------------------------------------------------------------------------------------
# Discriminator and perceptual loss (training only)
# ---------------------------------------------------------------------------------------------
class PatchDiscriminator(nn.Sequential):
    """PatchGAN: a logit per overlapping patch (8x8 logits for 64x64 frames)."""

    def __init__(self, ch: int):
        super().__init__(
            nn.Conv2d(3, ch, 4, 2, 1), nn.LeakyReLU(0.2),
            nn.Conv2d(ch, 2 * ch, 4, 2, 1), vq_norm(2 * ch), nn.LeakyReLU(0.2),
            nn.Conv2d(2 * ch, 4 * ch, 4, 2, 1), vq_norm(4 * ch), nn.LeakyReLU(0.2),
            nn.Conv2d(4 * ch, 1, 3, 1, 1),
        )


class VGGPerceptual(nn.Module):
    """LPIPS-style distance with unit layer weights: squared differences of channel-normalised
    VGG16 activations (relu1_2, relu2_2, relu3_3, relu4_3, relu5_3), summed over layers."""

    CFG = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512]
    TAPS = (3, 8, 15, 22, 29)  # indices of those ReLUs in torchvision's vgg16().features

    def __init__(self, weights_path: str):
        super().__init__()
        layers, c = [], 3
        for v in self.CFG:
            layers += [nn.MaxPool2d(2)] if v == "M" else [nn.Conv2d(c, v, 3, padding=1), nn.ReLU()]
            c = c if v == "M" else v
        self.features = nn.Sequential(*layers)
        try:
            state = torch.load(weights_path, map_location="cpu", weights_only=True)
            state = {k[len("features."):]: v for k, v in state.items() if k.startswith("features.")}
            self.features.load_state_dict(state)
        except Exception as e:
            raise ValueError(f"--perceptual-weights {weights_path!r} is not a torchvision VGG16 state dict "
                             f"(keys features.N.weight/bias): {type(e).__name__}: {e}") from e
        self.requires_grad_(False).eval()
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1))

    def forward(self, x, y):  # images in [-1, 1]
        h = torch.cat([x, y])
        h = ((h + 1) / 2 - self.mean) / self.std
        loss = 0.0
        for i, layer in enumerate(self.features[: self.TAPS[-1] + 1]):
            h = layer(h)
            if i in self.TAPS:
                a, b = F.normalize(h, dim=1, eps=1e-10).chunk(2)
                loss = loss + (a - b).pow(2).sum(1).mean()
        return loss


# ---------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------
def evaluate(model: VQGAN, frames: torch.Tensor, task_ids: np.ndarray, tasks) -> dict:
    """Held-out PSNR (mean over frames, uint8 round trip), per task, and codebook usage."""
    was_training = model.training
    model.eval()
    codes = model.encode(frames)
    recon = model.decode(codes).cpu()
    model.train(was_training)
    mse = (recon.float() - frames.float()).pow(2).mean((1, 2, 3)).clamp_min(1e-3)
    psnr = (10 * torch.log10(255.0 ** 2 / mse)).numpy()
    counts = torch.bincount(codes.flatten().cpu(), minlength=model.codebook_size).double()
    p = counts / counts.sum()
    out = {"psnr": float(psnr.mean()), "usage": float((counts > 0).double().mean()),
           "perplexity": float(torch.exp(-(p * torch.log(p + 1e-12)).sum())), "recon": recon}
    for i, t in enumerate(tasks):
        if (task_ids == i).any():
            out[f"psnr/{t}"] = float(psnr[task_ids == i].mean())
    return out


def image_grid(originals: torch.Tensor, recons: torch.Tensor, task_ids: np.ndarray, n: int = 8) -> np.ndarray:
    """About n frames, evenly spaced within each task: originals in the top row, reconstructions below."""
    per_task = max(1, n // len(np.unique(task_ids)))
    idx = np.concatenate([np.flatnonzero(task_ids == t)[np.linspace(0, (task_ids == t).sum() - 1, per_task).astype(int)]
                          for t in np.unique(task_ids)])
    return np.concatenate([np.concatenate(list(originals[idx].numpy()), 1),
                           np.concatenate(list(recons[idx].numpy()), 1)], 0)


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------
def main(args: Args) -> dict:
    import cv2
    from torch.nn.parallel import DistributedDataParallel as DDP
    from torch.utils.tensorboard import SummaryWriter

    # ---- processes, devices
    distributed = "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1
    use_cuda = args.cuda and torch.cuda.is_available()
    rank, world = 0, 1
    if distributed:
        dist.init_process_group("nccl" if use_cuda else "gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if args.resume and not args.output_dir:
        raise ValueError("--resume needs --output-dir of the run to continue")
    if not args.channel_mult or args.image_size % 2 ** (len(args.channel_mult) - 1):
        raise ValueError(f"--image-size {args.image_size} must be divisible by 2^(len(--channel-mult) - 1)")
    if min(args.batch_size, args.total_steps, args.warmup_steps, args.eval_every, args.log_every,
           args.eval_frames, args.codebook_size) < 1:
        raise ValueError("--batch-size, --total-steps, --warmup-steps, --eval-every, --log-every, --eval-frames "
                         "and --codebook-size must be >= 1")
    if not 0 <= args.mask_top_rows < args.image_size:
        raise ValueError(f"--mask-top-rows must be in [0, {args.image_size}) (--image-size), got {args.mask_top_rows}")
    output_dir = args.output_dir or os.path.join("runs", f"vqgan__{args.seed}__{int(time.time())}")
    ckpt_path = os.path.join(output_dir, "checkpoint.pt")
    if args.resume and not os.path.exists(ckpt_path):
        raise FileNotFoundError(f"--resume: no checkpoint at {ckpt_path}")
    if not args.resume and os.path.exists(ckpt_path):  # checked before anything is written
        raise FileExistsError(f"--output-dir {output_dir!r} already holds a run (checkpoint.pt): add --resume to "
                              f"continue it, or choose another --output-dir (a new run here would overwrite it)")
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)

    # ---- data
    tasks = find_tasks(args.data_dir, args.tasks)
    train_frames, _ = load_split(args.data_dir, tasks, "train", args.image_size)
    test_frames, test_tasks = load_split(args.data_dir, tasks, "test", args.image_size)
    searched = f"*.npz/*.mp4/*.avi in {args.data_dir}/{{{','.join(tasks)}}}/train"
    if len(train_frames) == 0:
        raise FileNotFoundError(f"no training frames: found no {searched}")
    if len(test_frames) == 0:  # still evaluate, but say that the numbers are not held out
        print(f"warning: no test/ episodes for {tasks}; PSNR and usage are measured on training frames")
        test_frames, test_tasks = load_split(args.data_dir, tasks, "train", args.image_size)
    keep = np.linspace(0, len(test_frames) - 1, min(args.eval_frames, len(test_frames))).astype(int)
    test_frames, test_tasks = test_frames[keep], test_tasks[keep]
    # the mask blanks the same pixels of the model's inputs and of its reconstruction targets (the frames
    # themselves), and of the held-out frames that PSNR and the image grid compare with; VQGAN.encode applies it too
    mask = top_rows_mask(args.image_size, args.mask_top_rows)
    train_frames, test_frames = apply_mask(train_frames, mask), apply_mask(test_frames, mask)

    # ---- models and optimisers
    vqgan = VQGAN(args.image_size, args.base_channels, args.channel_mult, args.num_res_blocks,
                  args.codebook_size, args.embed_dim, mask).to(device)
    disc = PatchDiscriminator(args.disc_channels).to(device)
    perceptual = VGGPerceptual(args.perceptual_weights).to(device) if args.perceptual_weights else None
    model = DDP(vqgan, device_ids=[device.index] if use_cuda else None) if distributed else vqgan
    opt = torch.optim.AdamW(vqgan.parameters(), lr=args.learning_rate, betas=(0.9, 0.99), weight_decay=args.weight_decay)
    d_opt = torch.optim.AdamW(disc.parameters(), lr=args.learning_rate, betas=(0.9, 0.99), weight_decay=args.weight_decay)
    last_used = torch.zeros(args.codebook_size, dtype=torch.long, device=device)  # step a code was last picked
    start_step = 0
    if args.resume:
        ck = torch.load(ckpt_path, map_location=device, weights_only=False)
        # another architecture would fail below with a bare tensor size mismatch: name the flags instead
        changed = [f"--{k.replace('_', '-')} {ck['args'][k]} there, {getattr(args, k)} here" for k in
                   ("image_size", "base_channels", "channel_mult", "num_res_blocks", "codebook_size", "embed_dim",
                    "disc_channels") if ck["args"][k] != getattr(args, k)]
        if ck["args"].get("mask_top_rows", 0) != args.mask_top_rows:  # runs from before masks have none
            changed.append(f"--mask-top-rows {ck['args'].get('mask_top_rows', 0)} there, {args.mask_top_rows} here")
        if changed:
            raise ValueError(f"--resume: {ckpt_path} has another architecture or mask ({'; '.join(changed)}): "
                             f"resume with "
                             f"its flags, or choose another --output-dir for a new run")
        vqgan.load_state_dict(ck["model"])
        disc.load_state_dict(ck["disc"])
        opt.load_state_dict(ck["opt"])
        d_opt.load_state_dict(ck["d_opt"])
        last_used.copy_(ck["last_used"])
        torch.set_rng_state(ck["torch_rng"])
        start_step = ck["step"]
        if rank == 0:
            print(f"resuming from {ckpt_path} at step {start_step}")

    writer = None
    if rank == 0:
        os.makedirs(output_dir, exist_ok=True)
        writer = SummaryWriter(output_dir)
        writer.add_text("args", "\n".join(f"{k}: {v}" for k, v in vars(args).items()))
        n_params = sum(p.numel() for p in vqgan.parameters())
        print(f"tasks {tasks}: {len(train_frames)} train / {len(test_frames)} held-out frames; "
              f"VQGAN {n_params / 1e6:.2f}M params, tokens {vqgan.token_hw}, codebook {args.codebook_size}; "
              f"{world} process(es) on {device}" + (f"; top {args.mask_top_rows} pixel rows masked" if mask is not None
                                                    else ""))

    def save(step):
        if rank != 0:
            return
        meta = {"kind": "vqgan", "args": dict(vars(args)), "model": vqgan.state_dict(), "image_size": args.image_size,
                "token_hw": vqgan.token_hw, "codebook_size": args.codebook_size, "embed_dim": args.embed_dim,
                "channel_mult": list(args.channel_mult), "tasks": tasks, "step": step}
        atomic_save(meta, os.path.join(output_dir, "vqgan.pt"))
        atomic_save({**meta, "disc": disc.state_dict(), "opt": opt.state_dict(), "d_opt": d_opt.state_dict(),
                     "last_used": last_used, "torch_rng": torch.get_rng_state()}, ckpt_path)

    def run_eval(step):
        if rank != 0:
            return None
        ev = evaluate(vqgan, test_frames, test_tasks, tasks)
        grid = image_grid(test_frames, ev.pop("recon"), test_tasks)
        cv2.imwrite(os.path.join(output_dir, "reconstructions.png"), cv2.cvtColor(grid, cv2.COLOR_RGB2BGR))
        writer.add_image("eval/reconstructions", grid, step, dataformats="HWC")
        for k, v in ev.items():
            writer.add_scalar(f"eval/{k}", v, step)
        per_task = ", ".join(f"{k[5:]} {v:.2f}" for k, v in ev.items() if k.startswith("psnr/"))
        tqdm.write(f"step {step}: held-out PSNR {ev['psnr']:.2f} dB ({per_task}), codebook usage "
                   f"{ev['usage']:.1%}, perplexity {ev['perplexity']:.1f}")
        return ev

    autocast = torch.autocast("cuda", torch.bfloat16, enabled=use_cuda)
    ev = None
    bar = tqdm(range(start_step, args.total_steps), initial=start_step, total=args.total_steps,
               desc="vqgan", disable=rank != 0)
    done = start_step  # updates completed so far: the step a Ctrl-C checkpoint records
    previous_sigterm = signal.signal(signal.SIGTERM, sigterm_as_interrupt)  # `kill` saves as Ctrl-C does
    try:
        for step in bar:
            # each (seed, rank, step) gets its own batch: resuming replays the same data without RNG state
            rng = np.random.default_rng((args.seed, rank, step))
            x = train_frames[rng.integers(0, len(train_frames), args.batch_size)].to(device)
            x = x.permute(0, 3, 1, 2).float() / 127.5 - 1.0
            lr = args.learning_rate * min(1.0, (step + 1) / args.warmup_steps)
            for group in opt.param_groups + d_opt.param_groups:
                group["lr"] = lr
            use_gan = step >= args.disc_start

            # ---- generator (autoencoder) update
            disc.requires_grad_(False)
            with autocast:
                recon, z, e, codes = model(x)
                recon = recon.float()
                rec_loss = (recon - x).abs().mean() if args.rec_loss == "l1" else (recon - x).pow(2).mean()
                vq_loss = (F.mse_loss(e.float(), z.detach().float())
                           + args.beta * F.mse_loss(z.float(), e.detach().float()))
                loss = rec_loss + vq_loss
                if perceptual is not None:
                    p_loss = perceptual(recon, x)
                    loss = loss + args.perceptual_weight * p_loss
                if use_gan:  # non-saturating generator loss
                    g_loss = F.softplus(-disc(recon)).mean()
                    loss = loss + args.disc_weight * g_loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = nn.utils.clip_grad_norm_(vqgan.parameters(), args.grad_clip)
            check_finite(step + 1, loss=loss, grad_norm=grad_norm)
            opt.step()

            # ---- discriminator update: non-saturating loss + R1 penalty on real frames
            if use_gan:
                disc.requires_grad_(True)
                real = x.detach().requires_grad_(True)
                with autocast:
                    logits_real, logits_fake = disc(real).float(), disc(recon.detach()).float()
                    d_loss = F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean()
                (grad_real,) = torch.autograd.grad(logits_real.sum(), real, create_graph=True)
                r1 = grad_real.pow(2).sum((1, 2, 3)).mean()
                d_opt.zero_grad(set_to_none=True)
                (d_loss + args.r1_gamma / 2 * r1).backward()
                if distributed:  # the discriminator is not DDP-wrapped (R1 needs double backward): average by hand
                    for p in disc.parameters():
                        dist.all_reduce(p.grad)
                        p.grad /= world
                d_grad_norm = nn.utils.clip_grad_norm_(disc.parameters(), args.grad_clip)
                check_finite(step + 1, d_loss=d_loss, d_grad_norm=d_grad_norm)
                d_opt.step()

            # ---- dead-code restarts (identical on every process: counts summed, new vectors from rank 0)
            counts = torch.bincount(codes.flatten(), minlength=args.codebook_size)
            if distributed:
                dist.all_reduce(counts)
            last_used[counts > 0] = step
            if args.dead_code_steps > 0:
                dead = (step - last_used >= args.dead_code_steps).nonzero().flatten()
                if len(dead) > 0:
                    # k-means++-like: favour encoder outputs far from their code (rare patterns, e.g. a thin arm)
                    pool = z.detach().float().permute(0, 2, 3, 1).reshape(-1, args.embed_dim)
                    err = (pool - e.detach().float().permute(0, 2, 3, 1).reshape(-1, args.embed_dim)).pow(2).sum(1)
                    err = err.double().cpu().numpy() + 1e-12
                    pick = rng.choice(len(pool), len(dead), p=err / err.sum())
                    new = pool[torch.from_numpy(pick).to(device)]
                    if distributed:
                        dist.broadcast(new, 0)
                    with torch.no_grad():
                        vqgan.quantizer.codebook.weight[dead] = new
                    for k in ("exp_avg", "exp_avg_sq"):  # forget the old Adam moments of those rows
                        state = opt.state.get(vqgan.quantizer.codebook.weight, {})
                        if k in state:
                            state[k][dead] = 0.0
                    last_used[dead] = step

            # ---- logging, evaluation, checkpoints
            done = step + 1
            if rank == 0 and (done % args.log_every == 0 or done == args.total_steps):
                p = counts.double() / counts.sum()
                scalars = {"loss/total": loss.item(), f"loss/rec_{args.rec_loss}": rec_loss.item(),
                           "loss/vq": vq_loss.item(),
                           "train/grad_norm": float(grad_norm), "train/lr": lr,
                           "train/batch_usage": (counts > 0).double().mean().item(),
                           "train/batch_perplexity": torch.exp(-(p * torch.log(p + 1e-12)).sum()).item(),
                           "train/steps_per_s": bar.format_dict["rate"] or 0.0}
                if perceptual is not None:
                    scalars["loss/perceptual"] = p_loss.item()
                if use_gan:
                    scalars.update({"loss/g_adv": g_loss.item(), "loss/d": d_loss.item(), "loss/r1": r1.item()})
                for k, v in scalars.items():
                    writer.add_scalar(k, v, done)
                bar.set_postfix(rec=f"{rec_loss.item():.4f}", usage=f"{scalars['train/batch_usage']:.0%}")
            if done % args.eval_every == 0 or done == args.total_steps:
                ev = run_eval(done) or ev
                save(done)
    except KeyboardInterrupt as stop:  # Ctrl-C or SIGTERM: save where we are and say how to continue (an
        # interrupt inside an update may leave part of it in the weights; --resume repeats that step, so not
        # bit-exact)
        bar.close()
        save(done)
        if rank == 0:
            writer.close()
            print(f"\ninterrupted at step {done}: saved {ckpt_path}; continue with the same command plus "
                  f"--resume --output-dir {output_dir}")
        raise SystemExit(interrupt_exit_status(stop))
    finally:
        signal.signal(signal.SIGTERM, previous_sigterm)

    if start_step >= args.total_steps:  # nothing left to train: still report on the saved model
        ev = run_eval(start_step)
    if rank == 0:
        writer.close()
        if ev is not None:
            print(f"final: held-out PSNR {ev['psnr']:.2f} dB, codebook usage {ev['usage']:.1%} "
                  f"({round(ev['usage'] * args.codebook_size)}/{args.codebook_size} codes), "
                  f"perplexity {ev['perplexity']:.1f}; {output_dir}/vqgan.pt, {output_dir}/reconstructions.png")
    if distributed:
        # DDP's reducer holds the process group: free it first, or gloo's worker threads can be torn down during
        # interpreter shutdown (seen in CI as "terminate called without an active exception" on rank 1)
        del model
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()
    return {"output_dir": output_dir, "step": max(start_step, args.total_steps), **(ev or {})}


if __name__ == "__main__":
    main(parse_args())
