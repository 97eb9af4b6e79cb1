"""Where the joint VIPER reward of the 490-episode reacher model pays: the scripted expert and zero actions on the
agent's 20 eval seeds (10000-10019), each beside its target's distance from the arm's base.

    MUJOCO_GL=egl python results/dmc_reacher_easy/reward_by_target/reward_by_target.py OUT.json

Per seed and behaviour: true return, VIPER return (nats), mean VIPER reward per step over the first 50 steps
(the expert is reaching) and over steps 100-500 (the expert holds the target). One thread, ~20 min."""
import json
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "..")))
import collect_expert_videos as cev  # noqa: E402
import eval as ev  # noqa: E402

torch.set_num_threads(1)
rm = ev.load_reward_model("runs/reacher/videogpt_4x4_500ep/videogpt.pt", cuda=False, task="dmc_reacher_easy")
env = cev.make_env("dmc_reacher_easy", seed=0)
expert = cev.scripted_policy("dmc_reacher_easy", env)
zero = ev.fixed_policies(env)["zero actions"]  # the reference table's zero actions
rows = []
for i in range(20):
    seed = 10000 + i
    out = dict(seed=seed)
    for name, pol in (("expert", lambda o, r: expert(o)), ("zero", zero)):
        if hasattr(expert, "reset"):
            expert.reset()
        frames, ret = ev.rollout(env, pol, np.random.default_rng(0), seed)
        if name == "expert":
            x, y = env.unwrapped._env.physics.named.model.geom_pos["target"][:2]
            out["dist"] = float(np.hypot(x, y))
        r = ev.episode_viper_rewards(rm, frames, "dmc_reacher_easy", "joint")
        out[name] = dict(ret=ret, viper=float(r.sum()), first50=float(r[:50].mean()), hold=float(r[100:].mean()))
    rows.append(out)
    print(json.dumps(out), flush=True)
json.dump(rows, open(sys.argv[1], "w"), indent=1)
