"""Make expert (and degraded) demonstration videos offline, for VIPER.

VIPER learns its reward from expert videos. The public VIPER datasets cannot be
downloaded here, so this script makes its own: scripted experts that read the
*simulator state* (never pixels) drive the pixel environments below, and every
frame the agent would see is recorded.

Output, one file per episode (written to a temporary name, then renamed, so an
interrupted run never leaves a partial episode):

    <output-dir>/<env-id>/{train,test}/<episode>.npz
        video  uint8   [T, 64, 64, 3]  frame 0 is the reset observation
        action float32 [T, A] (DMC) or int64 [T] (Atari); action[t] led to frame t, action[0] = 0
        reward float32 [T]              reward[t] is received on arriving at frame t, reward[0] = 0

`--epsilon` replaces each action with a random one with that probability, which
makes the degraded demonstrations used to check that a learned reward ranks
experts above worse behaviour (eval.py reward).

Example:
    python collect_expert_videos.py --env-id dmc_cartpole_balance --num-episodes 20
"""

import os
import sys
import time
from dataclasses import dataclass
from typing import Literal, Optional

import numpy as np
import tyro
from tqdm import tqdm


@dataclass
class Args:
    env_id: str = "dmc_cartpole_balance"
    """environment: `dmc_<domain>_<task>` (DeepMind Control) or `atari_<game>` (ALE)"""
    policy: Literal["scripted", "random", "agent"] = "scripted"
    """who acts: a scripted expert using simulator state, uniform random actions, or a trained agent"""
    agent_checkpoint: Optional[str] = None
    """agent.pt written by train_viper_dreamer.py (only with --policy agent)"""
    num_episodes: int = 20
    """number of episodes to record"""
    epsilon: float = 0.0
    """probability of replacing each action with a uniformly random one (degraded demonstrations)"""
    seed: int = 1
    """seed of episode i is seed + i; also seeds the epsilon and random-policy draws"""
    output_dir: str = "data/experts"
    """episodes go to <output-dir>/<env-id>/{train,test}/"""
    test_fraction: float = 0.1
    """share of episodes written to test/ (the last ones); at least one when > 0 and num_episodes > 1"""
    prefix: str = ""
    """prepended to episode file names, e.g. `eps0.50_` so degraded episodes can sit beside experts"""
    cart_wander: float = 0.0
    """cartpole experts only: the most the cart's balancing set-point swings from the rail's centre (sinusoid, 4-8 s
    period, drawn per episode). 0 balances every episode at the centre, so the video model sees a single upright
    frame and scores any other upright pose like a random one; README's swing-up results try 0.6"""
    max_steps: Optional[int] = None
    """end each episode after this many agent steps (its video then holds max-steps + 1 frames); default: no cap.
    Keeps long episodes small: the scripted Pong expert's 21-point game lasts ~3,900 steps (~5-6 points per 1,000)"""


# ==== ENV: copied verbatim from collect_expert_videos.py into train_viper_dreamer.py; tests/test_parity.py keeps the copies identical ====
os.environ.setdefault("MUJOCO_GL", "egl")  # headless rendering
import gymnasium as gym  # noqa: E402

DMC_TASKS = [
    "acrobot_swingup", "ball_in_cup_catch", "cartpole_balance", "cartpole_balance_sparse", "cartpole_swingup",
    "cartpole_swingup_sparse", "cheetah_run", "finger_spin", "finger_turn_easy", "finger_turn_hard",
    "hopper_hop", "hopper_stand", "pendulum_swingup", "point_mass_easy", "quadruped_run", "quadruped_walk",
    "reacher_easy", "reacher_hard", "walker_run", "walker_stand", "walker_walk",
]
ATARI_GAMES = [
    "alien", "amidar", "assault", "asterix", "boxing", "breakout", "freeway", "krull", "ms_pacman", "pong",
    "qbert", "seaquest", "space_invaders",
]
VALID_ENV_IDS = [f"dmc_{t}" for t in DMC_TASKS] + [f"atari_{g}" for g in ATARI_GAMES]


class DMCEnv(gym.Env):
    """DeepMind Control suite from pixels, as in DreamerV3/VIPER.

    64x64 RGB from camera 0 (quadruped: camera 2), action repeat 2, actions in [-1, 1],
    1000 simulator steps = 500 agent steps per episode. Rendering uses `shadowsize=0,
    offsamples=0` (no shadow map, no multisampling): ~5x faster than MuJoCo's default on CPU,
    and identical for expert videos and agent observations because both use this class.
    """

    metadata = {"render_modes": ["rgb_array"]}

    def __init__(self, domain: str, task: str, seed: int = 0, size: int = 64, action_repeat: int = 2):
        from dm_control import suite

        self.domain, self.task, self.size, self.action_repeat = domain, task, size, action_repeat
        self._env = suite.load(domain, task, task_kwargs={"random": seed})
        self.physics = self._env.physics
        self.physics.model.vis.quality.shadowsize = 0
        self.physics.model.vis.quality.offsamples = 0
        self.camera = 2 if domain == "quadruped" else 0
        spec = self._env.action_spec()
        self._low, self._high = spec.minimum.astype(np.float64), spec.maximum.astype(np.float64)
        self.action_space = gym.spaces.Box(-1.0, 1.0, spec.shape, np.float32)
        self.observation_space = gym.spaces.Box(0, 255, (size, size, 3), np.uint8)

    def render(self):
        return self.physics.render(self.size, self.size, camera_id=self.camera)

    def reset(self, seed=None, options=None):
        if seed is not None:  # dm_control draws initial states from the task's RandomState
            self._env.task._random = np.random.RandomState(seed)
        self._env.reset()
        return self.render(), {}

    def step(self, action):
        action = np.clip(np.asarray(action, np.float64), -1.0, 1.0)
        action = self._low + (action + 1.0) / 2.0 * (self._high - self._low)
        reward, terminated, truncated = 0.0, False, False
        for _ in range(self.action_repeat):
            ts = self._env.step(action)
            reward += ts.reward or 0.0
            if ts.last():
                terminated, truncated = ts.discount == 0, ts.discount != 0
                break
        return self.render(), reward, terminated, truncated, {}


class AtariEnv(gym.Env):
    """Atari through ale-py, as in DreamerV3/VIPER.

    64x64 RGB (area resize), frameskip 4 with a max over the last two frames, sticky actions
    p=0.25 (ALE v5 default), no termination on life loss, at most 108k frames per episode,
    the game's minimal action set (Pong: 6 actions).
    """

    metadata = {"render_modes": ["rgb_array"]}

    def __init__(self, game: str, seed: int = 0, size: int = 64, frameskip: int = 4):
        import ale_py

        gym.register_envs(ale_py)
        name = "".join(w.capitalize() for w in game.split("_"))
        self._env = gym.make(f"ALE/{name}-v5", frameskip=1, repeat_action_probability=0.25,
                             full_action_space=False, max_num_frames_per_episode=108_000)
        self.ale = self._env.unwrapped.ale
        self.size, self.frameskip, self._seed = size, frameskip, seed
        self.action_space = self._env.action_space
        self.observation_space = gym.spaces.Box(0, 255, (size, size, 3), np.uint8)
        self._seeded = False

    def _obs(self, frames):
        import cv2

        frame = np.maximum(frames[-2], frames[-1]) if len(frames) > 1 else frames[-1]
        return cv2.resize(frame, (self.size, self.size), interpolation=cv2.INTER_AREA)

    def render(self):
        return self._obs([self.ale.getScreenRGB()])

    def reset(self, seed=None, options=None):
        if seed is None and not self._seeded:
            seed = self._seed
        self._seeded = True
        obs, _ = self._env.reset(seed=seed)
        return self._obs([obs]), {}

    def step(self, action):
        frames, reward, terminated, truncated = [], 0.0, False, False
        for _ in range(self.frameskip):
            obs, r, terminated, truncated, _ = self._env.step(int(action))
            frames.append(obs)
            reward += float(r)
            if terminated or truncated:
                break
        return self._obs(frames[-2:]), reward, terminated, truncated, {}


def make_env(env_id: str, seed: int = 0) -> gym.Env:
    """`dmc_<domain>_<task>` or `atari_<game>` -> a gymnasium env with 64x64x3 uint8 observations."""
    if env_id not in VALID_ENV_IDS:
        raise ValueError(f"unknown env id {env_id!r}; valid ids: {', '.join(VALID_ENV_IDS)}")
    suite, name = env_id.split("_", 1)
    if suite == "dmc":
        domain = "ball_in_cup" if name.startswith("ball_in_cup") else "point_mass" if name.startswith(
            "point_mass") else name.split("_")[0]
        return DMCEnv(domain, name[len(domain) + 1:], seed=seed)
    return AtariEnv(name, seed=seed)
# ==== END ENV ====


# ---------------------------------------------------------------------------------------------
# Scripted experts. Each reads privileged simulator state (positions, velocities, RAM) and
# returns an action in the env's action space. They exist only to make demonstration videos.
# ---------------------------------------------------------------------------------------------
def _lqr_gain(env: DMCEnv, q_diag, r: float):
    """Discrete LQR gain around the current state, from a central finite-difference linearisation.

    The dynamics are linearised over one agent step (action_repeat simulator steps), so the gain
    maps the state error [qpos, qvel] to a normalised action in [-1, 1] held for one agent step.
    """
    import mujoco

    m, d = env.physics.model.ptr, env.physics.data.ptr
    nq, nv, nu = m.nq, m.nv, m.nu
    x0 = np.concatenate([d.qpos, d.qvel]).copy()
    u0 = np.zeros(nu)

    def f(x, u):  # one agent step (action_repeat simulator steps; RK4 has no analytic derivative here)
        d.qpos[:], d.qvel[:] = x[:nq], x[nq:]
        d.ctrl[:] = env._low + (u + 1.0) / 2.0 * (env._high - env._low)
        for _ in range(env.action_repeat):
            mujoco.mj_step(m, d)
        return np.concatenate([d.qpos, d.qvel]).copy()

    eps = 1e-5
    Ak = np.stack([(f(x0 + eps * e, u0) - f(x0 - eps * e, u0)) / (2 * eps) for e in np.eye(nq + nv)], 1)
    Bk = np.stack([(f(x0, u0 + eps * e) - f(x0, u0 - eps * e)) / (2 * eps) for e in np.eye(nu)], 1)
    d.qpos[:], d.qvel[:], d.ctrl[:] = x0[:nq], x0[nq:], 0.0
    mujoco.mj_forward(m, d)
    Q, R = np.diag(q_diag), np.eye(m.nu) * r
    P = Q.copy()
    for _ in range(2000):  # Riccati iteration to the fixed point
        K = np.linalg.solve(R + Bk.T @ P @ Bk, Bk.T @ P @ Ak)
        P_new = Q + Ak.T @ P @ (Ak - Bk @ K)
        if np.abs(P_new - P).max() < 1e-9:
            P = P_new
            break
        P = P_new
    return np.linalg.solve(R + Bk.T @ P @ Bk, Bk.T @ P @ Ak)


def _upright_lqr_gain(env: DMCEnv, q_diag, r: float):
    """`_lqr_gain` at the all-zero state (pole upright, at rest); the simulator state is put back afterwards."""
    p = env.physics
    saved = p.get_state().copy()
    with p.reset_context():
        p.data.qpos[:] = 0.0
        p.data.qvel[:] = 0.0
    K = _lqr_gain(env, q_diag, r)
    p.set_state(saved)
    p.forward()
    return K


def _pole_energy(model, body: int, angle: float, ang_vel: float) -> float:
    """Energy of a pole swinging about its hinge, in units of m*g*l (l: hinge to centre of mass).

    0 when resting upright (angle 0), -2 when resting hanging down."""
    mass, l = model.body_mass[body], model.body_ipos[body][2]
    inertia = model.body_inertia[body][1] + mass * l ** 2  # about the hinge (parallel-axis theorem)
    return 0.5 * inertia * ang_vel ** 2 / (mass * -model.opt.gravity[2] * l) + np.cos(angle) - 1.0


def _wrap(angle):
    return (angle + np.pi) % (2 * np.pi) - np.pi


class CartpoleExpert:
    """Energy-pumping swing-up, then LQR around the upright at a cart set-point.

    Far from upright it accelerates the cart against (pole speed x cos(angle)), which feeds the pole
    energy until it matches resting upright (the cart acceleration a changes it at the rate
    -m l cos(angle) angle' a); weak PD keeps the cart near the middle of the rail. Within ~37 degrees
    of upright an LQR on [x - x*, angle, x' - x*', angle'] takes over. Balance starts upright, so only LQR acts.

    The set-point x* is the rail's centre (`cart_wander` 0): then every episode ends in the same frame, a
    centred, motionless upright pole. With `cart_wander` A > 0 it moves as x*(t) = a sin(2 pi t / T + phi),
    a ~ U(0, A), T ~ U(4, 8) s, phi ~ U(0, 2 pi) drawn per episode (`seed`), so the upright pole is seen
    across the rail, the cart moving and the pole leaning to move it (a 0.6 swing over 4 s asks ~9 degrees).
    """

    def __init__(self, env: DMCEnv, cart_wander: float = 0.0, seed: int = 0):
        self.env, self.cart_wander, self.rng = env, cart_wander, np.random.default_rng(seed)
        self.K = _upright_lqr_gain(env, [1.0, 10.0, 0.1, 0.1], 0.5)
        self.reset()

    def reset(self):
        self.wave = (0.0, 0.0, 0.0)  # (amplitude, angular frequency, phase) of x*
        if self.cart_wander > 0:
            a, period, phase = self.rng.uniform(0, self.cart_wander), self.rng.uniform(4, 8), self.rng.uniform(0, 2 * np.pi)
            self.wave = (a, 2 * np.pi / period, phase)

    def __call__(self, obs):
        p = self.env.physics
        (x, th), (xd, thd) = p.data.qpos, p.data.qvel
        th = _wrap(th)
        if np.cos(th) > 0.8:  # near upright: linear controller
            a, w, phase = self.wave
            x_ref, xd_ref = a * np.sin(w * p.data.time + phase), a * w * np.cos(w * p.data.time + phase)
            return np.clip(-self.K @ np.array([x - x_ref, th, xd - xd_ref, thd]), -1, 1).astype(np.float32)
        energy = _pole_energy(p.model, 2, th, thd)
        pump = 2.0 * -energy * -np.sign(thd * np.cos(th) + 1e-9)
        return np.clip([pump - 0.3 * x - 0.3 * xd], -1, 1).astype(np.float32)


class PendulumExpert:
    """Energy pumping, then LQR.

    The torque limit (1 Nm) is ~5x too weak to lift the 1 kg, 0.5 m pole directly, so while far from
    upright it applies full torque along the swing whenever the pole's energy is below that of
    resting upright (with a small margin for the joint damping); within ~25 degrees of upright an LQR
    on [angle, angle'] catches and holds it.
    """

    def __init__(self, env: DMCEnv):
        self.env = env
        self.K = _upright_lqr_gain(env, [10.0, 0.1], 0.1)

    def __call__(self, obs):
        p = self.env.physics
        th, thd = _wrap(p.data.qpos[0]), p.data.qvel[0]
        if np.cos(th) > 0.9:
            return np.clip(-self.K @ np.array([th, thd]), -1, 1).astype(np.float32)
        energy = _pole_energy(p.model, 1, th, thd)
        return np.clip([20.0 * (0.1 - energy) * np.sign(thd + 1e-9)], -1, 1).astype(np.float32)


class ReacherExpert:
    """Analytic two-link inverse kinematics for the target, then joint-space PD.

    Of the two elbow solutions it takes the one nearer the current pose (the wrist range is +-160
    degrees, so the elbow bend is capped at 155); the PD torque saturates at the actuator limit.
    """

    def __init__(self, env: DMCEnv):
        self.env = env

    def __call__(self, obs):
        p = self.env.physics
        q, qd = p.data.qpos, p.data.qvel
        tx, ty = p.named.data.geom_xpos["target", :2]  # the arm's shoulder is at the origin
        l1 = l2 = 0.12  # shoulder->wrist, wrist->fingertip
        c2 = np.clip((tx * tx + ty * ty - l1 * l1 - l2 * l2) / (2 * l1 * l2), np.cos(np.radians(155)), 1.0)
        errors = []
        for q2 in (np.arccos(c2), -np.arccos(c2)):
            q1 = np.arctan2(ty, tx) - np.arctan2(l2 * np.sin(q2), l1 + l2 * np.cos(q2))
            errors.append(np.array([_wrap(q1 - q[0]), q2 - q[1]]))
        err = min(errors, key=lambda e: np.abs(e).sum())
        return np.clip(10.0 * err - 0.3 * qd, -1, 1).astype(np.float32)


class PointMassExpert:
    """PD control of the mass to the target: full push while far, no force (no control cost) once there."""

    def __init__(self, env: DMCEnv):
        self.env = env

    def __call__(self, obs):
        p = self.env.physics
        err = p.named.data.geom_xpos["target", :2] - p.named.data.geom_xpos["pointmass", :2]
        return np.clip(30.0 * err - 1.0 * p.data.qvel, -1, 1).astype(np.float32)


class PongExpert:
    """Intercept tracking from RAM, with the aim on the paddle picked by exact lookahead in the emulator.

    The controller predicts where the ball crosses our paddle's column (unfolding the wall bounces)
    and steers the paddle there (bang-bang with a deadband, damped by the paddle's speed). Where the
    ball lands on the paddle sets the return angle, and mostly steep returns beat the built-in
    opponent; but the paddle moves ~20 px per step, too coarse to place an edge hit reliably. So at
    the start of each approach the expert clones the emulator (state and sticky-action RNG, which
    makes the rollout exact), plays each candidate aim offset until the rally ends, restores the
    state, and plays the aim whose rally ends best: a point won soonest, else a returned ball.
    RAM: ball x = ram[49], ball y = ram[54], our paddle y = ram[51] (checked against the screen).
    Keeps per-episode memory and detects a new episode by the emulator's frame counter going back.
    """

    BALL_X, BALL_Y, PADDLE_Y = 49, 54, 51
    AIMS = (0, 6, -6, 10, -10, 3, -3)  # ball y minus paddle centre at the hit; the first is preferred on ties

    def __init__(self, env: AtariEnv):
        self.env, self.frame = env, -1
        self.actions = env._env.unwrapped._action_set  # minimal set: NOOP, FIRE, RIGHT (up), LEFT (down), ...

    def _ram(self):
        ram = self.env.ale.getRAM()
        return int(ram[self.BALL_X]), int(ram[self.BALL_Y]), int(ram[self.PADDLE_Y])

    @staticmethod
    def control(ball, prev_ball, paddle, prev_paddle, aim):
        """Action index steering the paddle to the predicted crossing point (+ aim), or to the middle."""
        (bx, by), target = ball, 125.0
        if by > 0 and bx < 205 and prev_ball is not None and bx > prev_ball[0]:  # ball in play, coming at us
            vx, vy = bx - prev_ball[0], by - prev_ball[1]
            lo, hi = 46, 206  # ball y between the walls
            y = (by + vy * (188 - bx) / vx - lo) % (2 * (hi - lo))  # at x 188 the ball touches our paddle
            target = lo + min(y, 2 * (hi - lo) - y) - aim
        err = paddle + 0.5 * (paddle - (prev_paddle or paddle)) + 6.5 - target  # paddle centre = ram + 6.5
        return 2 if err > 8 else 3 if err < -8 else 0

    def _rollout(self, aim, ball, paddle, horizon=160):
        """Plays `control` with this aim from the current emulator state until the rally ends; returns its score."""
        prev_ball, prev_paddle, returned = ball, paddle, False
        for t in range(horizon):
            bx, by, p = self._ram()
            a = self.control((bx, by), prev_ball, p, prev_paddle, aim)
            reward = sum(self.env.ale.act(self.actions[a]) for _ in range(self.env.frameskip))
            if reward:
                return reward * (horizon + 1 - t)  # win soon, lose late
            if prev_ball is not None and by > 0:
                returned |= bx < prev_ball[0]
                if returned and bx > prev_ball[0]:
                    return 1  # the opponent returned our ball: the rally goes on
            prev_ball, prev_paddle = ((bx, by) if by > 0 and bx < 205 else None), p
        return 0

    def __call__(self, obs):
        ale = self.env.ale
        if ale.getEpisodeFrameNumber() < self.frame or self.frame < 0:  # a new episode started
            self.ball, self.paddle, self.aim, self.planned = None, None, 0, False
        self.frame = ale.getEpisodeFrameNumber()
        bx, by, paddle = self._ram()
        in_play = by > 0 and bx < 205
        approaching = in_play and self.ball is not None and bx > self.ball[0]
        if approaching and not self.planned:
            state = ale.cloneState(include_rng=True)
            scores = []
            for aim in self.AIMS:
                scores.append(self._rollout(aim, self.ball, self.paddle))
                ale.restoreState(state)
            self.aim, self.planned = self.AIMS[int(np.argmax(scores))], True
        self.planned &= approaching
        a = self.control((bx, by), self.ball, paddle, self.paddle, self.aim)
        self.ball, self.paddle = ((bx, by) if in_play else None), paddle
        return a


def scripted_policy(env_id: str, env: gym.Env, cart_wander: float = 0.0, seed: int = 0):
    """Returns obs -> action for env_id, or raises listing the env ids that have an expert.
    `cart_wander` and `seed`: the cartpole experts' moving set-point (CartpoleExpert); other experts have no cart
    (cart_wander > 0 raises for them) and ignore `seed`."""
    experts = {
        "dmc_cartpole_balance": CartpoleExpert, "dmc_cartpole_swingup": CartpoleExpert,
        "dmc_pendulum_swingup": PendulumExpert, "dmc_reacher_easy": ReacherExpert,
        "dmc_point_mass_easy": PointMassExpert, "atari_pong": PongExpert,
    }
    if env_id not in experts:
        raise ValueError(f"no scripted expert for {env_id!r}; scripted experts exist for: {', '.join(experts)}")
    if experts[env_id] is CartpoleExpert:
        return CartpoleExpert(env.unwrapped, cart_wander, seed)
    if cart_wander:
        raise ValueError(f"--cart-wander moves the cartpole experts' set-point; {env_id!r} has no cart")
    return experts[env_id](env.unwrapped)


def random_action(env: gym.Env, rng: np.random.Generator):
    space = env.action_space
    if isinstance(space, gym.spaces.Discrete):
        return int(rng.integers(space.n))
    return rng.uniform(-1.0, 1.0, space.shape).astype(np.float32)


def save_episode(path: str, video, action, reward):
    """Atomic write: the npz goes to `<path>.tmp` first and is renamed onto `<path>` only when complete,
    so readers globbing `*.npz` never see a partial episode."""
    tmp = path + ".tmp"
    try:
        with open(tmp, "wb") as f:
            np.savez_compressed(f, video=np.asarray(video, np.uint8), action=np.asarray(action),
                                reward=np.asarray(reward, np.float32))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def run_episode(env, policy, rng, epsilon, seed, max_steps=None):
    """One episode -> (video, action, reward) as saved; max_steps ends it after that many agent steps."""
    obs, _ = env.reset(seed=seed)
    if hasattr(policy, "reset"):  # stateful policies (agent latent, expert phase) start afresh
        policy.reset()
    discrete = isinstance(env.action_space, gym.spaces.Discrete)
    zero = 0 if discrete else np.zeros(env.action_space.shape, np.float32)
    video, actions, rewards = [obs], [zero], [0.0]
    done = False
    while not done:
        a = random_action(env, rng) if (policy is None or rng.random() < epsilon) else policy(obs)
        obs, r, terminated, truncated, _ = env.step(a)
        video.append(obs)
        actions.append(a)
        rewards.append(r)
        done = terminated or truncated or (max_steps is not None and len(rewards) > max_steps)
    actions = np.asarray(actions, np.int64 if discrete else np.float32)
    return np.stack(video), actions, np.asarray(rewards, np.float32)


def main(args: Args):
    if args.env_id not in VALID_ENV_IDS:
        sys.exit(f"error: unknown env id {args.env_id!r}; valid ids: {', '.join(VALID_ENV_IDS)}")
    if not 0.0 <= args.epsilon <= 1.0:
        sys.exit(f"error: --epsilon must be in [0, 1], got {args.epsilon}")
    if not 0.0 <= args.cart_wander <= 1.0:  # the rail ends at +-1.8: leave room to lean and brake
        sys.exit(f"error: --cart-wander must be in [0, 1], got {args.cart_wander}")
    if args.cart_wander and args.policy != "scripted":
        sys.exit(f"error: --cart-wander moves the scripted expert's set-point; --policy is {args.policy!r}")
    if args.max_steps is not None and args.max_steps < 1:
        sys.exit(f"error: --max-steps must be >= 1, got {args.max_steps}")
    if args.policy == "agent" and not args.agent_checkpoint:
        sys.exit("error: --policy agent needs --agent-checkpoint PATH")
    num_test = 0
    if args.test_fraction > 0 and args.num_episodes > 1:
        num_test = max(1, int(round(args.num_episodes * args.test_fraction)))
    out = os.path.join(args.output_dir, args.env_id)
    try:  # fail before any simulation if the output folder cannot be written
        for split in ("train", "test"):
            os.makedirs(os.path.join(out, split), exist_ok=True)
            probe = os.path.join(out, split, ".write_probe")
            open(probe, "w").close()
            os.remove(probe)
    except OSError as e:
        sys.exit(f"error: cannot write to output folder {out!r}: {e}")

    env = make_env(args.env_id, seed=args.seed)
    rng = np.random.default_rng(args.seed)
    if args.policy == "scripted":
        try:
            policy = scripted_policy(args.env_id, env, args.cart_wander, args.seed)
        except ValueError as e:
            sys.exit(f"error: {e}")
    elif args.policy == "agent":
        from train_viper_dreamer import load_agent_policy  # CleanRL-style eval import

        policy = load_agent_policy(args.agent_checkpoint, env)
    else:
        policy = None
    returns, t0 = [], time.time()
    bar = tqdm(range(args.num_episodes), desc=f"{args.env_id} {args.policy} eps={args.epsilon}")
    for i in bar:
        video, action, reward = run_episode(env, policy, rng, args.epsilon, seed=args.seed + i,
                                            max_steps=args.max_steps)
        split = "test" if i >= args.num_episodes - num_test else "train"
        save_episode(os.path.join(out, split, f"{args.prefix}{args.seed + i:06d}.npz"), video, action, reward)
        returns.append(float(reward.sum()))
        tqdm.write(f"episode {i} ({split}): return {returns[-1]:.1f}, length {len(reward) - 1}")
        bar.set_postfix(mean_return=f"{np.mean(returns):.1f}")
    print(f"{args.env_id} policy={args.policy} epsilon={args.epsilon}: mean return "
          f"{np.mean(returns):.1f} +- {np.std(returns):.1f} over {len(returns)} episodes "
          f"({time.time() - t0:.0f}s) -> {out}")
    return returns


if __name__ == "__main__":
    main(tyro.cli(Args))
