"""VideoGPT for VIPER: an autoregressive transformer over VQ-GAN tokens whose log-likelihood is the reward.

VIPER (Escontrela et al., NeurIPS 2023) rewards an agent by how likely a video model trained on expert
videos finds the agent's own frames. This script trains that video model.

1. Data. Every episode under `<data-dir>/<task>/{train,test}/` (`.npz` with key `video`, or `.mp4`/`.avi`)
   is turned into discrete codes once by the frozen VQ-GAN of `train_vqgan.py` (`--vqgan`), and the codes
   are cached in `<output-dir>/tokens.pt` (keyed by the file list and the VQ-GAN weights), so training
   costs the transformer only. A training clip is `--seq-len` frames taken every `--frame-skip` frames
   from a uniformly random offset (paper DMC checkpoints: 16x1, 8x2, 4x4; Atari: 4x4; cpu recipe: 4x1).
2. Model (VideoGPT as used by VIPER). The clip's L x h x w codes are flattened in (time, row, col)
   order into one sequence; a causal, pre-LayerNorm transformer predicts every token from the ones
   before it. The input is shifted right by one with a learned start token in front. Positions get a
   factorised embedding, time + row + col. With `--class-cond` a learned task embedding (class map =
   sorted task folder names, saved in the checkpoint) is added at every position.
3. Training: token cross-entropy, AdamW with linear warm-up then cosine decay, gradient clipping, an
   exponential moving average (EMA) of the weights that becomes the checkpoint's inference weights.
   Under `torchrun --nproc_per_node N` it trains with DistributedDataParallel (gloo on CPU).
   Tensorboard: train and held-out NLL per token (nats) beside the unigram entropy of the codes (the NLL
   of a model that ignores all context), and open-loop samples (1 real frame -> seq-len frames) as a
   frame grid image (add_video would need moviepy). The held-out NLL includes each clip's first frame,
   which has no context; on a new episode's layout it is the expensive part.
4. Reward (`RewardModel.compute_rewards`): for each step t the window ending at t holds frames
   t-(L-1)k, ..., t-k, t. `conditional` (paper formula): r_t = log p(x_t | earlier frames of the window);
   `joint` (official code's default): r_t = log p(window). A frame's log-probability is the sum over its
   h*w tokens. At an episode's start the available prefix (same skip) is used, so no step is dropped.

Output: `<output-dir>/videogpt.pt`, self-contained (EMA transformer, args, class map, training tasks, and
the whole VQ-GAN checkpoint with a hash of its weights), so later stages need this one path;
`videogpt_resume.pt` holds the training state. An output dir that holds one is only reused with `--resume`,
which refuses another architecture or tokenizer; Ctrl-C or `kill` saves both files and exits; a non-finite (NaN/inf)
loss stops the run before it reaches the weights or a checkpoint.
At the end the script prints held-out NLL per token next to the unigram entropy of the codes, and, per
task, the mean conditional reward of held-out expert episodes and (with `--random-data-dir`) of random
episodes, with the per-window AUROC expert vs random.

`--size` picks one of two recipes (PRESETS, below Args; a flag given explicitly overrides its preset value):
`cpu` (the default, measured on 2 CPU cores; `bash run.sh full` trains it): 4-frame clips, width 128, 4 layers,
4 heads, MLP 512, batch 16, lr 1e-3 with 100 warm-up steps, 1,500 steps; `paper` (VIPER's DMC size): 16-frame
clips, width 256, 8 layers, 8 heads, MLP 1024, batch 32, lr 3e-4 with 1000 warm-up steps, 100k steps.
`--size paper --width 512 --mlp-dim 2048 --seq-len 4 --frame-skip 4` is the Atari setting.

Examples:
    python train_videogpt.py --vqgan runs/vqgan/vqgan.pt --data-dir data/experts --class-cond \\
        --random-data-dir data/random --threads 1 --no-cuda                  # cpu recipe, ~20 min on one core
    python train_videogpt.py --vqgan runs/vqgan/vqgan.pt --data-dir data/experts --class-cond --size paper   # GPU
    torchrun --nproc_per_node 4 train_videogpt.py --size paper ...          # DistributedDataParallel
"""

import argparse
import copy
import gc
import hashlib
import json
import math
import os
import signal
import sys
import time
from dataclasses import asdict, dataclass
from typing import List, Literal, Optional

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
    (VIPER's DMC size); `--size paper --help` shows its values"""
    vqgan: str = "runs/vqgan/vqgan.pt"
    """vqgan.pt written by train_vqgan.py (frozen tokenizer; copied whole into videogpt.pt)"""
    data_dir: str = "data/experts"
    """dataset root: <data-dir>/<task>/{train,test}/*.npz|*.mp4|*.avi"""
    tasks: Optional[List[str]] = None
    """task folders to train on (default: every folder under --data-dir that has a train/ folder)"""
    random_data_dir: Optional[str] = None
    """optional root of random-policy episodes (<dir>/<task>/*/*.npz, e.g. collect_expert_videos.py
    --policy random); the final report then gives the per-window AUROC of expert vs random rewards"""
    output_dir: Optional[str] = None
    """videogpt.pt, resume state, token cache and tensorboard logs go here (default runs/videogpt__<seed>__<time>)"""
    seed: int = 1
    """seed of weights, clip draws and dropout"""
    cuda: bool = True
    """use CUDA when available (bf16 autocast there; fp32 on CPU)"""
    threads: int = 0
    """torch CPU threads per process (0: torch's default, which follows OMP_NUM_THREADS)"""
    resume: bool = False
    """continue from <output-dir>/videogpt_resume.pt"""

    # clips
    seq_len: int = 4
    """frames per clip L (the window length of the reward)"""
    frame_skip: int = 1
    """k: a clip takes every k-th frame (paper DMC: 1)"""
    class_cond: bool = False
    """condition on the task (folder name); required for one model over several tasks"""

    # model
    width: int = 128
    """transformer width (embedding size)"""
    num_layers: int = 4
    """number of transformer blocks"""
    num_heads: int = 4
    """attention heads per block"""
    mlp_dim: int = 512
    """hidden size of each block's MLP"""
    dropout: float = 0.1
    """dropout on embeddings, attention weights and residual branches"""

    # optimisation
    total_steps: int = 1500
    """optimiser steps"""
    batch_size: int = 16
    """clips per step, split evenly over torchrun processes"""
    learning_rate: float = 1e-3
    """peak AdamW learning rate (after warm-up; cosine decay to 10% of it at --total-steps)"""
    warmup_steps: int = 100
    """linear learning-rate warm-up steps"""
    weight_decay: float = 0.01
    """AdamW weight decay on weight matrices and embeddings (not on biases, LayerNorm gains, start token)"""
    grad_clip: float = 1.0
    """clip the global gradient norm to this"""
    ema_decay: float = 0.999
    """decay of the weight EMA used for evaluation, sampling and the checkpoint"""

    # logging
    eval_every: int = 500
    """steps between held-out NLL evaluations and checkpoints"""
    keep_every: int = 0
    """also keep a copy of the checkpoint every this many steps (videogpt_step{N}.pt), to compare rewards from
    models trained for different lengths; 0 keeps only the latest videogpt.pt"""
    eval_clips: int = 64
    """held-out clips (fixed) for the NLL evaluation"""
    sample_every: int = 1500
    """steps between open-loop sample grids in tensorboard (1 context frame -> seq-len frames)"""


# The two recipes (--size): only the flags that differ. Args' own defaults are the cpu recipe.
PRESETS = {
    "cpu": dict(seq_len=4, width=128, num_layers=4, num_heads=4, mlp_dim=512, batch_size=16, learning_rate=1e-3,
                warmup_steps=100, total_steps=1500, eval_every=500, eval_clips=64, sample_every=1500),
    "paper": dict(seq_len=16, width=256, num_layers=8, num_heads=8, mlp_dim=1024, batch_size=32, learning_rate=3e-4,
                  warmup_steps=1000, total_steps=100_000, eval_every=1000, eval_clips=256, sample_every=5000),
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


# ---------------------------------------------------------------------------------------------------------
# Open-loop sampling (this script only: the agent scores frames, it never samples). One token at a time, the
# keys and values of the positions already processed kept in a cache, so each step runs one position.
class KVCache:
    """Keys and values of the positions already processed, so sampling costs one token per step."""

    def __init__(self, batch, heads, max_len, head_dim, device, dtype):
        self.k = torch.zeros(batch, heads, max_len, head_dim, device=device, dtype=dtype)
        self.v = torch.zeros_like(self.k)
        self.len = 0

    def append(self, k, v):
        n = k.shape[2]
        self.k[:, :, self.len:self.len + n] = k
        self.v[:, :, self.len:self.len + n] = v
        self.len += n
        return self.k[:, :, :self.len], self.v[:, :, :self.len]


def cached_forward(model, x, caches):
    """VideoGPT's transformer (as in forward) on new embedded positions x [B, S, width] that also attend to the
    positions in caches (one KVCache per block; the new keys and values are appended): logits [B, S, vocab].
    The first call holds the whole prefix (empty caches), later calls one position each."""
    x = model.drop(x)
    for block, cache in zip(model.blocks, caches):
        attn, h = block.attn, block.ln1(x)
        B, S, C = h.shape
        assert S == 1 or cache.len == 0, "the prefix goes into empty caches; after it, one position per call"
        q, k, v = attn.qkv(h).view(B, S, 3, attn.heads, C // attn.heads).permute(2, 0, 3, 1, 4)
        k, v = cache.append(k, v)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=S > 1, dropout_p=attn.dropout if attn.training else 0.0)
        x = x + attn.resid_drop(attn.proj(y.transpose(1, 2).reshape(B, S, C)))
        x = x + block.mlp(block.ln2(x))
    return model.head(model.ln_f(x))


@torch.no_grad()
def sample_codes(model, context, num_frames, temperature=1.0, labels=None, generator=None):
    """Continue context codes [B, c, h, w] by num_frames frames of a VideoGPT, one token at a time.

    temperature 0 takes the most likely token (greedy). Returns codes [B, c + num_frames, h, w].
    """
    B, c = context.shape[:2]
    hw = model.token_hw[0] * model.token_hw[1]
    total = (c + num_frames) * hw
    if c + num_frames > model.seq_len:
        raise ValueError(f"context {c} + {num_frames} frames exceed the model's {model.seq_len} frames")
    pos, cls = model.pos_emb(), model._check_labels(labels, B)
    head_dim = model.start.shape[0] // model.blocks[0].attn.heads
    caches = [KVCache(B, b.attn.heads, total, head_dim, context.device, model.start.dtype) for b in model.blocks]
    tokens = context.flatten(1)
    x = torch.cat([model.start.expand(B, 1, -1), model.tok_emb(tokens)], 1)  # start + context
    logits = cached_forward(model, x + pos[:tokens.shape[1] + 1] + cls, caches)[:, -1]
    out = [tokens]
    for i in range(c * hw, total):  # logits predict token i
        if temperature == 0:
            tok = logits.argmax(-1)
        else:
            probs = (logits.float() / temperature).softmax(-1)
            tok = torch.multinomial(probs, 1, generator=generator)[:, 0]
        out.append(tok[:, None])
        if i + 1 < total:
            logits = cached_forward(model, model.tok_emb(tok)[:, None] + pos[i + 1] + cls, caches)[:, -1]
    return torch.cat(out, 1).view(B, c + num_frames, *model.token_hw)


@torch.inference_mode()
def sample_video(reward_model, context_frames, num_frames, temperature=1.0, task=None, generator=None):
    """Open-loop video: uint8 context [B, c, H, W, 3] -> uint8 [B, c + num_frames, H, W, 3] (context re-decoded).
    reward_model.vqgan must be the whole VQGAN (main's RewardModel, or load_videogpt_with_decoder)."""
    codes = sample_codes(reward_model.model, reward_model.encode(context_frames), num_frames, temperature,
                         reward_model.labels(task), generator)
    frames = reward_model.vqgan.decode(codes.flatten(0, 1))
    return frames.view(*codes.shape[:2], *frames.shape[1:])


def load_videogpt_with_decoder(ckpt, device="cpu"):
    """load_videogpt, with the whole VQ-GAN as the tokenizer: its decoder turns sampled codes into frames."""
    reward_model = load_videogpt(ckpt, device)
    reward_model.vqgan = load_vqgan(ckpt["vqgan"], device)
    return reward_model


# ---------------------------------------------------------------------------------------------------------
# Data: read episode files (and write checkpoints), find episodes, tokenise them once, draw clips.
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


VQGAN_KEYS = ("kind", "args", "model", "image_size", "token_hw", "codebook_size", "embed_dim", "channel_mult", "tasks",
              "step")  # what vqgan.pt holds: no optimiser state goes into videogpt.pt


# not train_vqgan.find_tasks on purpose: clips come from train/ only, and sorted tasks fix the class labels
def list_tasks(data_dir, tasks=None):
    if not os.path.isdir(data_dir):
        raise FileNotFoundError(f"data dir {data_dir!r} does not exist")
    found = sorted(d for d in os.listdir(data_dir) if os.path.isdir(os.path.join(data_dir, d, "train")))
    if tasks is None:
        if not found:
            raise FileNotFoundError(f"no <task>/train/ folder under {data_dir!r}")
        return found
    missing = [t for t in tasks if t not in found]
    if missing:
        raise FileNotFoundError(f"task folder(s) {missing} not found under {data_dir!r} (found {found})")
    return sorted(tasks)


def list_episodes(root, task, splits):
    files = []
    for split in splits:
        folder = os.path.join(root, task, split)
        if os.path.isdir(folder):
            files += [os.path.join(folder, f) for f in sorted(os.listdir(folder))
                      if f.endswith(VIDEO_EXTENSIONS) and not f.endswith(".tmp.npz")]
    return files


def weights_hash(state_dict):
    """sha1 of a model's weights: tells which tokenizer made a set of codes (token cache, --resume check)."""
    h = hashlib.sha1()
    for v in state_dict.values():
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def tokenize(paths, vqgan, image_size, codebook_size, device, cache_path, desc):
    """codes (uint8, or int16 for codebooks > 256) [T, h, w] per file, from cache_path if it matches."""
    h = hashlib.sha1(weights_hash(vqgan.state_dict()).encode())  # key: the VQ-GAN weights and the file list
    for p in paths:  # (path, size, mtime)
        st = os.stat(p)
        h.update(f"{os.path.abspath(p)}|{st.st_size}|{st.st_mtime_ns};".encode())
    key = h.hexdigest()
    if os.path.exists(cache_path):
        cache = torch.load(cache_path, map_location="cpu")
        if cache.get("key") == key:
            return cache["codes"]
    dtype = torch.uint8 if codebook_size <= 256 else torch.int16
    codes = []
    for p in tqdm(paths, desc=f"tokenising {desc}"):
        video = torch.from_numpy(read_video(p, image_size))
        codes.append(vqgan.encode(video).cpu().to(dtype))
    atomic_save({"key": key, "paths": list(paths), "codes": codes}, cache_path)
    return codes


class ClipSampler:
    """Clips of seq_len frames every frame_skip frames, from any valid offset of any episode (uniformly)."""

    def __init__(self, episodes, labels, seq_len, frame_skip, split="train"):
        span = (seq_len - 1) * frame_skip + 1
        self.codes = torch.cat(episodes)  # all frames, episodes back to back
        starts, start_labels, offset = [], [], 0
        for c, label in zip(episodes, labels):
            if len(c) >= span:
                starts.append(torch.arange(offset, offset + len(c) - span + 1))
                start_labels.append(torch.full((len(c) - span + 1,), label))
            offset += len(c)
        if not starts:
            raise ValueError(f"no {split}/ episode has the {span} frames that --seq-len {seq_len} x --frame-skip "
                             f"{frame_skip} need (longest: {max(map(len, episodes), default=0)}): record longer "
                             f"episodes or lower --seq-len / --frame-skip")
        self.starts, self.labels = torch.cat(starts), torch.cat(start_labels)
        self.offsets = torch.arange(seq_len) * frame_skip

    def sample(self, batch, rng):
        i = torch.from_numpy(rng.integers(0, len(self.starts), batch))
        return self.codes[self.starts[i, None] + self.offsets].long(), self.labels[i]


# ---------------------------------------------------------------------------------------------------------
# Utilities
def make_checkpoint(args, ema_model, class_map, token_hw, vqgan_ckpt, step, tasks=None, vqgan_hash=None):
    """The self-contained videogpt.pt dict. tasks: the sorted task folders it was trained on (also for an
    unconditional model); vqgan_hash: weights_hash of the tokenizer. Readers treat both as optional (older files)."""
    return {"kind": "videogpt", "args": asdict(args), "model": ema_model.state_dict(), "class_map": class_map,
            "seq_len": args.seq_len, "frame_skip": args.frame_skip, "token_hw": tuple(token_hw),
            "vqgan": vqgan_ckpt, "step": step, "tasks": tasks, "vqgan_hash": vqgan_hash}


def unigram_entropy(codes_list, vocab_size):
    """Entropy (nats) of the code histogram: the NLL per token of a model that ignores all context."""
    counts = sum(torch.bincount(c.flatten().long(), minlength=vocab_size) for c in codes_list).double()
    p = counts[counts > 0] / counts.sum()
    return float(-(p * p.log()).sum())


def auroc(pos, neg):
    """P(score of a positive > score of a negative), ties counting 1/2 (Mann-Whitney U)."""
    x = np.concatenate([pos, neg])
    ranks = np.empty(len(x))
    ranks[x.argsort(kind="mergesort")] = np.arange(1, len(x) + 1)
    _, inv, counts = np.unique(x, return_inverse=True, return_counts=True)
    ranks = (np.bincount(inv, weights=ranks) / counts)[inv]  # average rank within ties
    return float((ranks[:len(pos)].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


@torch.no_grad()
def heldout_nll(model, codes, labels, batch_size, device, autocast):
    """Mean NLL per token (nats) of fixed clips."""
    model.eval()
    total = 0.0
    for i in range(0, len(codes), batch_size):
        c = codes[i:i + batch_size].to(device)
        lab = labels[i:i + batch_size].to(device) if model.class_emb is not None else None
        with autocast():
            logits = model(c, lab)
        total += F.cross_entropy(logits.float().flatten(0, 1), c.flatten(), reduction="sum").item()
    return total / codes.numel()


def sample_grid(reward_model, codes, labels, generator):
    """uint8 image [rows*H, L*W, 3]: per clip a row of real frames (VQ-GAN reconstructions) over a row
    sampled open-loop from its first frame."""
    m, vq = reward_model.model, reward_model.vqgan
    with torch.inference_mode():
        lab = labels.to(reward_model.device) if reward_model.class_map is not None else None
        real = codes.to(reward_model.device)
        fake = sample_codes(m, real[:, :1], real.shape[1] - 1, 1.0, lab, generator)
        frames = vq.decode(torch.stack([real, fake], 1).flatten(0, 2)).cpu()  # [B*2*L, H, W, 3]
    B, L = real.shape[:2]
    H, W = frames.shape[1:3]
    return frames.view(B * 2, L, H, W, 3).permute(0, 2, 1, 3, 4).reshape(B * 2 * H, L * W, 3).numpy()


# ---------------------------------------------------------------------------------------------------------
def main(args: Args):
    ddp = int(os.environ.get("WORLD_SIZE", "1")) > 1
    use_cuda = args.cuda and torch.cuda.is_available()
    rank, world = 0, 1
    if ddp:
        dist.init_process_group("nccl" if use_cuda else "gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    is_main = rank == 0
    if args.resume and not args.output_dir:
        raise ValueError("--resume needs the --output-dir of the run to continue")
    # counts and sizes must be positive (0 gives a ZeroDivisionError, a NaN loss or no checkpoint at all)
    bad = [f"--{k.replace('_', '-')} {getattr(args, k)}" for k in ("seq_len", "frame_skip", "width", "num_layers",
           "num_heads", "mlp_dim", "total_steps", "batch_size", "eval_every", "eval_clips", "sample_every")
           if getattr(args, k) < 1]
    if bad:
        raise ValueError(f"{', '.join(bad)}: must be >= 1")
    if args.keep_every < 0 or args.keep_every % args.eval_every:  # copies are made when a checkpoint is written
        raise ValueError(f"--keep-every {args.keep_every}: must be 0 or a multiple of --eval-every {args.eval_every}")
    if args.width % args.num_heads:
        raise ValueError(f"--width {args.width} is not divisible by --num-heads {args.num_heads}")
    if args.batch_size % world:
        raise ValueError(f"--batch-size {args.batch_size} is not divisible by the {world} torchrun processes")

    def autocast():  # bf16 only on CUDA: on CPU it is much slower than fp32
        return torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_cuda)

    out_dir = [args.output_dir or os.path.join("runs", f"videogpt__{args.seed}__{int(time.time())}")]
    if ddp:
        dist.broadcast_object_list(out_dir)  # every rank uses rank 0's name
    out_dir = out_dir[0]
    resume_path = os.path.join(out_dir, "videogpt_resume.pt")
    if args.resume and not os.path.exists(resume_path):
        raise FileNotFoundError(f"--resume: {resume_path} does not exist")
    if not args.resume and os.path.exists(resume_path):  # checked before anything is written
        raise FileExistsError(f"--output-dir {out_dir!r} already holds a run (videogpt_resume.pt): add --resume to "
                              f"continue it, or choose another --output-dir (a new run here would overwrite it)")
    os.makedirs(out_dir, exist_ok=True)
    torch.manual_seed(args.seed + rank)

    # tokenizer and data
    if not os.path.exists(args.vqgan):
        raise FileNotFoundError(f"--vqgan {args.vqgan!r} does not exist (train it with train_vqgan.py)")
    vqgan_ckpt = torch.load(args.vqgan, map_location="cpu", weights_only=False)
    if not isinstance(vqgan_ckpt, dict) or vqgan_ckpt.get("kind") != "vqgan":
        raise ValueError(f"--vqgan {args.vqgan!r} is not a vqgan.pt checkpoint (kind='vqgan')")
    vqgan_ckpt = {k: v for k, v in vqgan_ckpt.items() if k in VQGAN_KEYS}
    nonfinite = [k for k, v in vqgan_ckpt["model"].items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if nonfinite:
        raise ValueError(f"--vqgan {args.vqgan!r} has non-finite (NaN/inf) weights ({', '.join(nonfinite[:3])}, ...): "
                         f"its training diverged; retrain it (train_vqgan.py with a lower --learning-rate)")
    vqgan_hash = weights_hash(vqgan_ckpt["model"])  # the codes' meaning: recorded, and checked on --resume
    vqgan = load_vqgan(vqgan_ckpt, device)
    image_size, token_hw, vocab = vqgan_ckpt["image_size"], tuple(vqgan_ckpt["token_hw"]), vqgan_ckpt["codebook_size"]
    tasks = list_tasks(args.data_dir, args.tasks)
    class_map = {t: i for i, t in enumerate(tasks)} if args.class_cond else None
    files = {s: [(t, p) for t in tasks for p in list_episodes(args.data_dir, t, [s])] for s in ("train", "test")}
    state = None
    if args.resume:  # read and checked before tokenising; loaded into the model below
        state = torch.load(resume_path, map_location=device, weights_only=False)
        saved = state.get("args")  # resume states written before these checks hold no args, tasks or hash
        if saved is not None:  # another architecture would fail with a bare tensor size mismatch: name the flags
            changed = [f"--{k.replace('_', '-')} {saved[k]} there, {getattr(args, k)} here" for k in
                       ("seq_len", "width", "num_layers", "num_heads", "mlp_dim", "class_cond")
                       if saved[k] != getattr(args, k)]
            if changed:
                raise ValueError(f"--resume: {resume_path} has another architecture ({'; '.join(changed)}): resume "
                                 f"with its flags, or choose another --output-dir for a new run")
        if args.class_cond and state.get("tasks", tasks) != tasks:
            raise ValueError(f"--resume: {resume_path} was trained on tasks {state['tasks']}, this command has {tasks} "
                             f"(--tasks / --data-dir): its class labels would change meaning")
        if state.get("vqgan_hash", vqgan_hash) != vqgan_hash:  # same shapes, other weights: codes mean other things
            raise ValueError(f"--resume: {resume_path} was trained on the codes of tokenizer {saved['vqgan']!r}, "
                             f"whose weights differ from those of --vqgan {args.vqgan!r} now: resume with the "
                             f"vqgan.pt it was trained with, or choose another --output-dir")
    if not files["train"]:
        raise FileNotFoundError(f"no {VIDEO_EXTENSIONS} files in {args.data_dir}/<task>/train/ for tasks {tasks}")
    cache_path = os.path.join(out_dir, "tokens.pt")
    all_files = [p for s in ("train", "test") for _, p in files[s]]
    if is_main:
        tokenize(all_files, vqgan, image_size, vocab, device, cache_path, "episodes")
    if ddp:
        dist.barrier()  # rank 0 wrote the cache; the others read it
    codes = dict(zip(all_files, tokenize(all_files, vqgan, image_size, vocab, device, cache_path, "episodes")))
    train_sampler = ClipSampler([codes[p] for _, p in files["train"]], [tasks.index(t) for t, _ in files["train"]],
                                args.seq_len, args.frame_skip)
    entropy = unigram_entropy([codes[p] for _, p in files["train"]], vocab)
    eval_codes = eval_labels = None
    if files["test"]:
        test_sampler = ClipSampler([codes[p] for _, p in files["test"]], [tasks.index(t) for t, _ in files["test"]],
                                   args.seq_len, args.frame_skip, split="test")
        eval_codes, eval_labels = test_sampler.sample(args.eval_clips, np.random.default_rng(12345))  # fixed set
    elif is_main:
        print(f"warning: no test/ episodes under {args.data_dir}: no held-out NLL or expert reward report")

    # model, EMA, optimiser
    model = VideoGPT(vocab, args.seq_len, token_hw, args.width, args.num_layers, args.num_heads, args.mlp_dim,
                     args.dropout, len(tasks) if args.class_cond else 0).to(device)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}],
                                  lr=args.learning_rate, betas=(0.9, 0.95), fused=use_cuda)
    step = 0
    if args.resume:
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
        step = state["step"]
        torch.manual_seed(args.seed + rank + step)  # fresh dropout masks (clip draws need no state)
        if is_main:
            print(f"resumed from {resume_path} at step {step}")
    train_model = nn.parallel.DistributedDataParallel(model) if ddp else model
    n_params = sum(p.numel() for p in model.parameters())
    writer = None
    if is_main:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(out_dir)
        writer.add_text("args", json.dumps(asdict(args), indent=1))
        print(f"{n_params / 1e6:.2f}M parameters; {len(files['train'])} train / {len(files['test'])} test episodes "
              f"of {tasks}; {args.seq_len}x{token_hw[0]}x{token_hw[1]} tokens per clip; "
              f"unigram entropy of the codes {entropy:.3f} nats")
        writer.add_scalar("data/unigram_entropy", entropy, step)

    def lr_at(s):
        warm = min(1.0, (s + 1) / max(1, args.warmup_steps))
        progress = min(1.0, s / max(1, args.total_steps))
        return args.learning_rate * warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))

    def save():
        ckpt = make_checkpoint(args, ema, class_map, token_hw, vqgan_ckpt, step, tasks, vqgan_hash)
        atomic_save(ckpt, os.path.join(out_dir, "videogpt.pt"))
        if args.keep_every and step % args.keep_every == 0:
            atomic_save(ckpt, os.path.join(out_dir, f"videogpt_step{step}.pt"))
        atomic_save({"model": model.state_dict(), "ema": ema.state_dict(), "optimizer": optimizer.state_dict(),
                     "step": step, "args": asdict(args), "tasks": tasks, "vqgan_hash": vqgan_hash}, resume_path)

    reward_model = RewardModel(ema, vqgan, args.seq_len, args.frame_skip, class_map)
    eval_nll = float("nan")
    bar = tqdm(total=args.total_steps, initial=step, desc="videogpt", disable=not is_main)
    t0, tokens_seen, nll_sum, nll_n = time.time(), 0, 0.0, 0
    previous_sigterm = signal.signal(signal.SIGTERM, sigterm_as_interrupt)  # `kill` saves as Ctrl-C does
    try:
        while step < args.total_steps:
            model.train()
            for g in optimizer.param_groups:
                g["lr"] = lr_at(step)
            # clips depend on (seed, rank, step): resume replays them
            rng = np.random.default_rng((args.seed, rank, step))
            clip, labels = train_sampler.sample(args.batch_size // world, rng)
            clip, labels = clip.to(device), (labels.to(device) if args.class_cond else None)
            with autocast():
                logits = train_model(clip, labels)
            loss = F.cross_entropy(logits.float().flatten(0, 1), clip.flatten())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
            check_finite(step + 1, loss=loss, grad_norm=grad_norm)
            optimizer.step()
            with torch.no_grad():  # EMA, with a short warm-up so early checkpoints are not dominated by the init
                d = min(args.ema_decay, (1 + step) / (10 + step))
                for pe, p in zip(ema.parameters(), model.parameters()):
                    pe.lerp_(p, 1 - d)
            step += 1
            bar.update(1)
            tokens_seen += clip.numel() * world
            nll_sum, nll_n = nll_sum + loss.item(), nll_n + 1
            if is_main and (step % 20 == 0 or step == args.total_steps):
                writer.add_scalar("train/nll_per_token", nll_sum / nll_n, step)
                writer.add_scalar("train/lr", lr_at(step - 1), step)
                writer.add_scalar("train/grad_norm", float(grad_norm), step)
                writer.add_scalar("train/tokens_per_s", tokens_seen / (time.time() - t0), step)
                bar.set_postfix(nll=f"{nll_sum / nll_n:.3f}", heldout=f"{eval_nll:.3f}", unigram=f"{entropy:.3f}")
                nll_sum, nll_n = 0.0, 0
            if is_main and (step % args.eval_every == 0 or step == args.total_steps):
                if eval_codes is not None:
                    eval_nll = heldout_nll(ema, eval_codes, eval_labels, args.batch_size, device, autocast)
                    writer.add_scalar("eval/nll_per_token", eval_nll, step)
                save()
            if is_main and (step % args.sample_every == 0 or step == args.total_steps):
                src, src_labels = (eval_codes, eval_labels) if eval_codes is not None else train_sampler.sample(4, rng)
                gen = torch.Generator(device).manual_seed(step)
                grid = sample_grid(reward_model, src[:4], src_labels[:4], gen)
                writer.add_image("samples/real_over_sampled", grid, step, dataformats="HWC")
    except KeyboardInterrupt as stop:  # Ctrl-C or SIGTERM: save where we are and say how to continue (an
        # interrupt inside the optimiser/EMA update may leave part of it in the weights; --resume repeats that
        # step, so not bit-exact)
        bar.close()
        if is_main:
            save()
            writer.close()
            print(f"\ninterrupted at step {step}: saved {resume_path}; continue with the same command plus "
                  f"--resume --output-dir {out_dir}")
        raise SystemExit(interrupt_exit_status(stop))
    finally:
        signal.signal(signal.SIGTERM, previous_sigterm)
    bar.close()

    if is_main:
        report = final_report(args, reward_model, tasks, files, codes, (eval_codes, eval_labels), entropy, out_dir,
                              autocast)
        for k, v in report.items():
            if isinstance(v, float):
                writer.add_scalar(f"final/{k}", v, step)
        writer.close()
    if ddp:
        # DDP's reducer holds the process group: free it first, or gloo's worker threads can be torn down
        # during interpreter shutdown (seen once as "terminate called without an active exception" on rank 1)
        del train_model
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()


def final_report(args, reward_model, tasks, files, codes, eval_clips, entropy, out_dir, autocast):
    """Held-out NLL vs unigram entropy, and per task the conditional reward of expert vs random episodes."""
    report, (eval_codes, eval_labels) = {"unigram_entropy": entropy}, eval_clips
    if eval_codes is not None:
        report["heldout_nll_per_token"] = heldout_nll(reward_model.model, eval_codes, eval_labels, args.batch_size,
                                                      reward_model.device, autocast)
    print(f"\nheld-out NLL per token {report.get('heldout_nll_per_token', float('nan')):.4f} nats "
          f"vs unigram entropy of the codes {entropy:.4f} nats")
    full = (args.seq_len - 1) * args.frame_skip  # per-window statistics use full windows only (t >= (L-1)k)

    def episode_rewards(task, code_list):
        r = [reward_model.rewards_from_codes(c[None], task, "conditional")[0, full:] for c in code_list]
        return torch.cat(r).numpy() if r else np.zeros(0)

    for task in tasks:
        expert = episode_rewards(task, [codes[p] for t, p in files["test"] if t == task])
        line = f"{task}: expert (test) mean conditional reward {expert.mean() if len(expert) else float('nan'):.2f}"
        report[f"{task}/expert_reward"] = float(expert.mean()) if len(expert) else float("nan")
        if args.random_data_dir:
            paths = list_episodes(args.random_data_dir, task, ["train", "test"])
            if not paths:
                print(f"warning: no random episodes in {args.random_data_dir}/{task}/{{train,test}}/")
            else:
                vq = reward_model.vqgan
                rand_codes = tokenize(paths, vq, vq.image_size, vq.codebook_size, reward_model.device,
                                      os.path.join(out_dir, f"tokens_random_{task}.pt"), f"random {task}")
                rand = episode_rewards(task, rand_codes)
                report[f"{task}/random_reward"] = float(rand.mean())
                line += f", random {rand.mean():.2f}"
                if len(expert) and len(rand):
                    report[f"{task}/auroc"] = auroc(expert, rand)
                    line += f", per-window AUROC {report[f'{task}/auroc']:.3f} ({len(expert)} vs {len(rand)} windows)"
                    # the agent's reward scale: random policy -> 0, expert -> 1 (eval.py reference measures the
                    # same on the agent's own environment, more slowly)
                    lo, hi = round(float(rand.mean())), round(float(expert.mean()))
                    if lo < hi:
                        line += f"\n  for the agent: train_viper_dreamer.py --density-bounds {lo} {hi}"
        print(line)
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(report, f, indent=1)
    return report


if __name__ == "__main__":
    main(parse_args())
