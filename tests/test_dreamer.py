"""Tests of train_viper_dreamer.py: the DreamerV3 pieces, and short end-to-end runs on DMC and Pong."""
import csv
import os
import re

import numpy as np
import pytest
import torch

import train_viper_dreamer as td




def tiny_args(tmp, env_id, **kw):
    base = dict(env_id=env_id, size="cpu", total_steps=300, prefill=100, batch_size=4, batch_length=16,
                train_ratio=8.0, eval_every=300, eval_episodes=1, save_every=300, log_every=100,
                replay_capacity=1000, output_dir=str(tmp), seed=0)
    base.update(kw)
    return td.Args(**base)


def read_eval(path):
    with open(path) as f:
        return list(csv.reader(f))


# --- math ------------------------------------------------------------------------------------
def test_symlog_symexp_inverse():
    x = torch.tensor([-1e6, -123.4, -1.0, -1e-3, 0.0, 1e-3, 0.5, 1.0, 42.0, 1e6], dtype=torch.float64)
    torch.testing.assert_close(td.symexp(td.symlog(x)), x)
    torch.testing.assert_close(td.symlog(x), torch.sign(x) * torch.log(1 + x.abs()))  # compresses large values


def test_twohot_round_trip():
    bins = torch.linspace(-20, 20, td.BINS, dtype=torch.float64)
    y = torch.tensor([-1e4, -3.3, -0.2, 0.0, 0.123, 1.0, 7.5, 999.0], dtype=torch.float64)
    w = td.twohot(td.symlog(y), bins)
    assert w.shape == (8, td.BINS)
    torch.testing.assert_close(w.sum(-1), torch.ones(8, dtype=torch.float64))
    assert ((w > 0).sum(-1) <= 2).all()
    torch.testing.assert_close(td.symexp((w * bins).sum(-1)), y)  # decode(encode(y)) == y
    # outside the bin range: all weight on the edge bin
    far = td.twohot(torch.tensor([-50.0, 50.0]), bins.float())
    assert far[0, 0] == 1 and far[1, -1] == 1
    # the TwoHot distribution: its mean decodes the two-hot it is peaked on; log_prob is maximal there
    logits = torch.log(w.float().clamp_min(1e-12))
    dist = td.TwoHot(logits)
    torch.testing.assert_close(dist.mean, y.float(), rtol=1e-4, atol=1e-4)
    assert (dist.log_prob(y.float())[1:-1] > dist.log_prob(y.float() + 5)[1:-1]).all()


def test_zero_init_heads_predict_zero():
    head = td.TwoHotHead(10, 8, 1)
    torch.testing.assert_close(head(torch.randn(5, 10)).mean, torch.zeros(5), atol=1e-6, rtol=0)


def test_return_normaliser_percentile_ema():
    norm = td.ReturnNorm()
    ret = torch.arange(101, dtype=torch.float32)  # P5 = 5, P95 = 95
    norm.update(ret)
    torch.testing.assert_close(norm.lo, torch.tensor(0.05))  # EMA from 0 with decay 0.99
    torch.testing.assert_close(norm.hi, torch.tensor(0.95))
    assert norm.scale() == 1.0  # max(1, 0.9)
    for _ in range(2000):
        norm.update(ret)
    torch.testing.assert_close(norm.lo, torch.tensor(5.0), atol=1e-3, rtol=0)
    torch.testing.assert_close(norm.hi, torch.tensor(95.0), atol=1e-3, rtol=0)
    torch.testing.assert_close(norm.scale(), torch.tensor(90.0), atol=1e-3, rtol=0)
    small = td.ReturnNorm()
    for _ in range(2000):
        small.update(torch.linspace(0, 0.1, 50))
    assert small.scale() == 1.0  # small returns are not amplified


def test_lambda_returns_hand_computed():
    reward = torch.tensor([[1.0, 1.0], [2.0, 2.0]])  # [H=2, N=2]
    value = torch.tensor([[0.5, 0.5], [1.0, 1.0], [3.0, 3.0]])
    cont = torch.tensor([[1.0, 1.0], [1.0, 0.0]])  # second trajectory ends after its last transition
    ret = td.lambda_returns(reward, value, cont, gamma=0.9, lam=0.5)
    # R1 = r1 + g c1 v2;  R0 = r0 + g c0 ((1 - l) v1 + l R1)
    expected = torch.tensor([[1 + 0.9 * (0.5 * 1.0 + 0.5 * 4.7), 1 + 0.9 * (0.5 * 1.0 + 0.5 * 2.0)],
                             [2 + 0.9 * 3.0, 2.0]])
    torch.testing.assert_close(ret, expected)
    # lambda = 1: discounted reward sum plus bootstrap; lambda = 0: one-step TD targets
    torch.testing.assert_close(td.lambda_returns(reward[:, :1], value[:, :1], cont[:, :1], 0.9, 1.0),
                               torch.tensor([[1 + 0.9 * 2 + 0.81 * 3], [2 + 0.9 * 3]]))
    torch.testing.assert_close(td.lambda_returns(reward[:, :1], value[:, :1], cont[:, :1], 0.9, 0.0),
                               torch.tensor([[1 + 0.9 * 1.0], [2 + 0.9 * 3]]))


# --- networks ----------------------------------------------------------------------------------
def test_rssm_shapes_unimix_and_reset():
    torch.manual_seed(0)
    B, T, A, E, D, S, C = 3, 6, 2, 20, 16, 4, 5
    rssm = td.init_weights(td.RSSM(A, E, deter=D, units=12, stoch=S, classes=C))
    embed, action = torch.randn(B, T, E), torch.rand(B, T, A) * 2 - 1
    is_first = torch.zeros(B, T, dtype=torch.bool)
    is_first[:, 0] = is_first[:, 3] = True
    post, prior_logits = rssm.observe(embed, action, is_first)
    assert post["deter"].shape == (B, T, D) and post["stoch"].shape == (B, T, S, C)
    assert post["logits"].shape == prior_logits.shape == (B, T, S, C)
    assert rssm.feat(post).shape == (B, T, D + S * C)
    torch.testing.assert_close(post["stoch"].sum(-1), torch.ones(B, T, S))  # one-hot samples
    assert (post["logits"].exp() >= td.UNIMIX / C - 1e-6).all() and (prior_logits.exp() >= td.UNIMIX / C - 1e-6).all()
    # is_first resets the latent: the deterministic state at t=3 does not depend on steps before it
    embed2, action2 = embed.clone(), action.clone()
    embed2[:, :3], action2[:, :3] = torch.randn(B, 3, E), torch.rand(B, 3, A)
    post2, _ = rssm.observe(embed2, action2, is_first)
    torch.testing.assert_close(post2["deter"][:, 3], post["deter"][:, 3])
    assert not torch.allclose(post2["deter"][:, 2], post["deter"][:, 2])


@pytest.mark.parametrize("discrete", [False, True])
def test_imagination_rollout_and_actor_gradients(tmp_path, discrete):
    torch.manual_seed(0)
    agent = td.Dreamer(td.Args(size="cpu"), 3, discrete)
    N = 7
    start = {k: v.detach().expand(N, *v.shape[1:]).clone() for k, v in agent.rssm.initial(1).items()}
    start_cont = torch.tensor([1.0] * 6 + [0.0])  # the last start state is terminal
    with td.frozen(agent.world_model, agent.critics):
        traj, dists = agent.imagine(start, start_cont, backprop=not discrete)
        loss, targets, _ = agent.actor_critic_loss(traj, dists, backprop=not discrete)
    H = td.IMAG_HORIZON
    assert traj["feat"].shape == (H + 1, N, agent.rssm.feat_dim)
    assert traj["action"].shape == (H, N, 3) and traj["weight"].shape == (H + 1, N)
    assert targets["task"].shape == (H, N)
    torch.testing.assert_close(traj["weight"][0], start_cont)
    assert (traj["weight"][:, -1] == 0).all()  # nothing after a terminal start counts
    if discrete:
        torch.testing.assert_close(traj["action"].sum(-1), torch.ones(H, N))
    loss.backward()
    assert all(p.grad is None for p in agent.world_model.parameters())  # the actor loss trains the actor only
    assert all(p.grad is None for p in agent.critics.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in agent.actor.parameters())


def test_no_baseline_grad_keeps_the_loss_and_changes_only_the_actor_gradient():
    """--no-baseline-grad detaches v(s_t) in the backprop actor loss: same loss value, different gradient."""
    grads, losses = [], []
    for baseline_grad in (True, False):
        torch.manual_seed(0)
        agent = td.Dreamer(td.Args(size="cpu", baseline_grad=baseline_grad), 2, False)
        for p in agent.critics.parameters():  # the zero-initialised critic has no gradient to stop
            torch.nn.init.normal_(p, std=0.1)
        start = {k: v.detach().expand(5, *v.shape[1:]).clone() for k, v in agent.rssm.initial(1).items()}
        torch.manual_seed(1)
        with td.frozen(agent.world_model, agent.critics):
            traj, dists = agent.imagine(start, torch.ones(5), backprop=True)
            loss, _, _ = agent.actor_critic_loss(traj, dists, backprop=True)
        loss.backward()
        losses.append(loss.item())
        grads.append(torch.cat([p.grad.flatten() for p in agent.actor.parameters()]))
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)
    assert not torch.allclose(grads[0], grads[1], rtol=1e-3, atol=1e-7)


def test_train_step_updates_everything():
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    agent = td.Dreamer(td.Args(size="cpu"), 1, False)
    replay = td.Replay(100, (64, 64, 3), 1, ["task"])
    for t in range(60):
        replay.add(image=rng.integers(0, 255, (64, 64, 3), dtype=np.uint8), action=rng.uniform(-1, 1, 1),
                   task=float(t % 3), is_first=t % 25 == 0, is_terminal=False)
    batch = replay.sample(2, 10, rng)
    assert batch["image"].shape == (2, 10, 64, 64, 3) and batch["is_first"][:, 0].all()
    before = {k: v.clone() for k, v in agent.state_dict().items()}
    metrics = agent.train_step(batch)
    after = agent.state_dict()
    for prefix in ["encoder.", "rssm.", "decoder.", "heads.task.", "cont.", "actor.", "critics.task.",
                   "slow_critics.task.", "retnorms.task."]:
        assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith(prefix)), prefix
    assert all(np.isfinite(v) for v in metrics.values())


def test_compiled_update_matches_eager():
    """--compile: two updates of a compiled agent land where the eager agent's do (same seed, same batches)
    within float tolerance, and draw the same random numbers (fallback_random), so the metrics agree too."""
    rng = np.random.default_rng(0)
    replay = td.Replay(100, (64, 64, 3), 1, ["task"])
    for t in range(40):
        replay.add(image=rng.integers(0, 255, (64, 64, 3), dtype=np.uint8), action=rng.uniform(-1, 1, 1),
                   task=float(t % 3), is_first=t % 20 == 0, is_terminal=False)
    batches = [replay.sample(2, 4, rng) for _ in range(2)]  # a short observe loop: a quick compile
    agents, metrics = {}, {}
    for name in ("eager", "compiled"):
        torch.manual_seed(0)
        agents[name] = td.Dreamer(td.Args(size="cpu"), 1, False)
        if name == "compiled":
            td.compile_update(agents[name])
        torch.manual_seed(1)
        metrics[name] = [agents[name].train_step(b) for b in batches]
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 2  # both parts compiled, none fell back
    torch._dynamo.reset()
    eager, compiled = agents["eager"].state_dict(), agents["compiled"].state_dict()
    for k in eager:
        torch.testing.assert_close(compiled[k], eager[k], rtol=1e-3, atol=1e-4, msg=k)
    for m_eager, m_compiled in zip(metrics["eager"], metrics["compiled"]):
        assert m_eager.keys() == m_compiled.keys()
        for k in m_eager:
            assert m_compiled[k] == pytest.approx(m_eager[k], rel=1e-3, abs=1e-3), k


def test_replay_ring_buffer_never_samples_across_write_head():
    rng = np.random.default_rng(0)
    replay = td.Replay(10, (2, 2, 3), 1, ["task"])
    for t in range(23):  # wraps twice; holds steps 13..22
        replay.add(image=np.full((2, 2, 3), t, np.uint8), action=np.zeros(1), task=float(t), is_first=False,
                   is_terminal=False)
    batch = replay.sample(200, 4, rng)
    steps = batch["task"]
    assert steps.min() >= 13 and steps.max() <= 22
    np.testing.assert_array_equal(np.diff(steps, axis=1), 1)  # consecutive steps, in order


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="dmc_cartpole_balanc"):
        td.main(td.Args(env_id="dmc_cartpole_balanc"))
    with pytest.raises(ValueError, match="--prefill"):
        td.main(td.Args(prefill=10, batch_length=64))


def test_size_and_reward_choose_the_defaults_an_explicit_flag_wins():
    assert td.cli([]) == td.Args()  # the bare command is the CPU recipe with the task reward
    assert td.Args() == td.Args(**td.preset("cpu", "task"))  # the dataclass defaults are that preset
    paper = td.cli(["--size", "S"])
    assert (paper.model_lr, paper.actor_lr, paper.adam_beta2) == (1e-4, 3e-5, 0.999)
    viper = td.cli(["--reward-model", "m.pt", "--reward=viper", "--disagreement-scale", "0.1"])
    assert (viper.density_scale, viper.disagreement_scale, viper.task_scale) == (1.0, 0.1, 0.0)
    assert td.cli(["--size", "XS", "--model-lr", "2e-4"]).model_lr == 2e-4


def test_help_prints_no_none_default(capsys):
    for argv in (["--help"], ["--reward", "viper", "--size", "S", "--help"]):
        with pytest.raises(SystemExit):
            td.cli(argv)
        assert "None" not in capsys.readouterr().out


# --- end to end ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def dmc_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("dmc")
    agent, counters = td.main(tiny_args(out, "dmc_cartpole_balance"))
    return out, agent, counters


def test_smoke_dmc_writes_checkpoint_and_eval(dmc_run):
    out, agent, counters = dmc_run
    assert counters["step"] == 300
    assert counters["updates"] == int((300 - 100) * 8 / (4 * 16))  # --train-ratio honoured
    rows = read_eval(out / "eval.csv")
    assert rows[0] == ["step", "return", "wall_time_s"] and float(rows[1][2]) > 0 and rows[1][0] == "300" and 0 <= float(rows[1][1]) <= 1000
    assert (out / "replay.npz").exists() and (out / "eval_300.gif").exists()
    with np.load(out / "replay.npz") as f:  # written compressed: rendered frames are mostly flat colour
        assert os.path.getsize(out / "replay.npz") < f["image"].nbytes / 5 and int(f["step"]) == 300
    ckpt = torch.load(out / "agent.pt", weights_only=False)
    assert ckpt["counters"]["step"] == 300 and ckpt["args"]["env_id"] == "dmc_cartpole_balance"
    # the policy other scripts load: stateful, resets at episode start, actions in the env's box
    env = td.make_env("dmc_cartpole_balance", 0)
    policy = td.load_agent_policy(str(out / "agent.pt"), env)
    obs, _ = env.reset(seed=0)
    assert policy.carry is None
    a = policy(obs)
    assert a.shape == (1,) and np.all(np.abs(a) <= 1) and policy.carry is not None
    env.step(a)
    env.reset(seed=1)
    assert policy.carry is None  # env.reset() started a new latent
    with pytest.raises(ValueError, match="action dim"):
        td.load_agent_policy(str(out / "agent.pt"), td.make_env("atari_pong", 0))


def test_resume_continues_at_saved_step_with_same_optimiser_state(dmc_run):
    out, _, _ = dmc_run
    saved = torch.load(out / "agent.pt", weights_only=False)
    agent, counters = td.main(tiny_args(out, "dmc_cartpole_balance", resume=True))  # nothing left to do
    assert counters["step"] == 300 and counters["updates"] == saved["counters"]["updates"]
    state = td.optim_state(agent)

    def assert_same(a, b):
        if isinstance(a, dict):
            assert a.keys() == b.keys()
            for k in a:
                assert_same(a[k], b[k])
        elif isinstance(a, torch.Tensor):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        elif isinstance(a, (list, tuple)):
            for x, y in zip(a, b):
                assert_same(x, y)
        else:
            assert a == b

    assert_same(state, saved["optim"])
    assert state["model"]["state"]  # Adam moments exist (not a fresh optimiser)
    for k, v in saved["agent"].items():
        torch.testing.assert_close(agent.state_dict()[k], v, rtol=0, atol=0)
    agent, counters = td.main(tiny_args(out, "dmc_cartpole_balance", resume=True, total_steps=364, eval_every=64))
    assert counters["step"] == 364 and counters["updates"] == saved["counters"]["updates"] + 64 * 8 // 64
    rows = read_eval(out / "eval.csv")
    assert [r[0] for r in rows] == ["step", "300", "320", "364"]  # header once, rows appended
    assert b"\r" not in (out / "eval.csv").read_bytes()  # one line ending, before and after the resume
    with pytest.raises(ValueError, match="--size"):
        td.main(tiny_args(out, "dmc_cartpole_balance", resume=True, size="XS"))


def test_smoke_pong_discrete(tmp_path):
    agent, counters = td.main(tiny_args(tmp_path, "atari_pong", total_steps=200, eval_every=200, save_every=200))
    assert agent.discrete and counters["step"] == 200 and counters["updates"] > 0
    rows = read_eval(tmp_path / "eval.csv")
    assert rows[1][0] == "200" and -21 <= float(rows[1][1]) <= 21
    assert (tmp_path / "agent.pt").exists()
    env = td.make_env("atari_pong", 0)
    policy = td.load_agent_policy(str(tmp_path / "agent.pt"), env)
    obs, _ = env.reset(seed=0)
    a = policy(obs)
    assert isinstance(a, int) and 0 <= a < env.action_space.n


# --- the task reward with a Plan2Explore bonus; checkpoints and runs in older formats ---------------
def test_task_reward_with_plan2explore_bonus():
    """--reward task --disagreement-scale 1: task critic and disagreement critic, reward head kept, ensemble trained."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    args = td.Args(size="cpu", disagreement_scale=1.0)
    assert td.term_scales(args) == {"task": 1.0, "disagreement": 1.0}
    agent = td.Dreamer(args, 1, False)
    replay = td.Replay(100, (64, 64, 3), 1, ["task"])
    for t in range(40):
        replay.add(image=rng.integers(0, 255, (64, 64, 3), dtype=np.uint8), action=rng.uniform(-1, 1, 1),
                   task=float(t % 2), is_first=t == 0, is_terminal=False)
    before = {k: v.clone() for k, v in agent.state_dict().items()}
    metrics = agent.train_step(replay.sample(2, 10, rng))
    after = agent.state_dict()
    for prefix in ["heads.task.", "ensemble.", "critics.task.", "critics.disagreement."]:
        assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith(prefix)), prefix
    assert metrics["imagination/disagreement_reward"] > 0
    with pytest.raises(ValueError, match="--density-scale"):
        td.validate(td.Args(density_scale=1.0))


def test_checkpoint_from_before_the_viper_flags_still_loads(dmc_run, tmp_path):
    """agent.pt written before the VIPER flags existed (no reward_mode, scales ...) loads as the task agent."""
    out, _, _ = dmc_run
    ckpt = torch.load(out / "agent.pt", weights_only=False)
    for key in ["reward_model", "reward_mode", "density_scale", "disagreement_scale", "task_scale",
                "reference_returns", "allow_new_task"]:
        del ckpt["args"][key]
    del ckpt["args"]["cuda"]  # and the names of before the reward-term table: --device, heads.reward
    ckpt["args"]["device"] = None
    ckpt["agent"] = {k.replace("heads.task.", "heads.reward.").replace("world_model.3.task.", "world_model.3.reward."): v
                     for k, v in ckpt["agent"].items()}
    assert any(k.startswith("world_model.3.reward.") for k in ckpt["agent"])
    torch.save(ckpt, tmp_path / "old.pt")
    env = td.make_env("dmc_cartpole_balance", 0)
    policy = td.load_agent_policy(str(tmp_path / "old.pt"), env)
    assert set(policy.agent.critics) == {"task"} and policy.agent.ensemble is None
    assert policy(env.reset(seed=0)[0]).shape == (1,)


def test_resume_from_a_checkpoint_and_replay_of_older_versions(dmc_run, tmp_path):
    """A run started by an older version (no wall_time_s counter, no newer flags in its args, a replay.npz
    without its step, uncompressed, and a 2-column eval.csv) resumes; run.json's wall time carries on."""
    import json
    import shutil

    src, _, _ = dmc_run
    out = tmp_path / "old"
    shutil.copytree(src, out)
    ckpt = torch.load(out / "agent.pt", weights_only=False)
    for key in ["reference_returns", "allow_new_task"]:
        del ckpt["args"][key]
    del ckpt["counters"]["wall_time_s"]
    torch.save(ckpt, out / "agent.pt")
    step = ckpt["counters"]["step"]
    with np.load(out / "replay.npz") as f:
        np.savez(out / "replay.npz", **{k: f[k] for k in f.files if k != "step"})
    (out / "eval.csv").write_text(f"step,return\n{step},100.0\n")
    (out / "run.json").write_text(json.dumps({"command": "python train_viper_dreamer.py ...", "wall_time_s": 5000.0}))
    agent, counters = td.main(tiny_args(out, "dmc_cartpole_balance", resume=True, total_steps=step + 20))
    assert counters["step"] == step + 20 and counters["wall_time_s"] > 5000.0
    rows = read_eval(out / "eval.csv")
    assert rows[0] == ["step", "return", "wall_time_s"] and rows[1] == [str(step), "100.0"] and len(rows) == 3


# --- faults: NaN, Ctrl-C, a replay that does not belong to the checkpoint --------------------------
def test_non_finite_update_stops_the_run_before_it_is_saved(tmp_path, monkeypatch):
    real = td.Dreamer.train_step
    calls = []

    def poisoned(self, batch):
        metrics = real(self, batch)
        calls.append(1)
        return {**metrics, "loss/model": float("nan")} if len(calls) == 3 else metrics

    monkeypatch.setattr(td.Dreamer, "train_step", poisoned)
    with pytest.raises(FloatingPointError, match="update 3 .*loss/model.*--model-lr"):
        td.main(tiny_args(tmp_path, "dmc_cartpole_balance"))
    assert not (tmp_path / "agent.pt").exists()  # nothing was saved from the broken state


@pytest.mark.parametrize("env_id", ["dmc_reacher_easy", "atari_pong"])
def test_continue_episode_brings_a_fresh_env_back_to_the_episode_in_progress(env_id):
    """--resume's premise: reset with the episode's seed + the replayed actions = the same state (reacher draws its
    target at reset, Pong its sticky actions at every step); a replay that lacks the episode starts a new one."""
    env, fresh = td.make_env(env_id, 0), td.make_env(env_id, 0)
    act_dim, discrete = td.action_spec(env)
    replay, rng = td.Replay(100, env.observation_space.shape, act_dim, ["task"]), np.random.default_rng(0)
    labeler = td.StepRewards(td.Args(env_id=env_id))
    seed = td.episode_seed(0, 3)
    obs = td.new_episode(env, replay, labeler, 0, 3, act_dim)
    for _ in range(40):
        a = np.eye(act_dim, dtype=np.float32)[rng.integers(act_dim)] if discrete else rng.uniform(-1, 1, act_dim)
        a = a.astype(np.float32)
        obs, *_ = env.step(td.env_action(torch.as_tensor(a), discrete))
        replay.add(image=obs, action=a, is_first=False, is_terminal=False, task=0.0)
    episode = dict(ep_len=40, codes=None)
    assert np.array_equal(td.continue_episode(fresh, replay, labeler, episode, seed, discrete), obs)
    a = np.zeros(act_dim, np.float32)
    a[0] = 1.0  # one more step from each: still the same state
    assert np.array_equal(env.step(td.env_action(torch.as_tensor(a), discrete))[0],
                          fresh.step(td.env_action(torch.as_tensor(a), discrete))[0])
    assert td.continue_episode(fresh, replay, labeler, dict(ep_len=200, codes=None), seed, discrete) is None
    assert td.continue_episode(fresh, replay, labeler, None, seed, discrete) is None  # an older checkpoint
    if env_id == "dmc_reacher_easy":  # another seed puts the target elsewhere: the frame check refuses it
        assert td.continue_episode(fresh, replay, labeler, episode, seed + 1, discrete) is None


def test_ctrl_c_saves_a_checkpoint_that_resumes_exactly(dmc_run, tmp_path, monkeypatch, capsys):
    """Stopped mid-episode and resumed, a run ends bit-identical to the same run never stopped (dmc_run)."""
    import signal

    make_env = td.make_env

    class SigintAt:  # the user presses Ctrl-C while env step 150 runs
        def __init__(self, env):
            self.env, self.t = env, 0

        def __getattr__(self, name):
            return getattr(self.env, name)

        def reset(self, **kw):
            return self.env.reset(**kw)

        def step(self, action):
            self.t += 1
            if self.t == 150:
                os.kill(os.getpid(), signal.SIGINT)
            return self.env.step(action)

    monkeypatch.setattr(td, "make_env", lambda env_id, seed=0: SigintAt(make_env(env_id, seed)))
    before = signal.getsignal(signal.SIGINT)  # default_int_handler, or SIG_IGN under nohup / a background job
    before_term = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as stop:
        td.main(tiny_args(tmp_path, "dmc_cartpole_balance"))  # stops after the step it was in, no traceback
    assert stop.value.code == 130
    assert re.search("interrupted at step 150: saved .*agent.pt.*--resume", capsys.readouterr().err)
    assert signal.getsignal(signal.SIGINT) is before and signal.getsignal(signal.SIGTERM) is before_term  # put back
    saved = torch.load(tmp_path / "agent.pt", weights_only=False)
    assert saved["counters"]["step"] == 150 and saved["counters"]["updates"] > 0
    assert saved["episode"]["ep_len"] == 150 and saved["episode"]["carry"] is not None  # mid-episode
    monkeypatch.setattr(td, "make_env", make_env)
    agent, counters = td.main(tiny_args(tmp_path, "dmc_cartpole_balance", resume=True))
    assert counters["step"] == 300
    _, uninterrupted, _ = dmc_run
    for k, v in uninterrupted.state_dict().items():
        torch.testing.assert_close(agent.state_dict()[k], v, rtol=0, atol=0)
    assert read_eval(tmp_path / "eval.csv")[1][:2] == read_eval(dmc_run[0] / "eval.csv")[1][:2]  # step 300's eval


def test_replay_from_another_step_or_truncated_is_named(dmc_run, tmp_path):
    import shutil

    src, _, _ = dmc_run
    out = tmp_path / "copy"
    shutil.copytree(src, out)
    with np.load(out / "replay.npz") as f:
        data = dict(f)
    step = int(torch.load(out / "agent.pt", weights_only=False)["counters"]["step"])
    np.savez(out / "replay.npz", **{**data, "step": step - 20})  # killed between the replay's and agent.pt's writes
    (out / "replay.npz.tmp.npz").write_bytes(b"half a replay")  # killed during a save: removed on start
    with pytest.raises(ValueError, match=f"saved at step {step - 20} but agent.pt at step {step}"):
        td.main(tiny_args(out, "dmc_cartpole_balance", resume=True, total_steps=step + 20))
    assert not (out / "replay.npz.tmp.npz").exists()
    for junk in [(src / "replay.npz").read_bytes()[:5000], os.urandom(5000)]:  # truncated; not an npz at all
        (out / "replay.npz").write_bytes(junk)
        with pytest.raises(ValueError, match="replay.npz is not a readable replay"):
            td.main(tiny_args(out, "dmc_cartpole_balance", resume=True, total_steps=step + 20))
