"""Evaluate a member's latest checkpoint (``pbt-rl eval``): mean and std of the episodic return.

Protocol:

- the newest checkpoint of the member whose ``.sha256`` matches is loaded (a checkpoint without
  its ``.sha256`` is an interrupted write and is skipped; a mismatch is an error);
- one env (``num_envs = 1``, the run's env settings otherwise: sticky actions, truncation, ...)
  plays ``episodes`` full episodes one after another, seeded with ``seed``; the score of an
  episode is the true episodic return the env reports (raw game score over all lives on Atari);
- actions are the policy's mode by default (argmax of the logits, or the Gaussian mean clipped to
  the bounds), so a fixed seed gives the same returns; ``deterministic=False`` samples instead,
  from a torch RNG seeded with ``seed``.

Video (``video=path.gif`` or ``.mp4``): the first evaluated episode.

- Atari: the observation frames the agent saw (the newest grayscale frame of each stack, upscaled
  x4 to 336 x 336), which needs no emulator rendering;
- other envs: the Gymnasium env rendered with ``render_mode="rgb_array"`` when it can render on
  this machine (classic control needs pygame, MuJoCo needs an OpenGL backend); that episode is
  played with the same policy and seed but in a separate Gymnasium env, so its return can differ
  from envpool's episode. When rendering is not available, the frames are a bar chart of the
  observation vector per step (drawn with numpy), from the first evaluated episode itself.
- ``.gif`` works everywhere (Pillow); ``.mp4`` needs the ``imageio-ffmpeg`` package.
At most :data:`MAX_VIDEO_FRAMES` frames are written. The video's directory must exist; the path
is checked before the checkpoint is loaded (:func:`check_video_path`). With W&B logging on in
the run's config, the video and the scores also go to the member's W&B run
(:func:`pbt_rl.wandb_logger.log_eval_video`).
"""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path
from typing import Any, Callable

import numpy as np

from pbt_rl.config import ConfigError, ExperimentConfig, abbreviate
from pbt_rl.lineage import resolve_member
from pbt_rl.runtime.host import configure_process
from pbt_rl.runtime.store import CheckpointError, RunStore, load_run

MAX_VIDEO_FRAMES = 5_000
MAX_EPISODE_STEPS = 1_000_000  # a policy that never ends an episode must not hang eval
MAX_SEED = 2**64 - 1  # torch.manual_seed takes an unsigned 64-bit seed
VIDEO_SUFFIXES = (".gif", ".mp4")


def load_latest_checkpoint(store: RunStore, member: int) -> tuple[str, dict]:
    """(id, payload) of ``member``'s newest checkpoint whose ``.sha256`` matches (the store's rule);
    ConfigError if it has none or the newest complete one is corrupt."""
    try:
        if not store.list_checkpoints(member):
            raise ConfigError(f"member {member} has no checkpoint in {store.checkpoint_dir(member)}")
        checkpoint = store.newest_verified_checkpoint(member)
        if checkpoint is None:
            raise ConfigError(f"member {member} has no complete checkpoint (every .pt lacks its .sha256 file)")
        payload = store.load_checkpoint(checkpoint)
    except CheckpointError as exc:
        raise ConfigError(str(exc)) from None
    if not isinstance(payload, dict) or "learner" not in payload:
        raise ConfigError(f"checkpoint {store.path(checkpoint)} holds no learner state")
    return checkpoint, payload


def check_video_path(video: Path) -> None:
    """ConfigError unless a video can be written to ``video``.

    The video is written after every episode has been played, so a path that cannot work must be
    refused before anything else happens.
    """
    shown = abbreviate(str(video))
    suffix = video.suffix.lower()
    if suffix not in VIDEO_SUFFIXES:
        raise ConfigError(f"video: {shown} must end in .gif or .mp4")
    parent = video.parent
    try:
        parent_exists, parent_is_dir = parent.exists(), parent.is_dir()
        target_exists, target_is_dir = video.exists(), video.is_dir()
    except OSError as exc:  # e.g. ENAMETOOLONG, which exists() does not swallow
        raise ConfigError(f"video: cannot write {shown}: {exc.strerror or exc}") from None
    if not parent_is_dir:
        problem = "is not a directory" if parent_exists else "does not exist"
        raise ConfigError(f"video: the directory of {shown} {problem}: {abbreviate(str(parent))}")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"video: cannot write {shown}: its directory is not writable")
    if target_is_dir:
        raise ConfigError(f"video: {shown} is a directory")
    if target_exists and not os.access(video, os.W_OK):
        raise ConfigError(f"video: {shown} exists and is not writable")
    if suffix == ".mp4":
        try:
            import imageio_ffmpeg  # noqa: F401
        except ImportError:
            raise ConfigError(
                f"video: writing {video.name} needs the imageio-ffmpeg package (pip install imageio-ffmpeg); "
                f"or use a .gif path"
            ) from None


def _eval_config(config: ExperimentConfig) -> ExperimentConfig:
    """One synchronous env; the rest of the env settings as in training."""
    env = dataclasses.replace(config.env, num_envs=1, async_batch_size=0)
    return dataclasses.replace(config, env=env)


def _default_factory() -> Callable[..., Any]:
    from pbt_rl.agents import make_learner

    return make_learner


def evaluate(
    run_dir: str | Path,
    member: str | int = "best",
    episodes: int = 10,
    video: Path | None = None,
    seed: int = 0,
    *,
    deterministic: bool = True,
    console: bool = True,
    learner_factory: Callable[..., Any] | None = None,
) -> dict:
    """Play ``episodes`` episodes with ``member``'s latest checkpoint; return and print the scores.

    Returns:
        ``{"member", "checkpoint", "checkpoint_env_steps", "episodes", "returns", "lengths",
        "mean", "std", "deterministic", "seed", "video"}``; ``std`` is the population standard
        deviation (ddof 0) of the episodic returns.
    """
    if episodes < 1:
        raise ConfigError(f"episodes: must be >= 1, got {episodes}")
    if not 0 <= seed <= MAX_SEED:
        raise ConfigError(f"seed: must be from 0 to 2**64 - 1, got {seed}")
    if video is not None:
        check_video_path(Path(video))

    run = load_run(run_dir)
    store = RunStore(run.root)
    member_id = resolve_member(run, member)
    checkpoint, payload = load_latest_checkpoint(store, member_id)
    checkpoint_steps = store.checkpoint_env_steps(checkpoint)

    config = _eval_config(run.config)
    factory = learner_factory or _default_factory()
    configure_process("cpu", num_threads=1, torch_threads=config.run.torch_threads, gpu_wait=config.run.gpu_wait)
    learner = factory(config, seed, device="cpu", num_threads=1)
    try:
        # resume=False: the checkpoint's weights and normalisers, but the learner's own random
        # streams, seeded from ``seed`` (they decide sampled actions).
        learner.load_state_dict(payload["learner"], resume=False)

        def policy(obs: np.ndarray) -> np.ndarray:
            return learner.act(obs, deterministic=deterministic)

        returns, lengths, frames = _play(config, policy, episodes, seed, want_frames=video is not None)
        video_note = None
        if video is not None:
            video_frames, video_note = _video_frames(config, policy, seed, frames)
            _write_video(Path(video), video_frames)
    finally:
        learner.close()

    mean = float(np.mean(returns))
    std = float(np.std(returns))
    result = {
        "member": member_id,
        "checkpoint": checkpoint,
        "checkpoint_env_steps": checkpoint_steps,
        "episodes": episodes,
        "returns": returns,
        "lengths": lengths,
        "mean": mean,
        "std": std,
        "deterministic": deterministic,
        "seed": seed,
        "video": None if video is None else str(video),
    }
    wandb_note = None
    if video is not None and run.config.logging.wandb != "disabled":
        from pbt_rl.wandb_logger import log_eval_video

        wandb_note = log_eval_video(run.root, run.config, member_id, Path(video), result)
    if console:
        action = "greedy" if deterministic else "sampled"
        print(f"member {member_id} @ {checkpoint_steps:,} env steps: episodic return {mean:.2f} +- {std:.2f} "
              f"over {episodes} episodes ({action} actions, seed {seed})")
        if video is not None:
            print(f"video ({video_note}) written to {video}")
        if wandb_note:
            print(wandb_note)
    return result


def _play(config: ExperimentConfig, policy: Callable[[np.ndarray], np.ndarray], episodes: int, seed: int,
          want_frames: bool) -> tuple[list[float], list[int], list[np.ndarray]]:
    """Episodes on one env; the observations of the first episode when ``want_frames``."""
    from pbt_rl.envs import make_env

    returns: list[float] = []
    lengths: list[int] = []
    frames: list[np.ndarray] = []
    env = make_env(config.env, 1, seed)
    try:
        batch = env.reset()
        steps = 0
        while len(returns) < episodes:
            if want_frames and not returns and len(frames) < MAX_VIDEO_FRAMES:
                frames.append(np.array(batch.obs[0]))
            batch = env.step(policy(batch.obs))
            returns.extend(float(r) for r in batch.episode_returns)
            lengths.extend(int(n) for n in batch.episode_lengths)
            steps += 1
            if steps > MAX_EPISODE_STEPS * episodes:
                raise RuntimeError(f"eval: no episode ended within {MAX_EPISODE_STEPS} env steps")
        family = env.family
    finally:
        env.close()
    if want_frames and family == "atari":
        frames = [_atari_frame(obs) for obs in frames]
    elif want_frames:
        frames = [np.asarray(obs, dtype=np.float64).reshape(-1) for obs in frames]
    return returns[:episodes], lengths[:episodes], frames


def _atari_frame(stacked: np.ndarray) -> np.ndarray:
    """uint8 ``[stack, H, W]`` -> RGB ``[4H, 4W, 3]`` of the newest frame."""
    newest = np.asarray(stacked)[-1]
    big = np.repeat(np.repeat(newest, 4, axis=0), 4, axis=1)
    return np.stack([big] * 3, axis=-1)


def _video_frames(config: ExperimentConfig, policy, seed: int, first_episode: list[np.ndarray]) -> tuple[list[np.ndarray], str]:
    from pbt_rl.envs import env_family

    if env_family(config.env.id) == "atari":
        return first_episode, "observation frames"
    rendered = _gymnasium_render(config, policy, seed)
    if rendered:
        return rendered, "Gymnasium rgb_array rendering"
    return _observation_charts(first_episode), "observation bar charts (this env cannot render here)"


def _gymnasium_render(config: ExperimentConfig, policy, seed: int) -> list[np.ndarray] | None:
    """Frames of one episode in a Gymnasium env with ``render_mode='rgb_array'``, or None."""
    import gymnasium

    try:
        env = gymnasium.make(config.env.id, render_mode="rgb_array")
    except Exception:  # unknown to Gymnasium, or a missing renderer dependency
        return None
    frames: list[np.ndarray] = []
    try:
        obs, _ = env.reset(seed=seed)
        frame = env.render()
        if frame is None:
            return None
        frames.append(np.asarray(frame))
        for _ in range(MAX_VIDEO_FRAMES - 1):
            action = policy(np.asarray(obs, dtype=np.float32)[None])[0]
            obs, _, terminated, truncated, _ = env.step(action)
            frames.append(np.asarray(env.render()))
            if terminated or truncated:
                break
    except Exception:  # e.g. pygame or an OpenGL context missing at render time
        return None
    finally:
        env.close()
    return frames


def _observation_charts(observations: list[np.ndarray], size: int = 320) -> list[np.ndarray]:
    """One RGB frame per observation: a bar per component, scaled to the episode's largest |value|."""
    if not observations:
        return []
    scale = max(float(np.max(np.abs(obs))) for obs in observations) or 1.0
    dims = observations[0].size
    bar = max(1, (size - 20) // max(1, dims))
    mid = size // 2
    frames = []
    for obs in observations:
        frame = np.full((size, size, 3), 255, dtype=np.uint8)
        frame[mid, :, :] = 160  # the zero line
        for i, value in enumerate(obs[: (size - 20) // bar]):
            height = int(round(abs(float(value)) / scale * (mid - 10))) if math.isfinite(value) else 0
            left = 10 + i * bar
            top, bottom = (mid - height, mid) if value >= 0 else (mid, mid + height)
            frame[top:bottom + 1, left:left + max(1, bar - 2)] = (40, 90, 200) if value >= 0 else (200, 60, 40)
        frames.append(frame)
    return frames


def _write_video(path: Path, frames: list[np.ndarray]) -> None:
    import imageio.v2 as imageio

    if not frames:
        raise ConfigError("video: no frames were recorded")
    if path.suffix.lower() == ".gif":
        imageio.mimsave(path, frames, duration=1000 / 30, loop=0)
        return
    try:
        imageio.mimsave(path, frames, fps=30, macro_block_size=1)
    except (ImportError, ValueError, RuntimeError) as exc:
        raise ConfigError(f"video: writing {path.name} needs the imageio-ffmpeg package ({exc}); use a .gif path") from None
