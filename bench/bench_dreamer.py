"""Benchmark of train_viper_dreamer.py on this machine: updates/s, env steps/s, and the projected time of
100k env steps on dmc_cartpole_balance, for the task oracle and for VIPER (the density reward, its default,
and with --disagreement-scale 1, the official Plan2Explore weight), with each update split into its parts and
VIPER's reward scoring per env step.

An update = world model + imagination + actor + critic on one replayed batch (random frames: speed does
not depend on content). Env steps/s = the acting loop alone (render + policy forward), no training.
Both run with torch threads = 1 (the script's default): in fp32 on CPU, or with `cuda` on the GPU with the
training script's bf16 autocast. CPU seconds are reported next to wall seconds because the cores are
shared: wall time is what this moment's load allowed.

    python bench/bench_dreamer.py            # ~2-3 min on 2 CPU cores
    python bench/bench_dreamer.py cuda       # on a GPU
"""
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train_viper_dreamer as td  # noqa: E402

# name, size, batch_size, batch_length, train_ratio (replayed steps per env step), timed updates, reward flags
ORACLE, VIPER = {}, dict(reward="viper", reward_model="bench")
VIPER_DISAG = dict(VIPER, disagreement_scale=1.0)
CONFIGS = [
    ("cpu, recipe", "cpu", 4, 32, 64.0, 8, ORACLE),
    ("VIPER cpu, recipe", "cpu", 4, 32, 64.0, 8, VIPER),
    ("VIPER cpu, + disag", "cpu", 4, 32, 64.0, 8, VIPER_DISAG),
    ("cpu, batch 8", "cpu", 8, 32, 64.0, 6, ORACLE),
    ("cpu, batch 16", "cpu", 16, 32, 64.0, 6, ORACLE),
    ("cpu, paper batch", "cpu", 16, 64, 32.0, 3, ORACLE),
    ("S, paper batch", "S", 16, 64, 512.0, 1, ORACLE),
    ("VIPER S, + disag", "S", 16, 64, 512.0, 1, VIPER_DISAG),
]
ENV_ID, TOTAL = "dmc_cartpole_balance", 100_000
PARTS = ["world model", "ensemble", "imagination", "actor", "critics"]


class PartTimer:
    """Wall seconds per part of an update, by wrapping the agent's methods (forward) and `step` (backward and
    Adam, attributed by optimiser). The disagreement's forward counts for the ensemble; its share of the
    actor's backward (the gradient flows through the ensemble) stays with the actor."""

    def __init__(self):
        self.seconds = dict.fromkeys(PARTS, 0.0)
        self.saved = []

    def wrap(self, owner, name, part_of):
        real = getattr(owner, name)

        def timed_call(*a, **k):
            t = time.perf_counter()
            out = real(*a, **k)
            self.seconds[part_of(*a)] += time.perf_counter() - t
            return out

        self.saved.append((owner, name, real))
        setattr(owner, name, timed_call)

    def __enter__(self):
        d = td.Dreamer
        self.wrap(d, "world_model_loss", lambda *a: "world model")
        self.wrap(d, "ensemble_loss", lambda *a: "ensemble")
        self.wrap(td.Ensemble, "disagreement", lambda *a: "ensemble")
        self.wrap(d, "imagine", lambda *a: "imagination")
        self.wrap(d, "critic_loss", lambda *a: "critics")
        self.agent = None

        def part_of_step(opt, *a):
            ag = self.agent
            return {id(ag.model_opt): "world model", id(ag.actor_opt): "actor",
                    id(ag.ensemble_opt): "ensemble"}.get(id(opt), "critics")

        self.wrap(td, "apply_gradients", part_of_step)
        return self

    def __exit__(self, *exc):
        for owner, name, real in reversed(self.saved):
            setattr(owner, name, real)


def bench_reward_model():
    """A random-weight reward model of the CPU recipe's size (run.sh: VQ-GAN 16 x (1 2 4 4), 256 codes;
    VideoGPT 4 frames x 8 x 8 tokens, 128 wide, 4 layers): scoring costs the same whatever the weights."""
    torch.manual_seed(0)
    vqgan = td.VQEncoder(64, 16, (1, 2, 4, 4), 1, 256, 64).eval()  # the agent holds the encoder half only
    model = td.VideoGPT(256, 4, vqgan.token_hw, 128, 4, 4, 512, 0.1, num_classes=1)
    return td.RewardModel(model, vqgan, 4, 1, {ENV_ID: 0})


def random_replay(rng, act_dim, steps, density=True):
    """A replay of `steps` random frames, actions and rewards in 500-step episodes (an update's speed does not
    depend on content); with `density`, VIPER's reward field too. Shared by the bench scripts."""
    replay = td.Replay(2000, (64, 64, 3), act_dim, ["task", "density"] if density else ["task"])
    for t in range(steps):
        step = dict(image=rng.integers(0, 256, (64, 64, 3), dtype=np.uint8), action=rng.uniform(-1, 1, act_dim),
                    task=float(rng.random()))
        if density:
            step["density"] = -float(rng.random())
        replay.add(**step, is_first=t % 500 == 0, is_terminal=False)
    return replay


def timed(fn, n):
    fn()  # warm-up
    w, c = time.perf_counter(), time.process_time()
    for _ in range(n):
        fn()
    return (time.perf_counter() - w) / n, (time.process_time() - c) / n


def main():
    device = torch.device(sys.argv[1] if len(sys.argv) > 1 else "cpu")
    reps = 10 if device.type == "cuda" else 1  # more timed updates where they are cheap
    torch.set_num_threads(1)
    td.keep_freed_memory()
    rng = np.random.default_rng(0)
    env = td.make_env(ENV_ID, 0)
    act_dim, discrete = td.action_spec(env)
    replay = random_replay(rng, act_dim, 1000)
    # VIPER's reward scoring per env step (encode the new frame, score its window), as the agent does it
    labeler = td.StepRewards(td.Args(env_id=ENV_ID, **{**td.preset(reward="viper"), **VIPER}), bench_reward_model())
    frames = rng.integers(0, 256, (60, 64, 64, 3), dtype=np.uint8)
    labeler.reset(frames[0])
    score_wall, score_cpu = timed(lambda: [labeler(f, 0.0) for f in frames[1:]], 1)
    score_wall, score_cpu = score_wall / 59, score_cpu / 59
    print(f"{ENV_ID}, torch {torch.__version__}, device {device}"
          f"{' (' + torch.cuda.get_device_name() + ')' if device.type == 'cuda' else ''}, threads {torch.get_num_threads()}, load average "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores\n")
    header = (f"{'config':<18} {'batch':>6} {'params':>7} {'upd/s':>6} {'CPU s/upd':>9} {'env st/s':>8} "
              f"{'ratio':>5} {'updates':>7} {'100k steps, h':>13}")
    print(header + "\n" + "-" * len(header))
    parts = {}
    for name, size, B, L, ratio, n, flags in CONFIGS:
        torch.manual_seed(0)
        agent = td.Dreamer(td.Args(**{**td.preset(size, flags.get("reward", "task")), **flags}), act_dim, discrete).to(device)
        params = sum(p.numel() for p in agent.parameters()) / 1e6
        with PartTimer() as timer:
            timer.agent = agent
            upd_wall, upd_cpu = timed(lambda: agent.train_step(replay.sample(B, L, rng)), n * reps)  # .item(): synced
        parts[name] = {k: v / (n * reps + 1) for k, v in timer.seconds.items()}  # +1: the warm-up update
        obs, _ = env.reset(seed=0)
        state = {"obs": obs, "carry": None}

        def act(k=50):
            for _ in range(k):
                action, state["carry"] = agent.policy(state["obs"], state["carry"], explore=True)
                state["obs"], *_ = env.step(td.env_action(action, discrete))

        step_wall, step_cpu = timed(act, 4)
        step_wall, step_cpu = step_wall / 50, step_cpu / 50
        if flags:  # VIPER scores every new frame as it arrives
            step_wall += score_wall
        updates = (TOTAL - td.Args().prefill) * ratio / (B * L)
        hours = (TOTAL * step_wall + updates * upd_wall) / 3600
        print(f"{name:<18} {B:>3}x{L:<2} {params:>6.1f}M {1 / upd_wall:>6.2f} {upd_cpu:>9.2f} {1 / step_wall:>8.0f} "
              f"{ratio:>5.0f} {updates:>7.0f} {hours:>13.2f}", flush=True)
    print("\n100k steps = acting (+ VIPER's reward scoring) + updates at these rates (evaluation, ~5% more, not "
          "included).")
    print(f"VIPER reward scoring (CPU recipe model): {1000 * score_wall:.1f} ms per env step "
          f"({1000 * score_cpu:.1f} CPU ms)\n")
    print("Wall ms per update, by part (forward, and backward + Adam of that part's optimiser):")
    head = f"{'config':<18} " + " ".join(f"{p:>11}" for p in PARTS) + f" {'total':>8}"
    print(head + "\n" + "-" * len(head))
    for name, sec in parts.items():
        print(f"{name:<18} " + " ".join(f"{1000 * sec[p]:>11.1f}" for p in PARTS) + f" {1000 * sum(sec.values()):>8.1f}")
    oracle, viper = parts["cpu, recipe"], parts["VIPER cpu, recipe"]
    print(f"\nVIPER / oracle update (CPU recipe, parts' sum): {sum(viper.values()) / sum(oracle.values()):.2f}")


if __name__ == "__main__":
    main()
