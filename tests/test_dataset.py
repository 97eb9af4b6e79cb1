"""collect_expert_videos.py: dataset schema, atomic writes, bad inputs, experts beat random."""
import os

import numpy as np
import pytest

import collect_expert_videos as cev


def test_dataset_round_trip_schema(tmp_path):
    args = cev.Args(env_id="dmc_cartpole_balance", policy="random", num_episodes=2, seed=5,
                    output_dir=str(tmp_path), test_fraction=0.5)
    returns = cev.main(args)
    train = sorted(os.listdir(tmp_path / "dmc_cartpole_balance" / "train"))
    test = sorted(os.listdir(tmp_path / "dmc_cartpole_balance" / "test"))
    assert train == ["000005.npz"] and test == ["000006.npz"]
    ep = np.load(tmp_path / "dmc_cartpole_balance" / "train" / "000005.npz")
    assert set(ep.files) == {"video", "action", "reward"}
    assert ep["video"].dtype == np.uint8 and ep["video"].shape == (501, 64, 64, 3)
    assert ep["action"].dtype == np.float32 and ep["action"].shape == (501, 1)
    assert ep["reward"].dtype == np.float32 and ep["reward"].shape == (501,)
    assert ep["reward"][0] == 0 and np.all(ep["action"][0] == 0)
    assert ep["reward"].sum() == pytest.approx(returns[0], rel=1e-5)
    # frame 0 is the reset observation of that episode's seed
    env = cev.make_env("dmc_cartpole_balance")
    assert np.array_equal(env.reset(seed=5)[0], ep["video"][0])


def test_max_steps_caps_an_episode(tmp_path):
    """--max-steps: an Atari game of thousands of steps is cut to max-steps + 1 frames (frame 0 is the reset)."""
    returns = cev.main(cev.Args(env_id="atari_pong", policy="random", num_episodes=1, seed=3, max_steps=40,
                                output_dir=str(tmp_path), test_fraction=0))
    ep = np.load(tmp_path / "atari_pong" / "train" / "000003.npz")
    assert ep["video"].shape == (41, 64, 64, 3) and ep["action"].shape == ep["reward"].shape == (41,)
    assert ep["action"].dtype == np.int64 and ep["reward"].sum() == returns[0]
    with pytest.raises(SystemExit, match="--max-steps"):
        cev.main(cev.Args(env_id="atari_pong", max_steps=0, output_dir=str(tmp_path)))


def test_interrupted_write_leaves_no_partial_file(tmp_path, monkeypatch):
    def boom(f, **arrays):
        f.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(cev.np, "savez_compressed", boom)
    path = str(tmp_path / "000000.npz")
    with pytest.raises(KeyboardInterrupt):
        cev.save_episode(path, np.zeros((2, 64, 64, 3), np.uint8), np.zeros(2), np.zeros(2))
    assert os.listdir(tmp_path) == []


def test_bad_inputs_fail_clearly(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        cev.main(cev.Args(env_id="dmc_nope_nope", output_dir=str(tmp_path)))
    assert "dmc_nope_nope" in str(e.value) and "dmc_cartpole_balance" in str(e.value)
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(SystemExit) as e:
        cev.main(cev.Args(env_id="dmc_cartpole_balance", output_dir=str(blocker / "sub")))
    assert "cannot write" in str(e.value)
    with pytest.raises(SystemExit):
        cev.main(cev.Args(env_id="dmc_cartpole_balance", epsilon=1.5, output_dir=str(tmp_path)))


def _partial_return(env_id, expert, steps, seed=0):
    env = cev.make_env(env_id, seed=seed)
    policy = cev.scripted_policy(env_id, env) if expert else None  # the expert reads this env's state
    rng = np.random.default_rng(seed)
    obs, _ = env.reset(seed=seed)
    if hasattr(policy, "reset"):
        policy.reset()
    total = 0.0
    for _ in range(steps):
        a = cev.random_action(env, rng) if policy is None else policy(obs)
        obs, r, term, trunc, _ = env.step(a)
        total += r
        if term or trunc:
            break
    return total


@pytest.mark.parametrize("env_id,steps,margin", [
    ("dmc_cartpole_balance", 250, 100.0),
    ("dmc_cartpole_swingup", 250, 50.0),
    ("dmc_pendulum_swingup", 250, 50.0),
    ("dmc_reacher_easy", 250, 50.0),
    ("dmc_point_mass_easy", 250, 50.0),
    ("atari_pong", 1500, 2.0),
])
def test_scripted_expert_beats_random(env_id, steps, margin):
    expert = _partial_return(env_id, True, steps)
    rand = _partial_return(env_id, False, steps)
    assert expert > rand + margin, (expert, rand)


def test_cart_wander_moves_the_balanced_cart(tmp_path):
    """--cart-wander: the expert keeps the pole up while its set-point carries the cart along the rail, a new swing
    per episode; 0 holds it at the centre (every episode then ends in the same frame)."""
    env = cev.make_env("dmc_cartpole_balance", seed=0)

    def run(policy, seed):
        env.reset(seed=seed)
        policy.reset()
        xs, cos = [], []
        for _ in range(250):  # 5 s: more than half the slowest swing's period
            env.step(policy(None))
            xs.append(env.unwrapped.physics.data.qpos[0])
            cos.append(np.cos(env.unwrapped.physics.data.qpos[1]))
        return np.array(xs), min(cos)

    centred, cos0 = run(cev.scripted_policy("dmc_cartpole_balance", env), 0)
    wander = cev.scripted_policy("dmc_cartpole_balance", env, cart_wander=0.6, seed=3)
    (xa, cosa), (xb, cosb) = run(wander, 0), run(wander, 0)  # same start, the next episode's swing
    assert np.abs(centred[50:]).max() < 0.1 and cos0 > 0.95
    assert min(cosa, cosb) > 0.95  # still balancing
    assert max(np.ptp(xa), np.ptp(xb)) > 0.2 and np.abs(xa - xb).max() > 0.1
    with pytest.raises(SystemExit, match="--cart-wander"):
        cev.main(cev.Args(env_id="dmc_cartpole_balance", cart_wander=1.5, output_dir=str(tmp_path)))
    with pytest.raises(SystemExit, match="--cart-wander"):
        cev.main(cev.Args(env_id="dmc_reacher_easy", cart_wander=0.5, output_dir=str(tmp_path)))
