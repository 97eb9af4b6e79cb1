"""Pixel environments (the ENV block shared by collect_expert_videos.py and train_viper_dreamer.py)."""
import numpy as np
import pytest

from collect_expert_videos import VALID_ENV_IDS, make_env


def test_unknown_env_id_lists_valid_ids():
    with pytest.raises(ValueError) as e:
        make_env("dmc_cartpole_fly")
    assert "dmc_cartpole_fly" in str(e.value) and "dmc_cartpole_balance" in str(e.value)
    assert "atari_pong" in VALID_ENV_IDS


def test_dmc_obs_action_repeat_and_episode_length():
    env = make_env("dmc_cartpole_balance", seed=0)
    obs, _ = env.reset(seed=0)
    assert obs.shape == (64, 64, 3) and obs.dtype == np.uint8
    assert env.action_space.shape == (1,) and env.action_space.low.min() == -1 and env.action_space.high.max() == 1
    dt = env.unwrapped._env.control_timestep()
    env.step(np.zeros(1, np.float32))
    # action repeat 2: one agent step advances two control steps of the simulator
    assert env.unwrapped.physics.data.time == pytest.approx(2 * dt)
    steps, done = 1, False
    while not done:
        obs, r, terminated, truncated, _ = env.step(env.action_space.sample())
        assert 0.0 <= r <= 2.0  # dmc reward in [0, 1] per simulator step, summed over the repeat
        steps += 1
        done = terminated or truncated
    assert steps == 500 and truncated and not terminated  # 1000 simulator steps


def test_dmc_same_seed_same_frames():
    def frames(seed):
        env = make_env("dmc_cartpole_swingup", seed=0)
        out = [env.reset(seed=seed)[0]]
        for _ in range(5):
            out.append(env.step(np.full(1, 0.7, np.float32))[0])
        return np.stack(out)

    a, b, c = frames(3), frames(3), frames(4)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_atari_obs_frameskip_and_determinism():
    def run(seed):
        env = make_env("atari_pong", seed=seed)
        obs, _ = env.reset(seed=seed)
        assert obs.shape == (64, 64, 3) and obs.dtype == np.uint8
        assert env.action_space.n == 6  # minimal action set
        f0 = env.unwrapped.ale.getEpisodeFrameNumber()
        out = [obs]
        for t in range(40):
            out.append(env.step(t % 6)[0])
        assert env.unwrapped.ale.getEpisodeFrameNumber() - f0 == 40 * 4  # frameskip 4
        return np.stack(out)

    a, b = run(1), run(1)
    assert np.array_equal(a, b)
    assert a[-1].std() > 0  # a real picture, not a blank frame
