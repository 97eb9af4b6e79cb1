"""Throughput of train_vqgan.py's model on this machine: training updates and encoding.

Times the paper-size DMC configuration (base width 128) and the recommended CPU configuration
(base width 16, channel mult 1 2 4 4, discriminator width 32) for a few iterations each. A training
update is the full post-`--disc-start` update of train_vqgan.main: autoencoder forward, L2 + VQ +
adversarial loss, backward, AdamW step, then the discriminator update with the R1 penalty.
The paper trains with batch 128; it is timed here with a smaller batch to stay under a minute
(frames/s is the comparable number). Runtime < 1 min on 2 CPU cores.

    python bench/bench_vqgan.py [--threads N]
"""
import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train_vqgan as tv  # noqa: E402

CONFIGS = {  # name: (base_channels, channel_mult, disc_channels, train batch, train iterations)
    "paper DMC (128, 1 2 2 2)": (128, (1, 2, 2, 2), 64, 4, 2),
    "CPU (16, 1 2 4 4)": (16, (1, 2, 4, 4), 32, 16, 6),
}


def train_update(model, disc, opt, d_opt, x):
    recon, z, e, codes = model(x)
    loss = (recon - x).pow(2).mean() + F.mse_loss(e, z.detach()) + 0.25 * F.mse_loss(z, e.detach())
    disc.requires_grad_(False)
    loss = loss + 0.1 * F.softplus(-disc(recon)).mean()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    disc.requires_grad_(True)
    real = x.detach().requires_grad_(True)
    logits_real, logits_fake = disc(real), disc(recon.detach())
    (grad,) = torch.autograd.grad(logits_real.sum(), real, create_graph=True)
    d_loss = F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean() + 0.5 * grad.pow(2).sum((1, 2, 3)).mean()
    d_opt.zero_grad(set_to_none=True)
    d_loss.backward()
    d_opt.step()


def bench(base, mult, disc_ch, batch, iters):
    torch.manual_seed(0)
    model, disc = tv.VQGAN(64, base, mult, 1, 256, 64), tv.PatchDiscriminator(disc_ch)
    opt, d_opt = torch.optim.AdamW(model.parameters(), 1e-4), torch.optim.AdamW(disc.parameters(), 1e-4)
    x = torch.rand(batch, 3, 64, 64) * 2 - 1
    train_update(model, disc, opt, d_opt, x)  # warm-up
    t = time.perf_counter()
    for _ in range(iters):
        train_update(model, disc, opt, d_opt, x)
    train_s = (time.perf_counter() - t) / iters
    frames = torch.randint(0, 256, (64, 64, 64, 3), dtype=torch.uint8)
    model.eval().encode(frames[:8])  # warm-up
    t = time.perf_counter()
    model.encode(frames)
    encode_fps = len(frames) / (time.perf_counter() - t)
    return sum(p.numel() for p in model.parameters()) / 1e6, 1 / train_s, batch / train_s, encode_fps


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    threads = parser.parse_args().threads
    if threads > 0:
        torch.set_num_threads(threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), fp32 CPU")
    print(f"| {'config':<26} | params | batch | train steps/s | train frames/s | encode frames/s |")
    print(f"|{'-' * 28}|--------|-------|---------------|----------------|-----------------|")
    for name, (base, mult, disc_ch, batch, iters) in CONFIGS.items():
        params, steps_s, train_fps, enc_fps = bench(base, mult, disc_ch, batch, iters)
        print(f"| {name:<26} | {params:5.2f}M | {batch:5d} | {steps_s:13.2f} | {train_fps:14.1f} | {enc_fps:15.1f} |",
              flush=True)


if __name__ == "__main__":
    main()
