"""train_viper_dreamer.py with --reward viper: insert-time rewards, density head, Plan2Explore, the
env reward kept away from learning, and short end-to-end runs with a tiny random-weight video model."""
import csv
import json
import shutil

import numpy as np
import pytest
import torch

import train_videogpt as tv
import train_viper_dreamer as td
from conftest import EPISODE, TASK, frames, make_videogpt, run_agent, viper_args


@pytest.fixture(scope="module")
def videogpt_path(tmp_path_factory):
    return make_videogpt(tmp_path_factory.mktemp("vg") / "videogpt.pt")


def reference(path):
    """train_videogpt.py's own RewardModel on the same checkpoint: the rewards must match it."""
    return tv.load_videogpt(torch.load(path, weights_only=False), "cpu")


# --- rewards at insert time ----------------------------------------------------------------------
@pytest.mark.parametrize("skip", [1, 2])
@pytest.mark.parametrize("mode", ["conditional", "joint"])
def test_insert_time_rewards_equal_compute_rewards(tmp_path, mode, skip):
    L = 3
    path = make_videogpt(tmp_path / "videogpt.pt", seq_len=L, frame_skip=skip)
    rm = td.load_videogpt(torch.load(path, weights_only=False), "cpu")
    labeler = td.StepRewards(viper_args(tmp_path, path, reward_mode=mode), rm)
    assert labeler.fields == ("task", "density")
    ref = reference(path)
    for T, seed in [(12, 0), (4, 1)]:  # longer than the window (codes get trimmed), then shorter (prefix only)
        video = frames(T, seed)
        first = labeler.reset(video[0])
        got = [first["density"]] + [labeler(f, 0.5)["density"] for f in video[1:]]
        assert len(labeler.codes) == min(T, (L - 1) * skip + 1)  # only what a window can still reach is kept
        expected = ref.compute_rewards(video[None], TASK, mode)[0]
        torch.testing.assert_close(torch.tensor(got), expected, rtol=1e-5, atol=1e-4)
        assert first["task"] == 0.0 and labeler(video[0], 0.5)["task"] == 0.5  # env reward passes through
    # step 0 is the reset frame's log-likelihood alone, not 0 (0 is the best possible log-likelihood)
    video = frames(5, 2)
    r0 = labeler.reset(video[0])["density"]
    assert r0 < 0 and r0 == pytest.approx(float(ref.compute_rewards(video[:1][None], TASK, "joint")[0, 0]), abs=1e-4)


def test_background_model_makes_the_density_a_likelihood_ratio(tmp_path):
    """--background-model: each step's density = the reward model's log p minus the background model's, each
    model scoring the frame in its own window (here a different window length and skip), as compute_rewards
    would over the whole episode; the background's codes restart with each episode."""
    expert = make_videogpt(tmp_path / "expert.pt", seq_len=3, frame_skip=2, seed=0)
    other = make_videogpt(tmp_path / "background.pt", seq_len=2, frame_skip=1, seed=1)
    args = viper_args(tmp_path, expert, background_model=other)
    rm, bg = (td.load_reward_model(args, "cpu", 64, p, "--background-model") for p in (expert, other))
    labeler = td.StepRewards(args, rm, bg)
    for T, seed in [(9, 0), (5, 1)]:  # a second episode after the first: nothing carries over
        video = frames(T, seed)
        got = [labeler.reset(video[0])["density"]] + [labeler(f, 0.0)["density"] for f in video[1:]]
        expected = rm.compute_rewards(video[None], TASK)[0] - bg.compute_rewards(video[None], TASK)[0]
        torch.testing.assert_close(torch.tensor(got), expected, rtol=1e-5, atol=1e-4)
        assert labeler.log_p == pytest.approx(got[-1])  # logged in nats: the ratio
    same = td.StepRewards(args, rm, rm)  # a model against itself: every frame earns exactly nothing
    video = frames(6, 2)
    assert [same.reset(video[0])["density"]] + [same(f, 0.0)["density"] for f in video[1:]] == [0.0] * 6
    with pytest.raises(ValueError, match="needs --reward viper"):
        td.validate(td.Args(background_model=other))
    with pytest.raises(FileNotFoundError, match="--background-model"):
        td.load_reward_model(args, "cpu", 64, str(tmp_path / "missing.pt"), "--background-model")


def test_density_bounds_rescale_the_stored_reward_not_the_logged_one(videogpt_path, tmp_path):
    rm = td.load_videogpt(torch.load(videogpt_path, weights_only=False), "cpu")
    video = frames(6, 3)
    raw = td.StepRewards(viper_args(tmp_path, videogpt_path), rm)
    got_raw = [raw.reset(video[0])["density"]] + [raw(f, 0.0)["density"] for f in video[1:]]
    span = float(np.max(got_raw) - np.min(got_raw))
    lo, hi = float(np.min(got_raw)) + span / 4, float(np.max(got_raw)) - span / 4  # both clips are exercised
    scaled = td.StepRewards(viper_args(tmp_path, videogpt_path, density_bounds=(lo, hi)), rm)
    got, logged = [scaled.reset(video[0])["density"]], [scaled.log_p]
    for f in video[1:]:
        got.append(scaled(f, 0.0)["density"])
        logged.append(scaled.log_p)
    assert logged == pytest.approx(got_raw)  # logs (episodes.csv, reference lines) stay in nats
    assert got == pytest.approx(np.clip((np.array(got_raw) - lo) / (hi - lo), 0, 1))
    assert min(got) == 0.0 and max(got) == 1.0
    for bounds, reward, model in [((-4.0, -50.0), "viper", videogpt_path), ((-50.0, float("nan")), "viper",
                                   videogpt_path), ((-50.0, -4.0), "task", None)]:
        with pytest.raises(ValueError, match="density-bounds"):
            td.validate(viper_args(tmp_path, model, density_bounds=bounds, reward=reward))


def test_reward_precision_flag_reaches_the_reward_model(videogpt_path, tmp_path, monkeypatch):
    cpu = torch.device("cpu")
    assert td.reward_bf16("fp32", cpu) is False and td.reward_bf16("bf16", cpu) is True
    assert td.reward_bf16("auto", torch.device("cuda")) is True
    for native in (True, False):  # auto follows the CPU's bf16 support
        monkeypatch.setattr(td, "native_bf16", lambda device, native=native: native)
        assert td.reward_bf16("auto", cpu) is native
        args = viper_args(tmp_path, videogpt_path, reward_precision="auto")
        assert td.load_reward_model(args, cpu, 64).bf16 is native
    for precision in ("fp32", "bf16"):
        rm = td.load_reward_model(viper_args(tmp_path, videogpt_path, reward_precision=precision), cpu, 64)
        assert rm.bf16 is (precision == "bf16")


def test_task_reward_labeler_passes_the_env_reward_through():
    labeler = td.StepRewards(td.Args())
    assert labeler.fields == ("task",)
    assert labeler.reset(None) == {"task": 0.0} and labeler(None, 2.5) == {"task": 2.5}


def test_reward_terms_heads_and_critics(videogpt_path, tmp_path):
    viper = viper_args(tmp_path, videogpt_path)
    assert td.term_scales(viper) == {"density": 1.0}  # Plan2Explore off by default (measured; README)
    assert list(td.Dreamer(viper, 1, False).heads) == ["density"]  # no task head: the env reward trains nothing
    official = viper_args(tmp_path, videogpt_path, disagreement_scale=1.0)  # videogpt_prior_rb
    assert td.term_scales(official) == {"density": 1.0, "disagreement": 1.0}
    mixed = viper_args(tmp_path, videogpt_path, task_scale=0.5, disagreement_scale=0.0)
    assert td.term_scales(mixed) == {"density": 1.0, "task": 0.5}
    agent = td.Dreamer(mixed, 1, False)
    assert list(agent.heads) == ["task", "density"]
    assert agent.ensemble is None and agent.ensemble_opt is None and set(agent.critics) == {"density", "task"}
    assert td.term_scales(td.Args()) == {"task": 1.0}
    assert td.term_scales(td.Args(disagreement_scale=1.0)) == {"task": 1.0, "disagreement": 1.0}  # Plan2Explore + task
    for bad, match in [(dict(density_scale=1.0, reward="task", reward_model=None), "--density-scale"),
                       (dict(disagreement_scale=-1.0), "--disagreement-scale"),
                       (dict(density_scale=0.0, disagreement_scale=0.0, task_scale=0.0), "all 0"),
                       (dict(density_scale=0.0, disagreement_scale=1.0), "ignore it"),
                       (dict(reward_model=None), "--reward-model"),
                       (dict(reward="task"), "only used with --reward viper")]:
        with pytest.raises(ValueError, match=match):
            td.validate(viper_args(tmp_path, videogpt_path, **bad))


def test_pearson():
    assert td.pearson([1, 2, 3, 4], [2, 4, 6, 8.5]) == pytest.approx(np.corrcoef([1, 2, 3, 4], [2, 4, 6, 8.5])[0, 1])
    assert np.isnan(td.pearson([1, 2], [1, 2])) and np.isnan(td.pearson([1, 1, 1], [1, 2, 3]))


# --- Plan2Explore --------------------------------------------------------------------------------
def imagined(agent, N=6):
    start = {k: v.detach().expand(N, *v.shape[1:]).clone() for k, v in agent.rssm.initial(1).items()}
    with torch.no_grad():
        traj, _ = agent.imagine(start, torch.ones(N), backprop=False)
    return traj


def test_disagreement_reward_shape_and_zero_when_members_agree(videogpt_path, tmp_path):
    torch.manual_seed(0)
    agent = td.Dreamer(viper_args(tmp_path, videogpt_path, disagreement_scale=1.0), 2, False)
    s = td.SIZES["cpu"]
    assert len(agent.ensemble.members) == td.ENSEMBLE_MEMBERS == 8
    traj = imagined(agent)
    with torch.no_grad():
        rewards = agent.imagined_rewards(traj)
        inp = torch.cat([traj["feat"][:-1], td.bound_action(traj["action"])], -1)
        preds = agent.ensemble(inp)
    assert set(rewards) == {"density", "disagreement"}
    assert rewards["disagreement"].shape == rewards["density"].shape == (td.IMAG_HORIZON, 6)
    assert preds.shape == (8, td.IMAG_HORIZON, 6, s["stoch"] * s["classes"])
    assert (rewards["disagreement"] > 1e-3).all()  # different initialisations disagree
    torch.testing.assert_close(rewards["disagreement"], preds.std(0, correction=0).mean(-1))
    for m in agent.ensemble.members[1:]:  # all members equal: no disagreement anywhere
        m.load_state_dict(agent.ensemble.members[0].state_dict())
    with torch.no_grad():
        preds = agent.ensemble(inp)
        assert (preds == preds[0]).all()
        assert agent.imagined_rewards(traj)["disagreement"].max() < 1e-6  # 0 up to rounding of the members' mean
    # the actor backpropagates through this reward: agreeing members must give a finite gradient, not NaN
    x = inp.clone().requires_grad_(True)
    agent.ensemble.disagreement(x).sum().backward()
    assert torch.isfinite(x.grad).all()


def test_ensemble_sees_imagined_actions_bounded_like_the_gru(videogpt_path, tmp_path):
    """The ensemble is trained on env-clipped actions; an imagined action past [-1, 1] must score the
    disagreement of its bounded value a / max(1, |a|), or the actor is paid for out-of-range actions."""
    torch.manual_seed(0)
    agent = td.Dreamer(viper_args(tmp_path, videogpt_path, disagreement_scale=1.0), 2, False)
    traj = imagined(agent)
    a = torch.linspace(-1.0, 1.0, traj["action"].numel()).reshape(traj["action"].shape)
    a[..., 0] = torch.where(a[..., 0].abs() > 0.5, a[..., 0].sign(), a[..., 0])  # some actions exactly at +-1
    inside, outside = dict(traj, action=a), dict(traj, action=torch.where(a.abs() == 1.0, 3.0 * a, a))
    assert (outside["action"].abs() > 1.0).any()
    with torch.no_grad():
        torch.testing.assert_close(agent.imagined_rewards(outside)["disagreement"],
                                   agent.imagined_rewards(inside)["disagreement"])
        raw = agent.ensemble.disagreement(torch.cat([traj["feat"][:-1], outside["action"]], -1))
    assert not torch.allclose(raw, agent.imagined_rewards(inside)["disagreement"])  # bounding did something
    x = outside["action"].clone().requires_grad_(True)  # the gradient still reaches the action
    agent.ensemble.disagreement(torch.cat([traj["feat"][:-1], td.bound_action(x)], -1)).sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def replay_batch(seed, B=2, T=10, A=1, poison=None, discrete=False):
    rng = np.random.default_rng(seed)
    replay = td.Replay(100, (64, 64, 3), A, ["task", "density"])
    for t in range(60):
        action = np.eye(A)[rng.integers(A)] if discrete else rng.uniform(-1, 1, A)
        replay.add(image=rng.integers(0, 255, (64, 64, 3), dtype=np.uint8), action=action,
                   task=float(t % 3) if poison is None else poison, density=-40.0 + t % 5,
                   is_first=t % 25 == 0, is_terminal=False)
    return replay.sample(B, T, rng)


@pytest.mark.parametrize("A, discrete", [(1, False), (6, True)])  # DMC (backprop), Atari (REINFORCE)
def test_ensemble_learns_from_replay_alone(videogpt_path, tmp_path, A, discrete):
    torch.manual_seed(0)
    agent = td.Dreamer(viper_args(tmp_path, videogpt_path, disagreement_scale=1.0), A, discrete)
    batch = {k: torch.as_tensor(v) for k, v in replay_batch(0, A=A, discrete=discrete).items()}
    _, post, _ = agent.world_model_loss(batch)
    agent.ensemble_loss(post, batch).backward()
    assert all(p.grad is None for p in agent.world_model.parameters())  # posterior states are detached
    assert all(p.grad is not None for p in agent.ensemble.parameters())
    before = {k: v.clone() for k, v in agent.state_dict().items()}
    metrics = agent.train_step(replay_batch(0, A=A, discrete=discrete))
    after = agent.state_dict()
    for prefix in ["ensemble.", "heads.density.", "critics.density.", "critics.disagreement.", "retnorms.disagreement.", "actor."]:
        assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith(prefix)), prefix
    assert "heads.task.out.weight" not in after
    assert np.isfinite(metrics["loss/ensemble"]) and np.isfinite(metrics["imagination/disagreement_reward"])


@pytest.mark.parametrize("task_scale, same", [(0.0, True), (1.0, False)])
def test_env_reward_reaches_learning_only_through_its_scale(videogpt_path, tmp_path, task_scale, same):
    """Same seed, same frames and densities, env reward real vs 1e9: identical updates iff its scale is 0."""
    states = []
    for poison in [None, 1e9]:
        torch.manual_seed(0)
        agent = td.Dreamer(viper_args(tmp_path, videogpt_path, task_scale=task_scale), 1, False)
        for i in range(3):
            agent.train_step(replay_batch(i, poison=poison))
        states.append(agent.state_dict())
    equal = all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    assert equal == same


# --- end to end ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def runs(tmp_path_factory, videogpt_path):
    clean, poisoned = tmp_path_factory.mktemp("clean"), tmp_path_factory.mktemp("nan")
    # with the Plan2Explore term (--disagreement-scale 1, off by default): the runs cover the ensemble too
    return dict(clean=(clean, *run_agent(clean, videogpt_path, disagreement_scale=1.0)),
                nan=(poisoned, *run_agent(poisoned, videogpt_path, poison=np.nan, disagreement_scale=1.0)))


def scalars(out, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out), size_guidance={"scalars": 0})
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)] if tag in acc.Tags()["scalars"] else []


def test_smoke_run_writes_checkpoint_eval_and_logs(runs):
    out, agent, counters, _ = runs["clean"]
    assert counters["step"] == 200 and counters["updates"] == int((200 - 64) * 8 / (4 * 16))
    with open(out / "eval.csv") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["step", "return", "wall_time_s"] and float(rows[1][2]) > 0 and rows[1][0] == "200" and 0 <= float(rows[1][1]) <= EPISODE * 2
    ckpt = torch.load(out / "agent.pt", weights_only=False)
    assert any(k.startswith("ensemble.members.7.") for k in ckpt["agent"])
    assert {k.split(".")[1] for k in ckpt["agent"] if k.startswith("slow_critics.")} == {"density", "disagreement"}
    assert ckpt["optim"]["ensemble"]["state"] and set(ckpt["optim"]["critics"]) == {"density", "disagreement"}
    policy = td.load_agent_policy(str(out / "agent.pt"), td.make_env(TASK, 0))  # no reward model needed to act
    a = policy(td.make_env(TASK, 0).reset(seed=0)[0])
    assert a.shape == (1,) and np.all(np.abs(a) <= 1)
    # per-episode VIPER and task returns, their correlation, the reward-compute time share
    viper_returns = scalars(out, "charts/episodic_viper_return")
    assert [s for s, _ in viper_returns] == [50, 100, 150, 200]
    assert [s for s, _ in scalars(out, "charts/viper_task_return_corr")] == [150, 200]  # from 3 episodes on
    share = scalars(out, "charts/reward_time_share")
    assert len(share) == 2 and all(0 < v < 1 for _, v in share)
    with np.load(out / "replay.npz") as f:  # the logged VIPER return sums the stored densities after each reset
        density, first = f["density"], f["is_first"]
    starts = np.flatnonzero(first)
    for (_, logged), s in zip(viper_returns, starts):
        assert logged == pytest.approx(density[s + 1:s + EPISODE + 1].sum(), rel=1e-5)
    info = json.loads((out / "run.json").read_text())  # what a results table needs
    assert info["env_id"] == TASK and info["reward"] == "viper" and info["env_steps"] == 200 and info["seed"] == 0
    assert info["wall_time_s"] > 0 and info["command"].startswith("python ") and info["commit"]
    assert info["reward_precision"] == ("bf16" if td.native_bf16(torch.device("cpu")) else "fp32")  # auto, the default
    with open(out / "episodes.csv") as f:  # the same episodes, as a file the plots and results are made from
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [50, 100, 150, 200] and {r["length"] for r in rows} == {str(EPISODE)}
    for r, (_, logged) in zip(rows, viper_returns):
        assert float(r["viper_return"]) == pytest.approx(logged, abs=0.01)


def test_each_replayed_step_is_scored_once(runs, videogpt_path):
    out, _, counters, calls = runs["clean"]
    episodes_started = counters["episodes"] + 1  # a new episode (its reset frame) starts after the last one ends
    assert counters["episodes"] == 4
    assert calls == [1] * (counters["step"] + episodes_started)  # one call per replayed step, one step each
    with np.load(out / "replay.npz") as f:
        data = {k: f[k] for k in ["image", "density", "is_first"]}
    assert len(data["density"]) == len(calls)
    ref = reference(videogpt_path)
    ref.bf16 = json.loads((out / "run.json").read_text())["reward_precision"] == "bf16"  # as the run scored
    bounds = list(np.flatnonzero(data["is_first"])) + [len(calls)]
    assert len(bounds) == episodes_started + 1
    for s, e in zip(bounds[:-1], bounds[1:]):  # stored rewards == scoring each whole episode afterwards
        expected = ref.compute_rewards(data["image"][s:e][None], TASK, "conditional")[0]
        torch.testing.assert_close(torch.from_numpy(data["density"][s:e]), expected, rtol=1e-5, atol=1e-4)


def test_nan_env_reward_leaves_learning_identical(runs):
    """--task-scale 0 (default): an env reward of NaN changes no weight, optimiser moment or normaliser."""
    (clean, *_), (poisoned, *_) = runs["clean"], runs["nan"]
    a = torch.load(clean / "agent.pt", weights_only=False)
    b = torch.load(poisoned / "agent.pt", weights_only=False)
    assert a["counters"]["updates"] == b["counters"]["updates"] > 0
    for k, v in a["agent"].items():
        assert torch.equal(v, b["agent"][k]), k
    torch.testing.assert_close(a["optim"], b["optim"], rtol=0, atol=0)
    with np.load(poisoned / "replay.npz") as f:
        assert np.isnan(f["task"][~f["is_first"]]).all()  # the poison did reach the replay


def test_resume_viper_run(runs, videogpt_path, tmp_path):
    src, *_ = runs["clean"]
    out = tmp_path / "resumed"
    shutil.copytree(src, out)
    with pytest.raises(FileExistsError, match="--resume"):  # reusing a run's folder without --resume
        td.main(viper_args(out, videogpt_path))
    for name in ("eval.csv", "episodes.csv"):  # rows of a stretch run past the checkpoint (killed before saving)
        with open(out / name, "a") as f:
            f.write("230,1.0,2.0,3\n" if name == "episodes.csv" else "230,1.0\n")
    agent, counters, calls = run_agent(out, videogpt_path, resume=True, total_steps=232, eval_every=1000,
                                       disagreement_scale=1.0)
    info = json.loads((out / "run.json").read_text())
    assert info["env_steps"] == 232 and info["wall_time_s"] > json.loads((src / "run.json").read_text())["wall_time_s"]
    for name in ("eval.csv", "episodes.csv"):  # are dropped, not doubled, when that stretch is run again
        with open(out / name) as f:
            assert [int(r[0]) for r in list(csv.reader(f))[1:]] == ([200, 232] if name == "eval.csv" else
                                                                   [50, 100, 150, 200])
    saved = torch.load(src / "agent.pt", weights_only=False)
    assert counters["step"] == 232 and counters["updates"] == saved["counters"]["updates"] + 4
    assert len(counters["episode_returns"]) == 4  # the correlation's history survives a resume
    assert calls == [1] * 32  # the episode in progress goes on: its reset frame is not scored again
    # and the resumed run is the uninterrupted one, bit for bit (the same evaluations: at 200 and at the end)
    straight, *_ = run_agent(tmp_path / "straight", videogpt_path, total_steps=232, eval_every=200, disagreement_scale=1.0)
    for k, v in straight.state_dict().items():
        assert torch.equal(v, agent.state_dict()[k]), k
    with pytest.raises(ValueError, match="reward scales"):
        td.main(viper_args(out, videogpt_path, resume=True, disagreement_scale=0.0))


def test_reward_model_with_nan_weights_or_for_another_task_is_refused(tmp_path):
    path = make_videogpt(tmp_path / "videogpt.pt")
    ckpt = torch.load(path, weights_only=False)
    args = viper_args(tmp_path, path)
    ckpt["tasks"] = ["dmc_reacher_easy"]  # trained on reacher alone (class map or not)
    torch.save(ckpt, path)
    with pytest.raises(ValueError, match="trained on .*dmc_reacher_easy.*--allow-new-task"):
        td.load_reward_model(args, "cpu", 64)
    assert td.load_reward_model(viper_args(tmp_path, path, allow_new_task=True), "cpu", 64) is not None
    ckpt["tasks"] = [TASK]
    ckpt["model"]["head.weight"][0, 0] = float("nan")
    torch.save(ckpt, path)
    with pytest.raises(ValueError, match="non-finite"):
        td.load_reward_model(args, "cpu", 64)


def test_unknown_task_and_bad_reward_model(videogpt_path, tmp_path):
    with pytest.raises(ValueError, match="known tasks.*dmc_cartpole_balance"):
        td.main(viper_args(tmp_path / "a", videogpt_path, env_id="dmc_walker_walk"))
    assert not (tmp_path / "a").exists()  # fails before writing anything
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        td.main(viper_args(tmp_path / "b", str(tmp_path / "missing.pt")))
    torch.save({"kind": "vqgan"}, tmp_path / "vq.pt")
    with pytest.raises(ValueError, match="not a videogpt"):
        td.main(viper_args(tmp_path / "c", str(tmp_path / "vq.pt")))


def test_run_saved_with_the_old_term_names_resumes_identically(runs, videogpt_path, tmp_path):
    """agent.pt, replay.npz and args written before the reward terms had one name each (heads.reward,
    disag, expl, --expl-scale, --task-reward-scale, --device, None for preset values) resume exactly as
    the same run saved with today's names."""
    src, *_ = runs["clean"]
    new, old = tmp_path / "new", tmp_path / "old"
    shutil.copytree(src, new)
    shutil.copytree(src, old)
    ckpt = torch.load(old / "agent.pt", weights_only=False)
    ckpt["agent"] = {k.replace(".disagreement.", ".disag."): v for k, v in ckpt["agent"].items()}
    ckpt["optim"]["expl"] = ckpt["optim"].pop("ensemble")
    ckpt["optim"]["critics"] = {("disag" if k == "disagreement" else k): v for k, v in ckpt["optim"]["critics"].items()}
    a = ckpt["args"]
    a.update(expl_scale=None, task_reward_scale=None, density_scale=None, model_lr=None, device=None)
    for key in ["disagreement_scale", "task_scale", "cuda"]:
        del a[key]
    torch.save(ckpt, old / "agent.pt")
    with np.load(old / "replay.npz") as f:
        arrays = {("reward" if k == "task" else k): f[k] for k in f.files}
    np.savez_compressed(old / "replay.npz", **arrays)
    assert td.args_from_checkpoint(a) == td.args_from_checkpoint(torch.load(new / "agent.pt", weights_only=False)["args"])
    results = [run_agent(d, videogpt_path, resume=True, total_steps=232, eval_every=1000, disagreement_scale=1.0)[0]
               for d in (new, old)]
    for k, v in results[0].state_dict().items():
        assert torch.equal(v, results[1].state_dict()[k]), k
