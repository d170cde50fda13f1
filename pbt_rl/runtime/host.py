"""Process-wide settings of a process that hosts learners, made once before it builds any.

Learners never change their process (they see only the ``env`` and ``agent`` sections and draw
from their own random generators); whatever is the process's is set here, by whoever owns the
process: a member process (:func:`pbt_rl.runtime.member.member_main`), ``pbt-rl bench agent``,
evaluation and replay.
"""

from __future__ import annotations

import torch

from pbt_rl.agents.device import resolve_device, set_gpu_wait


def torch_threads_for(device: torch.device, num_threads: int, torch_threads: int = 0) -> int | None:
    """torch's intra-op threads for a process hosting one learner; None = leave torch's default.

    ``torch_threads`` (``run.torch_threads``) when > 0. Otherwise, given the learner's share of
    the cores ``num_threads`` (> 0): that share on the CPU, where torch computes beside the env
    threads and must not take cores from them; 1 on CUDA, where torch's CPU threads only launch
    kernels. With neither, torch keeps its default (all cores).
    """
    if torch_threads > 0:
        return int(torch_threads)
    if num_threads and num_threads > 0:
        return max(1, int(num_threads)) if device.type == "cpu" else 1
    return None


def configure_process(device: str | torch.device | None, num_threads: int = 0, torch_threads: int = 0,
                      gpu_wait: str = "auto") -> torch.device:
    """Set this process up for a learner on ``device``; returns the resolved device.

    Sets torch's intra-op threads (:func:`torch_threads_for`), and on CUDA the GPU wait mode
    (``run.gpu_wait``, :func:`~pbt_rl.agents.device.set_gpu_wait`), cuDNN's benchmark mode (fixed
    input shapes: let cuDNN pick its fastest conv algorithms) and TF32 matmuls and convs (ample
    precision for policy-gradient training, much faster on Ampere and later).

    Args:
        device: the learner's device (``'auto'``/None, ``'cpu'``, ``'cuda'``, ``'cuda:N'``).
        num_threads: the learner's share of the cores (0: not decided).
        torch_threads: ``run.torch_threads`` (0: derived from the device and ``num_threads``).
        gpu_wait: ``run.gpu_wait``.
    """
    resolved = resolve_device(device)
    threads = torch_threads_for(resolved, num_threads, torch_threads)
    if threads is not None:
        torch.set_num_threads(threads)
    if resolved.type == "cuda":
        set_gpu_wait(resolved, gpu_wait)
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return resolved
