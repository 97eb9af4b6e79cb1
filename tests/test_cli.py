"""The command lines themselves: every script's --help, and a tiny run through the real CLI, so that a tyro
upgrade or a broken flag fails here and not in a user's terminal."""
import functools
import json
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MUJOCO_GL": os.environ.get("MUJOCO_GL", "egl")}


def cli(*args, timeout=300):
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=ENV)


@functools.lru_cache(maxsize=None)
def help_defaults(*args):
    """{flag: the default its --help prints} (tyro's box, unwrapped by a wide COLUMNS)."""
    r = subprocess.run([sys.executable, *args, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**ENV, "COLUMNS": "1000"})
    assert r.returncode == 0, r.stderr
    entries, flag = {}, None
    for line in r.stdout.splitlines():
        inner = line.strip().strip("│")  # a flag starts at the box's margin; its help text is indented
        body = inner.strip()
        if body.startswith(("╭", "╰")):  # a group's frame
            flag = None
        elif inner.startswith(" --"):
            flag = body.split()[0].rstrip(",")
            entries[flag] = body
        elif flag and body:
            entries[flag] += " " + body
    return {f: found[-1] for f, text in entries.items() if (found := re.findall(r"\(default: ([^)]*)\)", text))}


@pytest.mark.parametrize("script, flag", [
    ("collect_expert_videos.py", "--num-episodes"), ("train_vqgan.py", "--codebook-size"),
    ("train_videogpt.py", "--seq-len"), ("train_viper_dreamer.py", "--reference-returns"),
    ("eval.py reward", "--degraded-dir"), ("eval.py reference", "--episodes"), ("eval.py heatmap", "--frames"),
    ("eval.py agent", "--sample"), ("eval.py episodes", "--smooth"), ("eval.py curves", "--reference"),
    ("eval.py samples", "--context-frames"), ("eval.py tokenizer", "--min-brightness"),
    # one name per concept: the agent's --reward-mode is the same flag where eval.py scores its reward
    ("train_viper_dreamer.py", "--reward-mode"), ("eval.py reward", "--reward-mode"),
    ("eval.py reference", "--reward-mode"), ("eval.py replay", "--reward-mode"),
])
def test_help_lists_the_flags(script, flag):
    r = cli(*script.split(), "--help")
    assert r.returncode == 0, r.stderr
    assert flag in r.stdout


def test_agent_runs_and_resumes_through_the_cli(tmp_path):
    out = tmp_path / "agent"
    flags = ["train_viper_dreamer.py", "--env-id", "dmc_cartpole_balance", "--total-steps", "80", "--prefill", "40",
             "--batch-length", "16", "--train-ratio", "16", "--eval-every", "80", "--eval-episodes", "1",
             "--output-dir", str(out)]
    r = cli(*flags)
    assert r.returncode == 0, r.stderr[-2000:]
    info = json.loads((out / "run.json").read_text())
    assert info["env_steps"] == 80 and info["command"].startswith("python train_viper_dreamer.py --env-id")
    r = cli(*flags)  # the same folder again without --resume: refused, nothing overwritten
    assert r.returncode != 0 and "--resume" in r.stderr
    r = cli(*flags[:3], "--total-steps", "96", *flags[5:], "--resume")
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads((out / "run.json").read_text())["env_steps"] == 96


def test_bad_flag_is_named():
    r = cli("train_viper_dreamer.py", "--batch-sise", "4")
    assert r.returncode != 0 and "--batch-sise" in r.stderr


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])  # Ctrl-C, and `kill` (a scheduler's preemption)
def test_sigint_or_sigterm_to_a_running_agent_saves_and_exits(tmp_path, sig):
    import re
    import signal
    import time

    import torch

    out, log = tmp_path / "agent", tmp_path / "stderr.txt"
    with open(log, "w") as err_file:
        proc = subprocess.Popen([sys.executable, "train_viper_dreamer.py", "--total-steps", "100000", "--prefill", "40",
                                 "--batch-length", "16", "--train-ratio", "16", "--output-dir", str(out)],
                                cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=err_file, text=True)
        try:
            deadline = time.time() + 300
            # the progress bar shows upd=N: wait for the first update, however loaded the machine is
            while not re.search(r"upd=[1-9]", log.read_text()) and proc.poll() is None and time.time() < deadline:
                time.sleep(0.5)
            proc.send_signal(getattr(signal, sig))
            proc.wait(timeout=120)
        finally:
            proc.kill()
    err = log.read_text()
    assert proc.returncode == 128 + getattr(signal, sig), err[-2000:]  # 130, 143: the shell's status
    assert "interrupted at step" in err and "Traceback" not in err
    saved = torch.load(out / "agent.pt", weights_only=False)["counters"]
    assert saved["step"] > 40 and saved["updates"] > 0


# flags whose default really is None (an optional path or number), as their --help says
NONE_DEFAULTS = {
    "train_viper_dreamer.py": set(),  # its optional paths show PATH and what their absence means
    "collect_expert_videos.py": {"--agent-checkpoint", "--max-steps"},
    "train_vqgan.py": {"--perceptual-weights", "--output-dir"},
    "train_videogpt.py": {"--tasks", "--random-data-dir", "--output-dir"},
    "eval.py reward": {"--tasks", "--max-steps"}, "eval.py agent": set(), "eval.py reference": set(),
    "eval.py samples": {"--task", "--num-frames"}, "eval.py heatmap": set(), "eval.py episodes": {"--reference"},
    "eval.py curves": {"--reference", "--random-return", "--expert-return", "--target"},
    "eval.py tokenizer": {"--tasks"}, "eval.py replay": set(),
}


@pytest.mark.parametrize("script", sorted(NONE_DEFAULTS))
def test_help_prints_real_defaults(script):
    """No flag stands for 'depends on something else' with a None default: --help shows every real value."""
    defaults = help_defaults(*script.split())
    if not script.startswith("eval.py"):  # eval.py's --seed 10000 is the first episode's env seed, not a run seed
        assert defaults["--seed"] == "1"
    assert {f for f, v in defaults.items() if v == "None"} == NONE_DEFAULTS[script]


def shown(value):
    return " ".join(map(str, value)) if isinstance(value, tuple) else str(value)


@pytest.mark.parametrize("script", ["train_vqgan.py", "train_videogpt.py"])
def test_size_presets_are_the_help_defaults(script):
    mod = __import__(script[:-3])
    assert set(mod.PRESETS) == {"cpu", "paper"} and set(mod.PRESETS["cpu"]) == set(mod.PRESETS["paper"])
    assert all(mod.PRESETS["cpu"][k] != mod.PRESETS["paper"][k] for k in mod.PRESETS["cpu"])  # only what differs
    assert {k: getattr(mod.Args(), k) for k in mod.PRESETS["cpu"]} == mod.PRESETS["cpu"]  # Args() is the cpu recipe
    for size, argv in (("cpu", (script,)), ("cpu", (script, "--size", "cpu")), ("paper", (script, "--size", "paper")),
                       ("paper", (script, "--size=paper"))):
        defaults = help_defaults(*argv)
        assert defaults["--size"] == size
        assert {k: defaults["--" + k.replace("_", "-")] for k in mod.PRESETS[size]} == \
            {k: shown(v) for k, v in mod.PRESETS[size].items()}


def test_size_paper_and_explicit_flags_through_the_cli(tmp_path):
    """--size paper sets the paper values; a flag given on the command line wins over its preset value."""
    import numpy as np
    import torch

    import train_videogpt
    import train_vqgan

    rng = np.random.default_rng(0)
    for split, n in (("train", 2), ("test", 1)):
        os.makedirs(tmp_path / "data" / "dmc_a" / split)
        for i in range(n):
            np.savez(tmp_path / "data" / "dmc_a" / split / f"{i}.npz",
                     video=rng.integers(0, 256, (20, 16, 16, 3), dtype=np.uint8))
    small = ["--size", "paper", "--data-dir", str(tmp_path / "data"), "--batch-size", "2", "--total-steps", "1",
             "--no-cuda", "--threads", "1"]
    vq_overrides = dict(base_channels=8, codebook_size=16, embed_dim=8)
    r = cli("train_vqgan.py", *small, "--image-size", "16", "--base-channels", "8", "--codebook-size", "16",
            "--embed-dim", "8", "--eval-frames", "4", "--output-dir", str(tmp_path / "vq"))
    assert r.returncode == 0, r.stderr[-2000:]
    saved = torch.load(tmp_path / "vq" / "vqgan.pt", weights_only=False)["args"]
    expected = {**train_vqgan.PRESETS["paper"], **vq_overrides, "batch_size": 2,
                "total_steps": 1, "size": "paper", "threads": 1, "cuda": False}
    assert {k: saved[k] for k in expected} == expected

    r = cli("train_videogpt.py", *small, "--vqgan", str(tmp_path / "vq" / "vqgan.pt"), "--width", "32",
            "--num-layers", "1", "--num-heads", "2", "--mlp-dim", "64", "--eval-clips", "2",
            "--output-dir", str(tmp_path / "vgpt"))
    assert r.returncode == 0, r.stderr[-2000:]
    saved = torch.load(tmp_path / "vgpt" / "videogpt.pt", weights_only=False)["args"]
    expected = {**train_videogpt.PRESETS["paper"], "width": 32, "num_layers": 1, "num_heads": 2, "mlp_dim": 64,
                "eval_clips": 2, "batch_size": 2, "total_steps": 1, "size": "paper", "threads": 1, "cuda": False}
    assert {k: saved[k] for k in expected} == expected and saved["seq_len"] == 16


def test_a_bad_size_is_named():
    r = cli("train_vqgan.py", "--size", "huge")
    assert r.returncode != 0 and "huge" in r.stderr
