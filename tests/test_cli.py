"""The command lines themselves: every script's --help, and a tiny run through the real CLI, so that a tyro
upgrade or a broken flag fails here and not in a user's terminal."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MUJOCO_GL": os.environ.get("MUJOCO_GL", "egl")}


def cli(*args, timeout=300):
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=ENV)


@pytest.mark.parametrize("script, flag", [
    ("collect_expert_videos.py", "--num-episodes"), ("train_vqgan.py", "--codebook-size"),
    ("train_videogpt.py", "--seq-len"), ("train_viper_dreamer.py", "--reference-returns"),
    ("eval.py reward", "--degraded-dir"), ("eval.py reference", "--episodes"), ("eval.py heatmap", "--frames"),
    ("eval.py agent", "--sample"), ("eval.py episodes", "--smooth"), ("eval.py curves", "--reference"),
    ("eval.py samples", "--context-frames"),
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


def test_sigint_to_a_running_agent_saves_and_exits_130(tmp_path):
    import signal
    import time

    import torch

    out = tmp_path / "agent"
    proc = subprocess.Popen([sys.executable, "train_viper_dreamer.py", "--total-steps", "100000", "--prefill", "40",
                             "--batch-length", "16", "--train-ratio", "16", "--output-dir", str(out)],
                            cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not (out / "episodes.csv").exists() and time.time() < deadline:  # written once the loop starts
            time.sleep(0.5)
        time.sleep(5)  # past the prefill, into the updates
        proc.send_signal(signal.SIGINT)
        err = proc.communicate(timeout=120)[1]
    finally:
        proc.kill()
    assert proc.returncode == 130, err[-2000:]
    assert "interrupted at step" in err and "Traceback" not in err
    saved = torch.load(out / "agent.pt", weights_only=False)["counters"]
    assert saved["step"] > 40 and saved["updates"] > 0
