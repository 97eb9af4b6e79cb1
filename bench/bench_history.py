"""Is today's update faster than an earlier version's? One oracle update at the CPU recipe, old vs now.

Issue #13 asks for the oracle update to be >= 1.5x faster than before the issue. This script answers it in one
process: it loads train_viper_dreamer.py as it was at a git revision (default 774e911, the last commit
before #13's first change) beside the working tree's, builds both oracles at the CPU recipe (size `cpu`, batch
4x32, seed 0), and times their updates alternately on the same replayed batches, so that the load of other
jobs falls on both alike. Medians of CPU seconds per update, one thread.

    python bench/bench_history.py                 # ~1 min
    python bench/bench_history.py --compile       # and today's with --compile (2-5 min of compiling first)
    python bench/bench_history.py --rev HEAD~5 --reps 30
"""
import argparse
import importlib.util
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import train_viper_dreamer as td  # noqa: E402
from bench_dreamer import random_replay  # noqa: E402

PRE_ISSUE = "774e911"  # 2026-11-29, before bench_dreamer's VIPER rows (59c5e11), #13's first change


def load_revision(rev, folder):
    """train_viper_dreamer.py at `rev` as a module of its own (its copy lives in `folder`)."""
    try:
        source = subprocess.run(["git", "show", f"{rev}:train_viper_dreamer.py"], cwd=ROOT, check=True,
                                capture_output=True, text=True).stdout
    except subprocess.CalledProcessError as e:
        sys.exit(f"cannot read train_viper_dreamer.py at revision {rev!r}: {e.stderr.strip()}")
    path = os.path.join(folder, "train_viper_dreamer_old.py")
    with open(path, "w") as f:
        f.write(source)
    spec = importlib.util.spec_from_file_location("train_viper_dreamer_old", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rev", default=PRE_ISSUE, help="git revision to compare the working tree with")
    p.add_argument("--reps", type=int, default=20, help="timed updates of each version (alternating)")
    p.add_argument("--compile", action="store_true", help="also time today's update with --compile")
    a = p.parse_args()
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    env = td.make_env("dmc_cartpole_balance", 0)
    act_dim, discrete = td.action_spec(env)
    replay = random_replay(rng, act_dim, 1000, density=False)
    batches = [replay.sample(4, 32, rng) for _ in range(a.reps + 2)]
    with tempfile.TemporaryDirectory() as folder:
        old = load_revision(a.rev, folder)
        torch.manual_seed(0)
        agents = {"then": old.Dreamer(old.Args(), act_dim, discrete)}  # its defaults were the oracle recipe
        torch.manual_seed(0)
        agents["now"] = td.Dreamer(td.Args(**td.preset("cpu", "task")), act_dim, discrete)
        if a.compile:
            torch.manual_seed(0)
            agents["now, --compile"] = td.compile_update(td.Dreamer(td.Args(**td.preset("cpu", "task")), act_dim,
                                                                    discrete))
    # the old oracle's reward head may read the env reward under another field name
    old_fields = {k: "task" for k in agents["then"].heads}
    cpu = {name: [] for name in agents}
    for i, batch in enumerate(batches):  # the first update of a compiled agent compiles: a warm-up
        for name, agent in agents.items():
            b = dict(batch, **{k: batch[v] for k, v in old_fields.items()}) if name == "then" else batch
            c = time.process_time()
            agent.train_step(b)
            if i >= 2:  # two warm-up updates each
                cpu[name].append(time.process_time() - c)
    then = statistics.median(cpu["then"])
    print(f"oracle update at the CPU recipe (4x32, size cpu), one thread, torch {torch.__version__}, "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores, medians of {a.reps}:")
    print(f"  {a.rev:<16} {1000 * then:8.1f} CPU ms")
    for name in list(agents)[1:]:
        now = statistics.median(cpu[name])
        print(f"  {name:<16} {1000 * now:8.1f} CPU ms   {then / now:.2f}x faster than {a.rev}")


if __name__ == "__main__":
    main()
