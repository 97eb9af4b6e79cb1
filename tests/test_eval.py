"""eval.py: metrics against hand-computed examples, and clear errors for bad checkpoints."""
import csv
import json
import os
import warnings

import numpy as np
import pytest
import torch

import eval as ev
from conftest import TASK, frames, make_videogpt, viper_args


def test_rankdata_ties():
    assert ev.rankdata([10, 20, 20, 5]).tolist() == [2.0, 3.5, 3.5, 1.0]


def test_spearman_hand_computed():
    assert ev.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert ev.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # ranks x = 1 2 3 4 5, ranks y = 2 1 4 3 5: d^2 sum = 4, rho = 1 - 6*4/(5*24) = 0.8
    assert ev.spearman([1, 2, 3, 4, 5], [2, 1, 4, 3, 5]) == pytest.approx(0.8)
    # monotone non-linear transforms do not change it
    x = np.random.default_rng(0).normal(size=20)
    assert ev.spearman(x, np.exp(3 * x)) == pytest.approx(1.0)


def test_auroc_hand_computed():
    assert ev.auroc([3, 4], [1, 2]) == 1.0
    assert ev.auroc([1, 2], [3, 4]) == 0.0
    # pairs (pos, neg): (2,1) win, (2,3) loss, (4,1) win, (4,3) win -> 3/4
    assert ev.auroc([2, 4], [1, 3]) == 0.75
    assert ev.auroc([1], [1]) == 0.5  # a tie counts one half


def test_bad_checkpoint_errors(tmp_path):
    with pytest.raises(SystemExit, match="does not exist"):
        ev.load_checkpoint(str(tmp_path / "missing.pt"), "videogpt")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit, match="not a readable"):
        ev.load_checkpoint(str(junk), "videogpt")
    wrong = tmp_path / "vqgan.pt"
    torch.save({"kind": "vqgan"}, wrong)
    with pytest.raises(SystemExit, match="is a vqgan checkpoint, expected a videogpt"):
        ev.load_checkpoint(str(wrong), "videogpt")


def _write_episode(path, video, reward):
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, video=video, action=np.zeros((len(video), 1), np.float32), reward=reward)


def test_episode_files_pairs_epsilon_zero_with_the_degraded_seeds(tmp_path):
    for name in ["experts/t/test/000020.npz", "deg/t/train/eps0.5_001000.npz", "deg/t/train/eps1.0_001000.npz"]:
        _write_episode(tmp_path / name, np.zeros((2, 64, 64, 3), np.uint8), np.zeros(2, np.float32))
    files = ev.episode_files(str(tmp_path / "experts"), str(tmp_path / "deg"), "t")
    assert list(files) == [0.0, 0.5, 1.0] and files[0.0][0].endswith("experts/t/test/000020.npz")
    _write_episode(tmp_path / "deg/t/train/eps0.0_001000.npz", np.zeros((2, 64, 64, 3), np.uint8),
                   np.zeros(2, np.float32))
    files = ev.episode_files(str(tmp_path / "experts"), str(tmp_path / "deg"), "t")
    assert [os.path.basename(p) for p in files[0.0]] == ["eps0.0_001000.npz"]  # same seed as the others


def test_eval_reward_writes_json_and_png(tmp_path):
    model = make_videogpt(tmp_path / "videogpt.pt")
    experts, degraded = tmp_path / "experts", tmp_path / "degraded"
    for i in range(2):
        _write_episode(experts / TASK / "test" / f"{i:06d}.npz", frames(9, i), np.full(9, 2.0, np.float32))
        for eps in (0.5, 1.0):
            _write_episode(degraded / TASK / "train" / f"eps{eps}_{i:06d}.npz", frames(9, 10 + i),
                           np.full(9, 1.0 - eps, np.float32))
    out = tmp_path / "out"
    summary = ev.eval_reward(ev.RewardArgs(reward_model=model, data_dir=str(experts), degraded_dir=str(degraded),
                                           output_dir=str(out), cuda=False))
    s = summary["tasks"][TASK]
    assert set(s["mean_viper_reward_by_epsilon"]) == {"0.0", "0.5", "1.0"}
    assert len(s["episodes"]) == 6 and 0.0 <= s["auroc_expert_vs_random"] <= 1.0
    assert {x["true_return"] for x in s["episodes"]} == {18.0, 4.5, 0.0}
    assert {x["steps"] for x in s["episodes"]} == {8}  # the reset frame earns no reward
    means = [x["viper_mean"] for x in s["episodes"]]
    assert s["spearman_viper_mean_vs_true_return"] == pytest.approx(
        ev.spearman(means, [x["true_return"] for x in s["episodes"]]))
    assert (out / "summary.json").exists() and (out / "reward_diagnostics.png").stat().st_size > 1000
    # a task the class-conditional model does not know is reported, not silently scored
    with pytest.raises(ValueError, match="known tasks"):
        ev.eval_reward(ev.RewardArgs(reward_model=model, data_dir=str(experts), tasks=["dmc_walker_walk"],
                                     output_dir=str(out), cuda=False))


def test_eval_agent_writes_json_and_gif(tmp_path):
    import train_viper_dreamer as td

    args = td.Args(env_id="dmc_cartpole_balance", size="cpu", output_dir=str(tmp_path))
    agent = td.Dreamer(args, 1, False)
    path = str(tmp_path / "agent.pt")
    td.save_checkpoint(path, agent, dict(step=0, updates=0, credit=0.0, episodes=0, episode_returns=[]), args, 1,
                       False)
    (tmp_path / "run.json").write_text('{"env_id": "dmc_cartpole_balance", "seed": 0}')
    out = tmp_path / "eval"
    summary = ev.eval_agent(ev.AgentArgs(checkpoint=path, num_episodes=1, output_dir=str(out)))
    info = json.loads((tmp_path / "run.json").read_text())  # the run's final result lands in its run.json
    assert info["seed"] == 0 and info["final_episodes"] == 1 and info["final_env_steps"] == 0
    assert info["final_return_mean"] == round(summary["mean_return"], 2) and info["final_return_std"] == 0.0
    assert summary["env_id"] == "dmc_cartpole_balance" and len(summary["returns"]) == 1
    assert summary["seeds"] == [10_000]  # episode i was reset with --seed + i, so its start can be replayed
    assert 0.0 <= summary["mean_return"] <= 1000.0
    assert (out / "summary.json").exists() and (out / "episodes.gif").stat().st_size > 1000
    sampled = ev.eval_agent(ev.AgentArgs(checkpoint=path, num_episodes=1, output_dir=str(out), sample=True))
    again = ev.eval_agent(ev.AgentArgs(checkpoint=path, num_episodes=1, output_dir=str(out), sample=True))
    assert (summary["actions"], sampled["actions"]) == ("mode", "sample")
    assert sampled["returns"] != summary["returns"] and sampled["returns"] == again["returns"]  # seeded samples
    assert json.loads((tmp_path / "run.json").read_text()) == info  # sampled actions are not the run's final
    ev.eval_agent(ev.AgentArgs(checkpoint=path, num_episodes=1, seed=20_000, output_dir=str(out), write_final=False))
    assert json.loads((tmp_path / "run.json").read_text()) == info  # nor is a quick look
    with pytest.raises(SystemExit, match="expected a videogpt"):
        ev.load_checkpoint(path, "videogpt")


def test_eval_samples_writes_gif(tmp_path):
    model = make_videogpt(tmp_path / "videogpt.pt")
    _write_episode(tmp_path / "experts" / TASK / "test" / "000000.npz", frames(12, 0), np.zeros(12, np.float32))
    out = tmp_path / "samples"
    ev.eval_samples(ev.SamplesArgs(reward_model=model, data_dir=str(tmp_path / "experts"), num_videos=2,
                                   output_dir=str(out)))
    from PIL import Image

    gif = Image.open(out / "samples.gif")
    assert gif.n_frames == 3  # the model's window: 1 context frame + 2 sampled
    assert gif.size == (2 * 64, 2 * 64)  # 2 rows; real | sampled


def _write_eval_csv(path, rows):
    path.write_text("step,return\n" + "".join(f"{s},{r}\n" for s, r in rows))


def test_eval_curves_table_and_png(tmp_path):
    _write_eval_csv(tmp_path / "o.csv", [(10000, 200.0), (20000, 400.0)])
    _write_eval_csv(tmp_path / "v.csv", [(10000, 150.0), (20000, 100.0), (30000, 50.0)])
    out = tmp_path / "plots" / "c.png"
    table = ev.eval_curves(ev.CurvesArgs(runs=[f"oracle={tmp_path / 'o.csv'}", f"viper={tmp_path / 'v.csv'}"],
                                         reference="oracle", random_return=100.0, expert_return=999.0,
                                         output=str(out)))
    lines = table.splitlines()
    assert lines[0] == "| env steps | oracle | viper | viper / oracle |"
    assert lines[2] == "| 10000 | 200.0 | 150.0 | 75% |"
    assert lines[3] == "| 20000 | 400.0 | 100.0 | 25% |"
    assert lines[4] == "| 30000 |  | 50.0 |  |"  # no oracle eval at 30k: no ratio
    assert out.stat().st_size > 1000 and (tmp_path / "plots" / "c.md").read_text().strip() == table
    # a second plot in the same folder writes its own table and leaves the first one's alone
    other = ev.eval_curves(ev.CurvesArgs(runs=[f"viper={tmp_path / 'v.csv'}"], output=str(tmp_path / "plots" / "d.png")))
    assert (tmp_path / "plots" / "d.md").read_text().strip() == other != table
    assert (tmp_path / "plots" / "c.md").read_text().strip() == table


def test_time_to_target_reads_the_wall_time_column(tmp_path):
    (tmp_path / "e.csv").write_text("step,return,wall_time_s\n10000,300.0\n20000,700.0,3600\n30000,900.0,7200\n")
    path = str(tmp_path / "e.csv")
    returns, walls = ev.read_eval_csv(path), ev.read_eval_csv(path, "wall_time_s")
    assert walls == {10000: None, 20000: 3600.0, 30000: 7200.0}  # a row from before the column existed
    assert ev.time_to_target(returns, walls, 650) == (20000, 3600.0)
    assert ev.time_to_target(returns, walls, 950) == (None, None)
    table = ev.eval_curves(ev.CurvesArgs(runs=[f"a={tmp_path / 'e.csv'}"], target=800, output=str(tmp_path / "c.png")))
    assert table.endswith("first eval >= 800: step 30000 (2.00 h wall)")


def test_eval_curves_mean_of_seeds(tmp_path):
    _write_eval_csv(tmp_path / "s0.csv", [(10000, 200.0), (20000, 400.0)])
    _write_eval_csv(tmp_path / "s1.csv", [(10000, 100.0)])  # a seed that has not reached 20k yet
    table = ev.eval_curves(ev.CurvesArgs(runs=[f"viper={tmp_path / 's0.csv'},{tmp_path / 's1.csv'}"],
                                         output=str(tmp_path / "c.png")))
    assert table.splitlines()[2:] == ["| 10000 | 150.0 |"]  # the mean, only where every seed has an eval


def test_eval_curves_bad_inputs(tmp_path):
    _write_eval_csv(tmp_path / "o.csv", [(10000, 200.0)])
    (tmp_path / "bad.csv").write_text("a,b\n1,2\n")
    with pytest.raises(SystemExit, match="label=path"):
        ev.eval_curves(ev.CurvesArgs(runs=[str(tmp_path / "o.csv")]))
    with pytest.raises(SystemExit, match="does not exist"):
        ev.eval_curves(ev.CurvesArgs(runs=[f"x={tmp_path / 'missing.csv'}"]))
    with pytest.raises(SystemExit, match="not an eval.csv"):
        ev.eval_curves(ev.CurvesArgs(runs=[f"x={tmp_path / 'bad.csv'}"]))
    with pytest.raises(SystemExit, match="--reference 'y' is not one of"):
        ev.eval_curves(ev.CurvesArgs(runs=[f"x={tmp_path / 'o.csv'}"], reference="y"))


# --- reference behaviour, heatmaps and the per-episode plot ---------------------------------------
def test_reference_scores_behaviours_with_the_agents_labeler(tmp_path):
    import train_viper_dreamer as td

    model = make_videogpt(tmp_path / "videogpt.pt")
    expert = frames(9, 0)
    _write_episode(tmp_path / "experts" / TASK / "test" / "000020.npz", expert, np.ones(9, np.float32))
    _write_episode(tmp_path / "deg" / TASK / "train" / "eps0.5_001000.npz", frames(7, 1), np.zeros(7, np.float32))
    out = tmp_path / "ref"
    # the expert's per-step rewards as the agent's insert-time labeler gives them (nats, then --density-bounds)
    # in the precision both default to (--reward-precision auto: bf16 on a CPU with native bf16)
    rm = td.load_videogpt(torch.load(model, weights_only=False), "cpu",
                          bf16=td.reward_bf16(td.Args.reward_precision, torch.device("cpu")))
    labeler = td.StepRewards(viper_args(tmp_path, model), rm)
    labeler.reset(expert[0])
    nats = [labeler(f, 0.0)["density"] for f in expert[1:]]
    bounds = (float(np.median(nats)), max(nats))  # half the steps clip to 0, the best to 1
    labeler = td.StepRewards(viper_args(tmp_path, model, density_bounds=bounds), rm)
    labeler.reset(expert[0])
    rescaled = [labeler(f, 0.0)["density"] for f in expert[1:]]
    assert min(rescaled) == 0.0 and max(rescaled) == 1.0
    with pytest.MonkeyPatch.context() as mp:  # 12-step episodes keep the rollouts short
        import collect_expert_videos as cev

        real = cev.make_env
        mp.setattr(cev, "make_env", lambda env_id, seed=0: gym_time_limit(real(env_id, seed), 12))
        summary = ev.eval_reference(ev.ReferenceArgs(
            reward_model=model, env_id=TASK, data_dir=str(tmp_path / "experts"), degraded_dir=str(tmp_path / "deg"),
            episodes=2, density_bounds=bounds, output_dir=str(out)))
    table = summary["behaviours"]
    assert summary["reward_precision"] == ("bf16" if rm.bf16 else "fp32")
    assert list(table) == ["expert (test split)", "expert, epsilon 0.5", "random actions", "zero actions",
                           "constant +1", "constant -1"]
    assert table["expert (test split)"]["true_return_mean"] == 9.0 and table["zero actions"]["episodes"] == 2
    assert table["expert (test split)"]["viper_position"] == 1.0 and table["random actions"]["viper_position"] == 0.0
    assert set(summary["shortcuts"]) <= {"zero actions", "constant +1", "constant -1"}
    # the expert's VIPER return is what the agent's insert-time labeler sums over the steps after the reset,
    # in nats and, with the agent's --density-bounds, rescaled (what that agent maximises)
    assert table["expert (test split)"]["viper_return_mean"] == pytest.approx(sum(nats), rel=1e-5)
    assert table["expert (test split)"]["bounded_return_mean"] == pytest.approx(sum(rescaled), rel=1e-5)
    assert table["expert (test split)"]["bounded_position"] == 1.0 and summary["density_bounds"] == bounds
    # reference.png in numbers: the expert's 8 steps in segments of 5 and 3 (the last one partial)
    segments = [round(float(np.mean(nats[:5])), 3), round(float(np.mean(nats[5:])), 3)]
    assert ev.segment_means(ev.mean_per_step([np.array(nats)]), 5) == segments
    assert summary["segment_steps"] == 25 and len(table["zero actions"]["reward_per_step_by_segment"]) == 1
    assert table["expert (test split)"]["reward_per_step_by_segment"] == [round(float(np.mean(nats)), 3)]
    with open(out / "reference.csv", newline="") as f:  # behaviour names with commas survive the csv
        rows = list(csv.DictReader(f))
    assert [r["behaviour"] for r in rows] == list(table) and float(rows[1]["true_return_mean"]) == 0.0
    assert float(rows[0]["bounded_return_mean"]) == pytest.approx(sum(rescaled), abs=0.01)
    assert (out / "reference.png").stat().st_size > 0  # per-step rewards along the episode
    # the agent reads it back for its tensorboard lines, only for the task and mode it was scored for
    refs = td.load_references(viper_args(tmp_path, model, reference_returns=str(out / "reference.json")))
    assert refs["zero_actions"] == table["zero actions"]["viper_return_mean"] and len(refs) == 6
    with pytest.raises(ValueError, match="scored for"):
        td.load_references(viper_args(tmp_path, model, reference_returns=str(out / "reference.json"),
                                      reward_mode="joint"))
    with pytest.raises(SystemExit, match="no expert episodes"):
        ev.eval_reference(ev.ReferenceArgs(reward_model=model, env_id=TASK, data_dir=str(tmp_path / "none"),
                                           degraded_dir=None, output_dir=str(out)))


def gym_time_limit(env, steps):
    import gymnasium as gym

    return gym.wrappers.TimeLimit(env, steps)


def test_heatmap_tokens_sum_to_the_conditional_reward(tmp_path):
    model = make_videogpt(tmp_path / "videogpt.pt", seq_len=3, frame_skip=2)
    rm = ev.load_reward_model(model, cuda=False)
    video = frames(10, 3)
    steps = [0, 3, 9]  # a lone first frame, a prefix window, a full window
    maps = ev.token_log_probs(rm, video, TASK, steps)
    assert maps.shape == (3, *rm.model.token_hw) and (maps <= 0).all()
    rewards = rm.compute_rewards(torch.from_numpy(video)[None], TASK, "conditional")[0]
    np.testing.assert_allclose(maps.sum((1, 2)), rewards[steps].numpy(), rtol=1e-5, atol=1e-4)
    _write_episode(tmp_path / "e" / TASK / "test" / "000001.npz", video, np.zeros(10, np.float32))
    _write_episode(tmp_path / "r" / TASK / "train" / "002000.npz", frames(10, 4), np.zeros(10, np.float32))
    out = tmp_path / "heat.png"
    ev.eval_heatmap(ev.HeatmapArgs(reward_model=model, env_id=TASK, data_dir=str(tmp_path / "e"),
                                   random_dir=str(tmp_path / "r"), frames=3, output=str(out)))
    assert out.stat().st_size > 0


def test_episodes_plot_reads_episodes_csv(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "episodes.csv").write_text("step,return,viper_return,length\n500,300.5,-40000.0,500\n1000,420.0,-900.5,500\n")
    ep = ev.read_episodes(str(run))
    assert ep["step"].tolist() == [500, 1000] and ep["viper_return"].tolist() == [-40000.0, -900.5]
    ref = tmp_path / "reference.json"
    ref.write_text('{"behaviours": {"zero actions": {"viper_return_mean": -30000.0, "true_return_mean": 200.0}}}')
    out = tmp_path / "ep.png"
    ev.eval_episodes(ev.EpisodesArgs(run=[str(run)], reference=str(ref), smooth=2, output=str(out)))
    assert out.stat().st_size > 0
    # two runs side by side: one table, a column per run, a row per bin of env steps, true / VIPER means
    other = tmp_path / "other"
    other.mkdir()
    (other / "episodes.csv").write_text("step,return,viper_return,length\n700,10.0,-5000.0,500\n"
                                        "900,30.0,-3000.0,500\n1600,0.0,-2000.0,500\n")
    table = ev.eval_episodes(ev.EpisodesArgs(run=[f"base={run}", f"bounds={other}"], smooth=2, bin=1000,
                                             output=str(out)))
    rows = table.splitlines()
    assert rows[0] == "| env steps | base | bounds |"
    assert rows[2] == "| 0–1k | 360 / -20.5k | 20 / -4.0k |"  # episodes ending in (0, 1000]: means
    assert rows[3] == "| 1–2k | — | 0 / -2.0k |"
    assert (tmp_path / "ep.md").read_text().endswith(table + "\n")
    oracle = tmp_path / "oracle"  # a task-reward run has no VIPER return: a dash, not nan and a numpy warning
    oracle.mkdir()
    (oracle / "episodes.csv").write_text("step,return,viper_return,length\n500,80.0,nan,500\n1000,95.0,nan,500\n")
    capsys.readouterr()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        table = ev.eval_episodes(ev.EpisodesArgs(run=[f"oracle={oracle}"], smooth=2, bin=1000, output=str(out)))
    assert "oracle: 2 episodes; last 2: VIPER return —, true return 87.5" in capsys.readouterr().out
    assert table.splitlines()[2] == "| 0–1k | 88 / — |"
    with pytest.raises(SystemExit, match="two runs are labelled 'base'"):
        ev.eval_episodes(ev.EpisodesArgs(run=[f"base={run}", f"base={other}"], output=str(out)))


def test_a_run_resumed_past_its_final_eval_no_longer_reports_it_as_final(tmp_path):
    import train_viper_dreamer as td

    path = str(tmp_path / "run.json")
    args = td.Args(env_id="dmc_cartpole_balance", output_dir=str(tmp_path), resume=True)
    final = dict(final_return_mean=451.8, final_return_std=25.5, final_episodes=20, final_env_steps=100)
    with open(path, "w") as f:
        json.dump(dict(command="python train_viper_dreamer.py", commit="abc", env_steps=100, **final), f)
    counters = dict(step=100, updates=50, wall_time_s=10.0)
    td.write_run_json(path, args, counters, ("python train_viper_dreamer.py --resume", "def"))
    assert json.load(open(path))["final_return_mean"] == 451.8  # resumed at the evaluated step: still final
    td.write_run_json(path, args, dict(counters, step=120), ("python train_viper_dreamer.py --resume", "def"))
    info = json.load(open(path))
    assert not [k for k in info if k.startswith("final_")] and info["env_steps"] == 120
    assert info["earlier_finals"] == [final]


def test_unreadable_episodes_and_zero_episodes_are_named(tmp_path):
    no_reward = tmp_path / "a.npz"
    np.savez(no_reward, video=np.zeros((2, 64, 64, 3), np.uint8))
    with pytest.raises(SystemExit, match="a.npz.*no reward array"):
        ev.load_episode(str(no_reward))
    junk = tmp_path / "b.npz"
    junk.write_bytes(os.urandom(2000))
    with pytest.raises(SystemExit, match="b.npz.*not a readable episode"):
        ev.load_episode(str(junk))
    with pytest.raises(SystemExit, match="--num-episodes must be >= 1"):
        ev.eval_agent(ev.AgentArgs(checkpoint=str(tmp_path / "agent.pt"), num_episodes=0))


# --- tokenizer: moving objects (Pong's ball) through the VQ-GAN -------------------------------------------
def ball_video(T=6):
    """Pong-like frames: brown field, a static white wall (rows 8-9), a 2x2 white ball moving 3 px per frame."""
    video = np.empty((T, 64, 64, 3), np.uint8)
    video[:] = (144, 72, 17)
    video[:, 8:10] = 236
    for t in range(T):
        video[t, 30:32, 10 + 3 * t:12 + 3 * t] = 236
    return video


def test_object_pixels_find_the_ball_not_the_wall():
    video = ball_video()
    objects, background = ev.object_pixels(video, min_brightness=0.5)
    assert (background * 255).round().astype(np.uint8)[30, 10].tolist() == [144, 72, 17]  # the field
    assert not objects[0].any()  # nothing has moved yet
    for t in range(1, len(video)):
        ys, xs = np.nonzero(objects[t])
        assert set(ys) == {30, 31} and set(xs) == {10 + 3 * t, 11 + 3 * t}


class _FakeTokenizer:
    """Stands in for a VQ-GAN: 'codes' are the frames; decoding returns them, or the field without the ball."""
    image_size, mask = 64, None

    def __init__(self, drop_ball):
        self.drop_ball = drop_ball

    def encode(self, frames):
        return torch.as_tensor(frames)

    def decode(self, codes):
        out = codes.clone()
        if self.drop_ball:
            out[:, 30:32] = torch.tensor([144, 72, 17], dtype=torch.uint8)
        return out


@pytest.mark.parametrize("drop_ball", [False, True])
def test_tokenizer_eval_reports_a_lost_ball(tmp_path, monkeypatch, drop_ball):
    import train_vqgan

    _write_episode(tmp_path / "data" / "atari_pong" / "test" / "000.npz", ball_video(), np.zeros(6, np.float32))
    torch.save({"kind": "vqgan"}, tmp_path / "vqgan.pt")
    monkeypatch.setattr(train_vqgan, "load_vqgan", lambda ckpt, device: _FakeTokenizer(drop_ball))
    ckpt = str(tmp_path / "vqgan.pt")
    ev.eval_tokenizer(ev.TokenizerArgs(checkpoints=[ckpt], data_dir=str(tmp_path / "data"), min_brightness=0.5,
                                       output=str(tmp_path / "out" / "objects.png"), cuda=False))
    s = json.loads((tmp_path / "out" / "summary.json").read_text())["checkpoints"][ckpt]["atari_pong"]
    assert s["object_frames"] == 5 and s["object_pixels_per_frame"] == 4.0
    # the whole-frame PSNR stays high when only the ball is lost (4 of 4096 pixels): the reason for this check
    assert s["psnr"] > 25
    if drop_ball:
        assert s["object_contrast_kept"] == 0.0 and s["object_frames_lost"] == 1.0
    else:
        assert s["object_contrast_kept"] == 1.0 and s["object_frames_lost"] == 0.0 and s["object_psnr"] == 80
    assert (tmp_path / "out" / "objects.png").stat().st_size > 0


def test_replay_bins_the_agents_own_steps_by_task_reward(tmp_path, capsys):
    """eval.py replay: the last complete episodes of a wrapped ring buffer, scored as the labeler scores them and
    binned by task reward per step beside the expert's."""
    model = make_videogpt(tmp_path / "videogpt.pt")
    rm = ev.load_reward_model(model, cuda=False)
    eps = [frames(6, 1), frames(5, 2), frames(7, 3)]  # episodes in the order they were played; the third unfinished
    tasks = [np.array([0.0, 0.1, 0.2, 1.5, 2.0, 0.4], np.float32), np.array([0.0, 1.9, 1.8, 0.3, 0.0], np.float32),
             np.zeros(7, np.float32)]
    image, task = np.concatenate(eps), np.concatenate(tasks)
    first = np.zeros(len(image), bool)
    first[[0, 6, 11]] = True
    ptr = 4  # a full ring buffer whose oldest step sits at index 4: stored rotated
    run = tmp_path / "run"
    run.mkdir()
    np.savez(run / "replay.npz", size=len(image), ptr=ptr, step=99, image=np.roll(image, ptr, 0),
             task=np.roll(task, ptr, 0), is_first=np.roll(first, ptr, 0))
    (run / "run.json").write_text(json.dumps({"env_id": TASK}))
    expert = frames(6, 4)
    _write_episode(tmp_path / "experts" / TASK / "test" / "000001.npz", expert,
                   np.array([0.0, 2.0, 2.0, 0.2, 1.2, 1.9], np.float32))
    out = tmp_path / "replay" / "replay.json"
    s = ev.eval_replay(ev.ReplayArgs(run=str(run), reward_model=str(model), data_dir=str(tmp_path / "experts"),
                                     episodes=5, bins=2, output=str(out), cuda=False))
    assert s["agent_episodes"] == 2 and s["task_reward_edges"] == [0.0, 1.0, 2.0]  # the running episode is left out
    r0, r1 = (ev.episode_viper_rewards(rm, e, TASK, "conditional") for e in eps[:2])
    low = np.concatenate([r0[[0, 1, 4]], r1[[2, 3]]])  # steps whose task reward is below 1.0
    assert s["agent"][0]["steps"] == 5 and s["agent"][0]["mean"] == pytest.approx(float(low.mean()), rel=1e-5)
    assert s["agent"][1]["steps"] == 4 and s["expert"][1]["steps"] == 4  # the top edge (2.0) counts in the top bin
    assert "| 1.00–2.00 | 4 |" in capsys.readouterr().out and (out.parent / "replay.md").exists()
    assert s["reward_precision"] == "fp32"  # a run.json without the field predates bf16 scoring
    # a bf16-scored run is replayed in bf16 unless the flag says otherwise
    (run / "run.json").write_text(json.dumps({"env_id": TASK, "reward_precision": "bf16"}))
    kw = dict(run=str(run), reward_model=str(model), data_dir=str(tmp_path / "experts"), episodes=5, bins=2,
              output=str(out), cuda=False)
    b = ev.eval_replay(ev.ReplayArgs(**kw))
    assert b["reward_precision"] == "bf16" and b["agent"][0]["mean"] != s["agent"][0]["mean"]
    assert b["agent"][0]["mean"] == pytest.approx(s["agent"][0]["mean"], abs=0.5)
    assert ev.eval_replay(ev.ReplayArgs(**kw, reward_precision="fp32"))["agent"] == s["agent"]
    with pytest.raises(SystemExit, match="replay.npz"):
        ev.eval_replay(ev.ReplayArgs(run=str(tmp_path / "nope"), reward_model=str(model), cuda=False))


def test_symlog_axes_label_a_range_inside_one_decade(tmp_path, monkeypatch):
    """reference.png's and episodes.png's symlog axes: rewards between -120 and -250 (the reacher model) fall
    between the decade ticks -100 and -1000, so the axis had no number at all; intermediate ticks must label that
    range, while a range over many decades keeps one tick per decade."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def labels(ax):
        lo, hi = ax.get_ylim()
        return [t.get_text() for t in ax.get_yticklabels() if lo <= t.get_position()[1] <= hi and t.get_text()]

    close, figs = plt.close, []
    monkeypatch.setattr(plt, "close", figs.append)  # keep the figure to read its axis
    curves = {"expert (test split)": np.full(50, -120.0), "random actions": np.full(50, -245.0)}
    ev.plot_reference_steps(curves, tmp_path / "reference.png", "test")
    assert len(labels(figs[0].axes[0])) >= 2 and "-200" in labels(figs[0].axes[0])
    close(figs[0])
    fig, ax = plt.subplots()
    ax.plot([0, 1], [-2.0, -2e5])  # episodes.png's VIPER returns of a balance run: five decades
    ax.set_yscale("symlog", linthresh=1.0)
    fig.canvas.draw()
    before = labels(ax)
    ev.label_symlog_y(ax)
    fig.canvas.draw()
    assert labels(ax) == before and len(before) <= 7  # one per decade, as matplotlib draws them
    ax.set_ylim(-300.0, -60.0)  # the reacher VIPER run's returns in thousands: inside one decade
    ev.label_symlog_y(ax)
    fig.canvas.draw()
    assert {"-100", "-200"} <= set(labels(ax))
    close(fig)
