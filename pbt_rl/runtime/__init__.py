"""The population runtime: controller, member processes, run directory, console progress.

>>> from pbt_rl.config import load_config
>>> from pbt_rl.runtime import train, resume
>>> summary = train(load_config("configs/quickstart.yaml"))   # runs/quickstart/
>>> summary = resume("runs/quickstart")                       # after a stop or kill -9
"""

from pbt_rl.runtime.backend import Backend, LocalProcessBackend, MemberHandle
from pbt_rl.runtime.controller import Controller
from pbt_rl.runtime.population import member_seed
from pbt_rl.runtime.in_process import InProcessBackend
from pbt_rl.runtime.run import resume, train
from pbt_rl.runtime.member import MemberSpec, MemberWorker, Restore, weights_sha256
from pbt_rl.runtime.store import CheckpointError, RunDirError, RunStore

__all__ = [
    "Backend",
    "CheckpointError",
    "Controller",
    "InProcessBackend",
    "LocalProcessBackend",
    "MemberHandle",
    "MemberSpec",
    "MemberWorker",
    "Restore",
    "RunDirError",
    "RunStore",
    "member_seed",
    "resume",
    "train",
    "weights_sha256",
]
