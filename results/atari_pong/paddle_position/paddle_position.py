"""Where the agent's paddle goes in Pong: the agent's (green, right) paddle height per frame, from expert and
random episode files and from the training runs' eval GIFs (greedy eval episode of seed 10000 at each eval step).

The paddle is found by colour: pixels of rows 10-63 (below the masked score and the wall) and columns 52-59 whose
green channel exceeds red by 40. Its height y is the mean row of those pixels (64x64 frame, 0 = top).
The ball is the bright pixels (R + G + B > 500) of rows 10-58; `ball_corr` is the Pearson correlation of the
paddle's height with the ball's over the frames where the ball is in the right half (columns >= 32), coming
towards the paddle or leaving it. A still paddle has mean |dy| (per step) near 0 and ball_corr near 0; the expert
tracks the ball.

usage (from the repository root): python results/atari_pong/paddle_position/paddle_position.py OUT.json \
    [LABEL=RUN_DIR ...]    (each RUN_DIR's eval_<step>.gif files are read)
"""
import glob
import json
import os
import re
import sys

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "..")))
import eval as ev  # noqa: E402  (load_episode: the project's episode reader, errors name the file)


def paddle_y(frames):
    """[T, 64, 64, 3] uint8 -> [T] paddle height (NaN where no paddle pixel is found)."""
    x = frames.astype(int)[:, 10:, 52:60]
    green = x[..., 1] > x[..., 0] + 40
    rows = np.arange(10, 64)[None, :]
    has = green.any(2)  # [T, rows]
    with np.errstate(invalid="ignore"):
        return (has * rows).sum(1) / has.sum(1)


def ball_yx(frames):
    """[T, 64, 64, 3] uint8 -> [T, 2] ball row and column (NaN where no ball pixel is found)."""
    bright = frames.astype(int)[:, 10:59].sum(-1) > 500
    out = np.full((len(frames), 2), np.nan)
    for t, m in enumerate(bright):
        ys, xs = np.nonzero(m)
        if len(ys):
            out[t] = ys.mean() + 10, xs.mean()
    return out


def gif_frames(path):
    im = Image.open(path)
    out = []
    for i in range(im.n_frames):
        im.seek(i)
        out.append(np.asarray(im.convert("RGB")))
    return np.stack(out)


def stats(frames):
    y_all, ball = paddle_y(frames), ball_yx(frames)
    near = ~np.isnan(y_all) & (ball[:, 1] >= 32)
    ok = near.sum() > 2 and y_all[near].std() > 0 and ball[near, 0].std() > 0  # a paddle that never moves: no corr
    corr = float(np.corrcoef(y_all[near], ball[near, 0])[0, 1]) if ok else float("nan")
    y = y_all[~np.isnan(y_all)]
    return dict(frames=int(len(y)), ball_corr=round(corr, 3), ball_frames=int(near.sum()),
                y_mean=round(float(y.mean()), 2), y_std=round(float(y.std()), 2),
                y_p5=round(float(np.percentile(y, 5)), 1), y_p95=round(float(np.percentile(y, 95)), 1),
                mean_abs_dy=round(float(np.abs(np.diff(y)).mean()), 3))


def main(out_path, runs):
    result = {}
    for name, pattern in [("expert (held-out)", "data/pong/experts/atari_pong/test/*.npz"),
                          ("random", "data/pong/random/atari_pong/*/*.npz")]:
        files = sorted(glob.glob(pattern))
        if not files:
            raise SystemExit(f"no episode files match {pattern}: run the README's Pong data commands first")
        result[name] = stats(np.concatenate([ev.load_episode(f)[0] for f in files]))
    for spec in runs:
        label, run_dir = spec.split("=", 1)
        gifs = sorted((int(re.findall(r"\d+", os.path.basename(g))[0]), g)
                      for g in glob.glob(os.path.join(run_dir, "eval_*.gif")))
        if not gifs:
            raise SystemExit(f"no eval_<step>.gif in {run_dir}")
        for step, g in gifs:
            result[f"{label} @ {step}"] = stats(gif_frames(g))
    for k, v in result.items():
        print(f"{k:32s} " + "  ".join(f"{a} {b}" for a, b in v.items()))
    json.dump(result, open(out_path, "w"), indent=1)


if __name__ == "__main__":
    if len(sys.argv) < 2:
        raise SystemExit(__doc__)
    main(sys.argv[1], sys.argv[2:])
