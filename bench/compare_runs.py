"""Are two agent runs the same run? Compares eval.csv and episodes.csv (without wall times), every tensorboard
scalar except the wall-clock rates, and every tensor of agent.pt, bit for bit.

Runs of train_viper_dreamer.py on one thread with the same seed and flags are deterministic on a given CPU,
so this proves that a refactor or a speed-up changes nothing the agent learns (run the same short command
before and after the change; older checkpoints and tags are read with today's names):

    python train_viper_dreamer.py --total-steps 2000 --prefill 1000 --eval-every 1000 --save-every 1000 \
        --eval-episodes 1 --log-every 250 --seed 3 --output-dir runs/before   # (and --reward viper ...)
    python bench/compare_runs.py runs/before runs/after
"""

import csv
import glob
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train_viper_dreamer as td  # noqa: E402

RATES = ("SPS", "per_second", "time_share")  # wall-clock scalars: differ between any two runs


def rows(path, drop):
    with open(path) as f:
        return [[v for k, v in r.items() if k not in drop] for r in csv.DictReader(f)]


def scalars(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(glob.glob(os.path.join(run, "events.out.tfevents.*"))[0], size_guidance={"scalars": 0})
    acc.Reload()
    def today(tag):  # tags of before the reward terms had one name each
        return "loss/task" if tag == "loss/reward" else tag.replace("disagreement", "disag").replace("disag", "disagreement")

    return {today(t): [(e.step, e.value) for e in acc.Scalars(t)] for t in acc.Tags()["scalars"]
            if not any(r in t for r in RATES)}


def main(a, b):
    same = True
    for name in ("eval.csv", "episodes.csv"):
        ra, rb = rows(os.path.join(a, name), {"wall_time_s"}), rows(os.path.join(b, name), {"wall_time_s"})
        print(f"{name:13s} {'same' if ra == rb else 'DIFFERENT'} ({len(ra)} rows)")
        same &= ra == rb
    sa, sb = scalars(a), scalars(b)
    differ = sorted(t for t in sa.keys() & sb.keys() if sa[t] != sb[t])
    print(f"{'scalars':13s} {'same' if not differ else 'DIFFERENT: ' + ', '.join(differ)} ({len(sa.keys() & sb.keys())} "
          f"tags; only in one run: {sorted(sa.keys() ^ sb.keys())})")
    same &= not differ and sa.keys() == sb.keys()
    ca, cb = (td.upgrade_checkpoint(torch.load(os.path.join(r, "agent.pt"), weights_only=False))["agent"] for r in (a, b))
    differ = sorted(k for k in ca.keys() & cb.keys() if not torch.equal(ca[k], cb[k]))
    print(f"{'agent.pt':13s} {'same' if not differ else 'DIFFERENT: ' + ', '.join(differ[:5])} ({len(ca)} tensors; "
          f"only in one run: {sorted(ca.keys() ^ cb.keys())})")
    same &= not differ and ca.keys() == cb.keys()
    print("BIT-IDENTICAL" if same else "NOT IDENTICAL")
    return same


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit("usage: python bench/compare_runs.py RUN_DIR_A RUN_DIR_B")
    raise SystemExit(0 if main(*sys.argv[1:]) else 1)
