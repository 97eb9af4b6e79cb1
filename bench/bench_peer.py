"""Time of one training update of our Dreamer (train_viper_dreamer.py) beside the peer implementation
NM512/dreamerv3-torch, at the same model size, batch, sequence length and 64x64 images, on the CPU.

An update = world model step + imagination (15 steps from every replayed state) + actor step + critic step,
on one batch of random frames: ours `Dreamer.train_step`, the peer's own `Dreamer._train` (dreamer.py:
`WorldModel._train` + `ImagBehavior._train`), both given the same numpy batch (uint8 images, actions in
[-1, 1], rewards, is_first, is_terminal), data loading excluded. Task-reward oracle on both sides: no
Plan2Explore. fp32, one torch thread, no compile / AMP. The cores are shared, so the two are timed
interleaved in one process (ours, peer, then peer, ours, ...) after warm-up, and medians are reported,
wall time and CPU time of this process.

The peer's configuration is its `defaults` + `dmc_vision` (configs.yaml) with the size's settings set
(`peer_config` below lists them). Its env wrappers are stubbed (no environment is built); it needs
ruamel.yaml, installed aside, not in the project:

    mkdir -p /work/peer/dreamerv3-torch && git --git-dir=<fetched bare repo of NM512/dreamerv3-torch> \\
        archive HEAD | tar -x -C /work/peer/dreamerv3-torch
    .venv/bin/python -m pip install --target /work/peer/site ruamel.yaml
    PYTHONPATH=/work/peer/site .venv/bin/python bench/bench_peer.py --peer-dir /work/peer/dreamerv3-torch \\
        --sizes cpu --reps 20    # ~30 s; `--sizes S --reps 5`: ~5 min (an S update takes 10-25 s on one thread)
"""
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch is imported
import argparse  # noqa: E402
import contextlib  # noqa: E402
import pathlib  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import types  # noqa: E402
import warnings  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train_viper_dreamer as td  # noqa: E402
from bench_dreamer import random_replay  # noqa: E402

BATCH = {"cpu": (4, 32), "S": (16, 64)}  # our CPU recipe's batch; the paper's for S
ACT_DIM = 1  # continuous actions of dmc_cartpole_balance (our recipe's task)


def import_peer(peer_dir):
    if not (peer_dir / "dreamer.py").is_file():
        sys.exit(f"no dreamer.py in {peer_dir}: get NM512/dreamerv3-torch there first (e.g. fetch the repo, then "
                 f"`git --git-dir=<bare repo> archive HEAD | tar -x -C {peer_dir}`)")
    try:
        import ruamel.yaml  # noqa: F401  (dreamer.py imports it)
    except ImportError:
        sys.exit("the peer needs ruamel.yaml: `pip install --target /work/peer/site ruamel.yaml`, then run with "
                 "PYTHONPATH=/work/peer/site")
    sys.modules["envs.wrappers"] = types.ModuleType("envs.wrappers")  # env wrappers need gym: not used here
    sys.path.insert(0, str(peer_dir))
    warnings.filterwarnings("ignore", category=FutureWarning)  # its torch.cuda.amp calls (disabled on CPU)
    import dreamer
    return dreamer


def peer_config(peer_dir, size, batch_size, batch_length, act_dim):
    """The peer's `defaults` + `dmc_vision`, merged as its dreamer.py does, then the size's settings."""
    from ruamel.yaml import YAML
    configs = YAML(typ="safe", pure=True).load((peer_dir / "configs.yaml").read_text())
    cfg = {}

    def merge(base, update):
        for k, v in update.items():
            if isinstance(v, dict) and k in base:
                merge(base[k], v)
            else:
                base[k] = v

    for name in ["defaults", "dmc_vision"]:
        merge(cfg, configs[name])
    s = td.SIZES[size]
    merge(cfg, dict(
        dyn_deter=s["deter"], dyn_hidden=s["units"], units=s["units"], dyn_stoch=s["stoch"],
        dyn_discrete=s["classes"], encoder=dict(cnn_depth=s["depth"]), decoder=dict(cnn_depth=s["depth"]),
        actor=dict(layers=s["layers"]), critic=dict(layers=s["layers"]), reward_head=dict(layers=s["layers"]),
        cont_head=dict(layers=s["layers"]), batch_size=batch_size, batch_length=batch_length, size=(64, 64),
        expl_behavior="greedy", device="cpu", compile=False, precision=32, num_actions=act_dim))
    return argparse.Namespace(**cfg)


def make_peer(dreamer, config):
    from gymnasium import spaces
    flag = spaces.Box(0, 1, (), dtype=bool)
    obs_space = spaces.Dict({"image": spaces.Box(0, 255, (64, 64, 3), dtype=np.uint8), "is_first": flag,
                             "is_last": flag, "is_terminal": flag})
    act_space = spaces.Box(-1.0, 1.0, (config.num_actions,), dtype=np.float32)
    agent = dreamer.Dreamer(obs_space, act_space, config, types.SimpleNamespace(step=0), dataset=None)
    return agent.to("cpu").requires_grad_(False)  # as its main() does


def timed(fn):
    w, c = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - w, time.process_time() - c


def bench(size, reps, peer_dir, dreamer, rng):
    B, L = BATCH[size]
    act_dim, discrete = ACT_DIM, False
    replay = random_replay(rng, act_dim, 1000, density=False)  # the env reward: ours calls it `task`
    torch.manual_seed(0)
    ours = td.Dreamer(td.Args(**td.preset(size)), act_dim, discrete)
    with contextlib.redirect_stdout(open(os.devnull, "w")):  # the peer prints its shapes and optimiser sizes
        peer = make_peer(dreamer, peer_config(peer_dir, size, B, L, act_dim))
    run = {"ours": lambda b: ours.train_step(b), "peer": lambda b: peer._train(b)}
    params = {"ours": ours, "peer": peer}
    params = {k: sum(p.numel() for p in m.parameters()) / 1e6 for k, m in params.items()}
    times = {k: [] for k in run}
    for i in range(reps + 1):  # the first round is the warm-up
        batch = replay.sample(B, L, rng)
        batch["reward"] = batch["task"]  # the peer's name; ours ignores it
        for k in (["ours", "peer"] if i % 2 == 0 else ["peer", "ours"]):
            t = timed(lambda: run[k]({n: v.copy() for n, v in batch.items()}))
            if i > 0:
                times[k].append(t)
    med = {k: [statistics.median(t[j] for t in v) for j in (0, 1)] for k, v in times.items()}
    return B, L, params, med


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--peer-dir", required=True, type=pathlib.Path, help="checkout of NM512/dreamerv3-torch")
    p.add_argument("--reps", type=int, default=5, help="timed updates of each side per size (after 1 warm-up)")
    p.add_argument("--sizes", nargs="+", default=["cpu"], choices=list(BATCH))
    args = p.parse_args()
    dreamer = import_peer(args.peer_dir.resolve())
    torch.set_num_threads(1)
    td.keep_freed_memory()  # our training script's malloc setting; in one process it applies to both sides
    rng = np.random.default_rng(0)
    print(f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}, threads "
          f"{torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores, "
          f"{args.reps} timed updates each (medians)\n")
    print("| size | batch | params ours / peer | ours s/update | peer s/update | ratio ours/peer | "
          "CPU s ours / peer | CPU ratio |")
    print("|---|---|---|---|---|---|---|---|")
    for size in args.sizes:
        B, L, params, med = bench(size, args.reps, args.peer_dir.resolve(), dreamer, rng)
        (ow, oc), (pw, pc) = med["ours"], med["peer"]
        print(f"| {size} | {B}x{L} | {params['ours']:.2f}M / {params['peer']:.2f}M | {ow:.3f} | {pw:.3f} | "
              f"{ow / pw:.2f} | {oc:.3f} / {pc:.3f} | {oc / pc:.2f} |", flush=True)


if __name__ == "__main__":
    main()
