"""Benchmark of the VIPER reward (train_videogpt.py) on this machine: env steps per second and FLOPs per step.

One env step's reward = one forward pass of the transformer over the window ending at that step
(L frames x h x w tokens) in which the last block and the output layer run for the scored (last) frame's
tokens only (`VideoGPT.last_frame_log_prob`), plus the VQ-GAN encoding of the step's new frame. Both are
timed with random
weights (speed does not depend on training) in fp32, batched the way `RewardModel.compute_rewards` batches
windows, next to the measured fp32 matmul rate of this CPU/GPU. FLOPs (a multiply-add = 2) of the linear and
conv layers are counted by torch.utils.flop_counter; it does not see the CPU attention kernel, so attention is
added by hand: causal QK^T and AV over S tokens of width d cost 2 * S^2 * d per layer (half of dense), and
4 * q * (S - q/2) * d in the last layer, whose q = h*w queries attend to S - q + 1 ... S keys; the VQ-GAN's
one small attention block (<1% of its FLOPs) is left out. `last/full`: the transformer's time per step
against the same windows through the whole forward pass (`frame_log_probs`), as before the shortcut.

    python bench/bench_videogpt.py            # ~1-2 min on 2 CPU cores
"""
import os
import sys
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train_videogpt as tv  # noqa: E402

CONFIGS = [  # name, (L, k), tokens h=w, codebook, (width, layers, heads, mlp), VQ-GAN (base, channel_mult), windows timed
    ("CPU recipe (README)", (4, 1), 8, 256, (128, 4, 4, 512), (16, (1, 2, 4, 4)), 64),
    ("Pong cpu (README)", (4, 4), 16, 1024, (128, 4, 4, 512), (16, (1, 2, 2)), 16),
    ("paper DMC", (16, 1), 8, 256, (256, 8, 8, 1024), (128, (1, 2, 2, 2)), 12),
    ("paper Atari", (4, 4), 16, 1024, (512, 8, 8, 2048), (128, (1, 2, 2)), 4),
]


def timed(fn, repeats=1):
    fn()  # warm-up
    t = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - t) / repeats


def flops(fn):
    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return counter.get_total_flops()


def main():
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    n = 2048
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    mm = 2 * n ** 3 / timed(lambda: (a @ b, sync()), repeats=5) / 1e9
    print(f"device {device}, torch threads {torch.get_num_threads()}; fp32 matmul {n}x{n}: {mm:.1f} GFLOP/s\n")
    header = (f"{'config':<20} {'window':>12} {'model':>14} {'GFLOP/step':>10} {'enc GFLOP':>9} {'steps/s':>8} "
              f"{'+encode':>8} {'GFLOP/s':>8} {'% matmul':>8} {'last/full':>9}")
    print(header + "\n" + "-" * len(header))
    with torch.inference_mode():
        for name, (L, k), hw, vocab, (width, layers, heads, mlp), (base, mult), windows in CONFIGS:
            model = tv.VideoGPT(vocab, L, (hw, hw), width, layers, heads, mlp, 0.1).to(device).eval()
            vqgan = tv.VQGAN(64, base, mult, 1, vocab, 64).to(device).eval()
            rm = tv.RewardModel(model, vqgan, L, k)
            codes = torch.randint(vocab, (1, windows, hw, hw), device=device)
            frames = torch.randint(256, (windows, 64, 64, 3), dtype=torch.uint8, device=device)
            # FLOPs of one env step: one window through the transformer, one frame through the encoder
            S, q = L * hw * hw, hw * hw
            window = codes[:, :1].expand(1, L, hw, hw)
            step_flops = (flops(lambda: model.last_frame_log_prob(window)) + (layers - 1) * 2 * S * S * width
                          + 4 * q * (S - q / 2) * width)
            enc_flops = flops(lambda: vqgan.encode(frames[:1]))
            t_model = timed(lambda: (rm.rewards_from_codes(codes), sync())) / windows
            t_enc = timed(lambda: (vqgan.encode(frames), sync())) / windows
            full = torch.randint(vocab, (windows, L, hw, hw), device=device)  # windows as the reward batches them
            t_last = timed(lambda: (model.last_frame_log_prob(full), sync()))
            t_full = timed(lambda: (model.frame_log_probs(full), sync()))
            params = sum(p.numel() for p in model.parameters()) / 1e6
            print(f"{name:<20} {f'{L}x{k}, {hw}x{hw}':>12} {f'{params:.1f}M {width}/{layers}/{heads}':>14} "
                  f"{step_flops / 1e9:>10.2f} {enc_flops / 1e9:>9.2f} {1 / t_model:>8.2f} {1 / (t_model + t_enc):>8.2f} "
                  f"{step_flops / t_model / 1e9:>8.1f} {100 * step_flops / t_model / 1e9 / mm:>7.0f}% "
                  f"{t_last / t_full:>9.2f}", flush=True)
    print("\nsteps/s: rewards from cached codes (transformer only); +encode: including the VQ-GAN encoder on "
          "each new frame. GFLOP/s and % matmul refer to the transformer.")


if __name__ == "__main__":
    main()
