"""The env factory against real envpool and Gymnasium envs (few envs, few steps)."""

from __future__ import annotations

import envpool
import gymnasium
import numpy as np
import pytest

from pbt_rl.config import ConfigError, EnvConfig
from pbt_rl.envs import (
    FAMILIES,
    GYMNASIUM_FALLBACK_NOTE,
    StepBatch,
    UnknownEnvError,
    atari_max_episode_steps,
    check_env_id,
    env_family,
    envpool_options,
    make_env,
    per_env_seeds,
    supported_envs,
)

# Taxi-v4 is registered in Gymnasium but not in envpool, so it exercises the fallback backend.
GYMNASIUM_ONLY_ID = "Taxi-v4"


def random_actions(env, rng: np.random.Generator, batch: int) -> np.ndarray:
    """Actions ``[batch, ...]`` drawn from ``rng`` (not the space's own RNG, for reproducibility)."""
    space = env.action_space
    if isinstance(space, gymnasium.spaces.Discrete):
        return rng.integers(0, space.n, size=batch)
    return rng.uniform(-1.0, 1.0, size=(batch, *space.shape))


def assert_batch_types(batch: StepBatch, size: int) -> None:
    assert batch.reward.shape == (size,) and batch.reward.dtype == np.float32
    for flags in (batch.terminated, batch.truncated, batch.is_first):
        assert flags.shape == (size,) and flags.dtype == np.bool_
    assert batch.env_ids.shape == (size,) and batch.env_ids.dtype == np.int32
    assert batch.episode_returns.dtype == np.float64 and batch.episode_lengths.dtype == np.int64
    assert batch.episode_returns.shape == batch.episode_lengths.shape


@pytest.mark.parametrize(
    "env_id, family, obs_shape, obs_dtype",
    [
        ("Pong-v5", "atari", (4, 84, 84), np.uint8),
        ("Hopper-v5", "mujoco", (11,), np.float32),
        ("CartPole-v1", "classic", (4,), np.float32),
        (GYMNASIUM_ONLY_ID, "gymnasium", (500,), np.float32),
    ],
)
def test_shapes_dtypes_and_first_steps(env_id, family, obs_shape, obs_dtype):
    num_envs = 3
    with make_env(EnvConfig(id=env_id), num_envs=num_envs, seed=0) as env:
        assert env.family == family and env_family(env_id) == family
        assert (env.num_envs, env.batch_size, env.is_async) == (num_envs, num_envs, False)
        assert env.observation_space.shape == obs_shape and env.observation_space.dtype == obs_dtype
        batch = env.reset()
        assert batch.obs.shape == (num_envs, *obs_shape) and batch.obs.dtype == obs_dtype
        assert_batch_types(batch, num_envs)
        assert batch.is_first.all() and not batch.reward.any()
        assert batch.env_ids.tolist() == list(range(num_envs))
        rng = np.random.default_rng(0)
        for _ in range(3):
            batch = env.step(random_actions(env, rng, num_envs))
            assert batch.obs.shape == (num_envs, *obs_shape) and batch.obs.dtype == obs_dtype
            assert_batch_types(batch, num_envs)
            assert not batch.is_first.any()
        assert env.family == family


def test_gymnasium_only_id_is_not_an_envpool_id_and_is_one_hot_encoded():
    assert GYMNASIUM_ONLY_ID not in envpool.list_all_envs()
    with make_env(EnvConfig(id=GYMNASIUM_ONLY_ID), num_envs=2, seed=0) as env:
        assert env.backend == "gymnasium"
        obs = env.reset().obs
        assert np.array_equal(obs.sum(axis=1), np.ones(2, np.float32))
        assert set(np.unique(obs).tolist()) == {0.0, 1.0}


def test_atari_defaults_follow_the_machado_protocol():
    with make_env(EnvConfig(id="Pong-v5"), num_envs=1, seed=0) as env:
        options = env.envpool_options
    assert options["repeat_action_probability"] == 0.25
    assert options["noop_max"] == 1
    assert options["episodic_life"] is False
    assert options["use_fire_reset"] is False
    assert options["max_episode_steps"] == 27_000  # 108k frames at frame skip 4
    assert options["reward_clip"] is True  # learning reward only; returns stay raw


def test_atari_options_follow_the_config():
    cfg = EnvConfig(id="Breakout-v5", frame_skip=5, frame_stack=2, image_size=64, noop_max=30,
                    episodic_life=True, reward_clip=False, repeat_action_probability=0.0,
                    full_action_space=True)
    options = envpool_options(cfg, "atari")
    assert options["max_episode_steps"] == 108_000 // 5
    assert (options["stack_num"], options["img_height"], options["img_width"]) == (2, 64, 64)
    assert (options["noop_max"], options["episodic_life"], options["reward_clip"]) == (30, True, False)
    assert options["repeat_action_probability"] == 0.0 and options["full_action_space"] is True
    assert atari_max_episode_steps(EnvConfig(max_episode_steps=500)) == 500
    assert envpool_options(EnvConfig(id="CartPole-v1"), "classic") == {}
    assert envpool_options(EnvConfig(id="CartPole-v1", max_episode_steps=7), "classic") == {"max_episode_steps": 7}
    with make_env(cfg, num_envs=1, seed=0) as env:
        assert env.reset().obs.shape == (1, 2, 64, 64)
        assert env.action_space.n == 18


def observation_sequence(env_id: str, seed: int, steps: int = 25) -> np.ndarray:
    """``[steps + 1, num_envs, ...]`` observations under a fixed action sequence."""
    rng = np.random.default_rng(1234)  # same actions for every seed
    with make_env(EnvConfig(id=env_id), num_envs=2, seed=seed) as env:
        observations = [env.reset().obs]
        for _ in range(steps):
            observations.append(env.step(random_actions(env, rng, 2)).obs)
    return np.stack(observations)


@pytest.mark.parametrize("env_id", ["Pong-v5", "Hopper-v5", "CartPole-v1", GYMNASIUM_ONLY_ID])
def test_same_seed_same_observations_different_seed_different(env_id):
    first = observation_sequence(env_id, seed=1)
    assert np.array_equal(first, observation_sequence(env_id, seed=1))
    assert not np.array_equal(first, observation_sequence(env_id, seed=2))


def test_per_env_seeds_do_not_overlap_between_neighbouring_member_seeds():
    seeds_0, seeds_1 = per_env_seeds(0, 8), per_env_seeds(1, 8)
    assert len(set(seeds_0.tolist()) | set(seeds_1.tolist())) == 16
    assert ((0 <= seeds_0) & (seeds_0 < 2**31)).all()
    assert np.array_equal(seeds_0, per_env_seeds(0, 8))


@pytest.mark.parametrize("env_id", ["Pong-v5", "CartPole-v1", GYMNASIUM_ONLY_ID])
def test_async_send_recv_returns_batch_size_envs(env_id):
    """Which of the envs in flight a recv returns depends on envpool's thread scheduling. What is
    guaranteed: batch_size distinct envs, all of them in flight, so when only batch_size envs are
    in flight exactly those come back; and an env's reset step is its first delivery and the one
    after each of its episode ends."""
    num_envs, batch_size = 4, 2
    cfg = EnvConfig(id=env_id, num_envs=num_envs, async_batch_size=batch_size)
    rng = np.random.default_rng(0)
    in_flight = set(range(num_envs))  # reset starts every env
    episode_ended: dict[int, bool] = {}  # env id -> did its latest delivery end an episode

    def received(batch: StepBatch) -> StepBatch:
        ids = batch.env_ids.tolist()
        assert_batch_types(batch, batch_size)
        assert batch.obs.shape[0] == batch_size
        assert len(set(ids)) == batch_size and set(ids) <= in_flight, (ids, in_flight)
        in_flight.difference_update(ids)
        for env_index, first, ended in zip(ids, batch.is_first.tolist(), (batch.terminated | batch.truncated).tolist()):
            assert first == episode_ended.get(env_index, True), env_index
            episode_ended[env_index] = ended
        return batch

    def send(batch: StepBatch) -> None:
        env.send(random_actions(env, rng, batch_size), batch.env_ids)
        in_flight.update(batch.env_ids.tolist())

    with make_env(cfg, num_envs=num_envs, seed=0) as env:
        assert env.is_async and env.batch_size == batch_size
        held = [received(env.reset())]
        assert held[0].is_first.all()
        held.append(received(env.recv()))  # nothing sent: the other envs are the only ones in flight
        assert held[1].is_first.all() and set(episode_ended) == set(range(num_envs))
        for _ in range(6):  # every env sent, then received once by two recvs
            for batch in held:
                send(batch)
            held = [received(env.recv()), received(env.recv())]
            assert not in_flight
        batch = held[0]
        send(held[1])
        for _ in range(12):  # pipelined: act on whichever envs are ready
            send(batch)
            batch = received(env.recv())
        ids_in_flight = set(in_flight)
        assert set(received(env.recv()).env_ids.tolist()) == ids_in_flight
        with pytest.raises(RuntimeError, match="send"):
            env.step(random_actions(env, rng, num_envs))


@pytest.mark.parametrize("env_id", ["CartPole-v1", "Hopper-v5"])
def test_fixed_groups_step_like_one_synchronous_env(env_id):
    """Grouped envpool: whole groups come back in the order sent, and env e sees exactly what
    env e of one synchronous env with the same seed sees under the same actions."""
    num_envs, batch_size = 6, 2
    sync_cfg = EnvConfig(id=env_id, num_envs=num_envs)
    grouped_cfg = EnvConfig(id=env_id, num_envs=num_envs, async_batch_size=batch_size)
    rng = np.random.default_rng(3)
    with make_env(sync_cfg, num_envs, seed=5) as sync, make_env(grouped_cfg, num_envs, seed=5, fixed_groups=True) as grouped:
        assert grouped.is_async and grouped.batch_size == batch_size and grouped.num_groups == 3
        reference = sync.reset()
        batches = [grouped.reset()] + [grouped.recv() for _ in range(2)]
        for step in range(60):  # CartPole episodes end within 60 random steps: resets included
            for group, batch in enumerate(batches):
                assert batch.env_ids.tolist() == list(range(group * batch_size, (group + 1) * batch_size))
                np.testing.assert_array_equal(grouped.group_env_ids(group), batch.env_ids)
                rows = slice(group * batch_size, (group + 1) * batch_size)
                np.testing.assert_array_equal(batch.obs, reference.obs[rows])
                if step:
                    for name in ("reward", "terminated", "truncated", "is_first"):
                        np.testing.assert_array_equal(getattr(batch, name), getattr(reference, name)[rows], err_msg=name)
            actions = random_actions(sync, rng, num_envs)
            for group in range(3):  # send all, then receive all: the groups step concurrently
                rows = slice(group * batch_size, (group + 1) * batch_size)
                grouped.send(actions[rows], grouped.group_env_ids(group))
            batches = [grouped.recv() for _ in range(3)]
            reference = sync.step(actions)
        with pytest.raises(IndexError):
            grouped.group_env_ids(3)
        with pytest.raises(ValueError, match="read-only"):  # one array per group, shared by every send
            grouped.group_env_ids(0)[0] = 1
        with pytest.raises(ValueError, match="one received batch"):
            grouped.send(actions[:2], np.array([1, 2]))
        grouped.send(actions[:2], np.array([0, 1]))
        with pytest.raises(RuntimeError, match="sent again"):
            grouped.send(actions[:2], np.array([0, 1]))


@pytest.mark.parametrize("env_id", ["CartPole-v1", GYMNASIUM_ONLY_ID])
def test_truncation_then_reset_step_and_episode_statistics(env_id):
    """max_episode_steps=5: step 5 truncates, step 6 is the reset step, the episode is 5 steps long."""
    num_envs = 2
    cfg = EnvConfig(id=env_id, max_episode_steps=5)
    rng = np.random.default_rng(0)
    with make_env(cfg, num_envs=num_envs, seed=3) as env:
        env.reset()
        # A CartPole pole cannot fall within 5 steps, and Taxi cannot be solved in 5, so every
        # episode here ends by truncation.
        rewards = []
        for step in range(1, 13):
            batch = env.step(random_actions(env, rng, num_envs))
            at_limit = step in (5, 11)
            assert batch.truncated.tolist() == [at_limit] * num_envs
            assert not batch.terminated.any()
            assert batch.is_first.tolist() == [step in (6, 12)] * num_envs
            if batch.is_first.any():
                assert not batch.reward.any()
            else:
                rewards.append(batch.reward.astype(np.float64))
            if at_limit:
                assert batch.episode_lengths.tolist() == [5] * num_envs
                np.testing.assert_allclose(batch.episode_returns, np.sum(rewards[-5:], axis=0))
            else:
                assert batch.episode_returns.size == 0
    if env_id == "CartPole-v1":
        assert np.sum(rewards[:5], axis=0).tolist() == [5.0, 5.0]


def test_cartpole_episode_returns_equal_lengths():
    rng = np.random.default_rng(0)
    returns, lengths = [], []
    with make_env(EnvConfig(id="CartPole-v1"), num_envs=4, seed=0) as env:
        env.reset()
        for _ in range(200):
            batch = env.step(rng.integers(0, 2, size=4))
            returns += batch.episode_returns.tolist()
            lengths += batch.episode_lengths.tolist()
    assert len(returns) >= 10  # random play falls in ~20 steps
    assert returns == [float(n) for n in lengths]


def test_breakout_life_loss_is_a_learning_boundary_but_not_an_episode_end():
    """episodic_life: each life loss terminates and is followed by a reset step; the game goes on."""
    rng = np.random.default_rng(0)
    cfg = EnvConfig(id="Breakout-v5", episodic_life=True, reward_clip=True)
    with make_env(cfg, num_envs=1, seed=0) as env:
        env.reset()
        previous_ended = False
        terminations = agent_steps = 0
        for _ in range(3000):
            batch = env.step(rng.integers(0, env.action_space.n, size=1))
            assert batch.is_first[0] == previous_ended
            previous_ended = bool(batch.terminated[0] or batch.truncated[0])
            terminations += int(batch.terminated[0])
            agent_steps += int(not batch.is_first[0])
            if batch.episode_returns.size:
                break
        else:
            pytest.fail("no Breakout game finished in 3000 steps")
    assert terminations == 5  # one per life; only the last one is game over
    assert batch.episode_lengths.tolist() == [agent_steps]  # the 4 mid-game reset steps excluded


def test_continuous_actions_are_clipped_and_shapes_checked():
    with make_env(EnvConfig(id="Hopper-v5"), num_envs=2, seed=0) as env:
        env.reset()
        clipped = env._prepare_actions(np.full((2, 3), 5.0), 2)
        assert clipped.max() == 1.0
        env.step(np.full((2, 3), 5.0))
        with pytest.raises(ValueError, match="shape"):
            env.step(np.zeros((2, 4)))
        with pytest.raises(RuntimeError, match="asynchronous"):
            env.recv()
    with pytest.raises(RuntimeError, match="closed"):
        env.reset()


def test_unknown_env_id_suggests_close_matches():
    with pytest.raises(UnknownEnvError, match=r"unknown env id 'Pongg-v5' \(did you mean Pong-v5"):
        check_env_id("Pongg-v5")
    with pytest.raises(ConfigError, match="Pong-v5"):
        make_env(EnvConfig(id="pong-v5"), num_envs=1, seed=0)
    with pytest.raises(UnknownEnvError, match="unknown env id 'NoSuchThing-v0'"):
        env_family("NoSuchThing-v0")
    check_env_id("Pong-v5")
    check_env_id(GYMNASIUM_ONLY_ID)


def test_envpool_only_id_of_an_unsupported_family_is_a_config_error():
    with pytest.raises(ConfigError, match="procgen") as raised:
        check_env_id("CoinrunEasy-v0")
    assert not isinstance(raised.value, UnknownEnvError)


def test_supported_envs_lists_resolvable_curated_ids():
    listed = supported_envs()
    assert set(listed) == set(FAMILIES)
    for name in ("Pong-v5", "Breakout-v5", "SpaceInvaders-v5", "Seaquest-v5"):
        assert name in listed["atari"]
    assert {"HalfCheetah-v5", "Hopper-v5", "Walker2d-v5", "Ant-v5", "Humanoid-v5"} <= set(listed["mujoco"])
    assert {"CartPole-v1", "Acrobot-v1", "MountainCar-v0", "Pendulum-v1"} <= set(listed["classic"])
    for family, ids in listed.items():
        assert all(env_family(env_id) == family for env_id in ids)
    assert "Gymnasium" in GYMNASIUM_FALLBACK_NOTE


@pytest.mark.parametrize("env_id, max_episode_steps", [("Pong-v5", 0), ("HalfCheetah-v5", 25), ("CartPole-v1", 0)])
def test_direct_envpool_calls_step_exactly_as_envpool_public_methods(env_id, max_episode_steps):
    """DirectCalls (envpool's C++ send/recv read by state-key position) against envpool's public
    methods: two pools with the same seeds and actions give the same batches, step for step,
    through episode ends (CartPole terminates, HalfCheetah truncates at 25 steps), synchronously
    and asynchronously (one env thread, batches of 2 of 4 envs)."""
    from pbt_rl.envs.envpool_envs import EnvpoolPool

    cfg = EnvConfig(id=env_id, max_episode_steps=max_episode_steps)
    family = env_family(env_id)
    seeds = per_env_seeds(11, 4)
    for batch_size in (4, 2):
        pools = [EnvpoolPool(cfg, family, 4, batch_size, 1, seeds, direct_calls=direct) for direct in (True, False)]
        try:
            assert [pool.direct for pool in pools] == [True, False]
            rng = np.random.default_rng(0)
            if batch_size == 4:
                batches = [pool.reset() for pool in pools]
            else:
                for pool in pools:
                    pool.start_reset()
                batches = [pool.recv() for pool in pools]
            for _ in range(40):
                fast, public = batches
                for name in ("obs", "reward", "raw_reward", "terminated", "truncated", "episode_over", "env_ids"):
                    fast_value, public_value = getattr(fast, name), getattr(public, name)
                    assert fast_value.dtype == public_value.dtype, name
                    np.testing.assert_array_equal(fast_value, public_value, err_msg=name)
                space = pools[0].action_space
                actions = (rng.integers(0, space.n, size=batch_size).astype(np.int32) if hasattr(space, "n")
                           else rng.uniform(-1, 1, size=(batch_size, *space.shape)).astype(space.dtype))
                if batch_size == 4:
                    batches = [pool.step(actions) for pool in pools]
                else:
                    for pool in pools:
                        pool.send(actions, fast.env_ids)
                    batches = [pool.recv() for pool in pools]
        finally:
            for pool in pools:
                pool.close()


def test_direct_envpool_calls_are_not_used_for_a_layout_they_do_not_know():
    from pbt_rl.envs.envpool_envs import DirectCalls

    class Pool:
        _state_keys = ["info:env_id", "obs", "reward", "done", "trunc"]
        _action_keys = ["env_id", "players.env_id", "action"]
        config = {"max_num_players": 1}
        _spec = type("Spec", (), {"_action_spec": [(np.dtype("int32"),)] * 3})()
        all_env_ids = np.arange(2)

        def _recv(self):
            return []

        def _send(self, action):
            pass

    assert DirectCalls.of(Pool(), atari=False) is not None
    assert DirectCalls.of(Pool(), atari=True) is None  # no raw Atari reward in the state
    multiplayer = Pool()
    multiplayer.config = {"max_num_players": 2}
    assert DirectCalls.of(multiplayer, atari=False) is None
    dict_actions = Pool()
    dict_actions._action_keys = ["env_id", "players.env_id", "action:move", "action:fire"]
    assert DirectCalls.of(dict_actions, atari=False) is None
    assert DirectCalls.of(object(), atari=False) is None  # not an envpool pool at all
