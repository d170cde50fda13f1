"""PB2: the explore step of Population-Based Bandits (Parker-Holder et al. 2020, "Provably
Efficient Online Hyperparameter Optimization with Population-Based Bandits", NeurIPS).

Pure: no I/O; the only randomness is the ``numpy.random.Generator`` the scheduler passes in
(and the integer seeds drawn from it for the GP's optimiser restarts). ``pbt.explore: pb2``
replaces PBT's random perturbation of the *numeric* (real and integer) parameters with a
bandit's choice; categorical parameters keep the ordinary explore (``perturb_or_resample``).
scikit-learn is imported only when PB2 fits its model (the ``pb2`` extra).

Data (:class:`ImprovementLog`)
------------------------------
At each ready point of a member the scheduler records one *observation*: the member's fitness
change over the interval it just finished, ``y = (f_end - f_start) * R / (s_end - s_start)``
(R = ``pbt.ready_after_steps``: the change per ready interval), with the hyperparameters in force
during it and the interval's start time ``t = s_start / R`` (time in ready intervals).
``f_start`` is the member's fitness at its previous decision, or, when that decision was an
exploit, the donor's score (the weights it continued from). No observation is made when either
fitness is missing (NaN), when the member's values are not the ones the log expected (an exploit
the runtime did not apply), or after a reseed (the log forgets the member's interval). The log
keeps the newest :data:`MAX_OBSERVATIONS` and is part of the scheduler's ``state_dict``.

Model
-----
A time-varying GP (Bogunovic et al. 2016, TV-GP-UCB) on inputs ``(x, t)``, ``x`` the numeric
values on the unit cube (:meth:`SearchSpace.to_unit`: linear, or logarithmic for the log kinds)
and ``t`` in ready intervals, with the paper's kernel

    k((x, t), (x', t')) = k_SE(x, x') * (1 - eps) ** (|t - t'| / 2)

``k_SE`` a squared-exponential (RBF) kernel with one length scale per parameter, times a
constant; ``eps`` in (0, 1) says how fast old data is forgotten. The time factor equals
``exp(-|t - t'| / l)`` with ``l = -2 / log(1 - eps)``: scikit-learn's ``Matern(nu=0.5)`` on the
``t`` column. A ``WhiteKernel`` models the noise of the observed improvements. The length scales,
``eps`` (through ``l``), the signal and the noise variance are fitted by maximising the marginal
likelihood (scikit-learn's L-BFGS-B from the kernel's initial values, plus
:data:`OPTIMIZER_RESTARTS` seeded random restarts: none by default, since each costs a whole fit
inside the controller's loop), on improvements standardised to mean 0 and standard deviation 1.

Choice (GP-UCB with a batch)
----------------------------
Among :data:`CANDIDATES` uniform points of the unit cube drawn from the generator, plus the
donor's own values, integer parameters snapped to their grid, PB2 picks the one maximising

    UCB(x) = mu(x, T) + sqrt(beta_T) * sigma_B(x, T)

at the current time ``T`` (the exploiting member's env steps / R). As in the paper's parallel
setting (GP-BUCB, Desautels et al. 2014), ``sigma_B`` is the posterior standard deviation after
adding the other members' current values at ``T`` as pending points (a GP's variance does not
depend on the outcomes, so their outcomes are set to the mean): the bandit avoids the region
the population already covers. ``beta_T = 2 * log(|D| * T**2 * pi**2 / (6 * delta))`` with
``|D|`` the number of candidates and ``delta`` = :data:`DELTA`: the schedule of Srinivas et al.
(2010, Theorem 1) for a finite decision set, which the PB2 paper's analysis builds on (its
continuous-domain version needs Lipschitz constants nobody knows); ``T`` is at least 1.

With fewer than :data:`MIN_OBSERVATIONS` observations there is nothing to fit: the numeric
parameters fall back to the ordinary explore too, and the operation strings say so.

Why scikit-learn: ``GaussianProcessRegressor`` is maintained, has composable kernels (RBF, Matern,
WhiteKernel, products), fits kernel hyperparameters by marginal likelihood with seeded restarts,
and returns predictive standard deviations; only the column selection below is ours (no GP
maths), and it is a light dependency next to GPy or GPyTorch. The fit runs with one BLAS thread
(``threadpoolctl``, a scikit-learn dependency): the matrices are small and more threads only
fight the members for the cores.
"""

from __future__ import annotations

import functools
import math
import warnings
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from pbt_rl.config import ConfigError
from pbt_rl.search_space import SearchSpace, Value

CANDIDATES = 256
DELTA = 0.1
MIN_OBSERVATIONS = 2
MAX_OBSERVATIONS = 250
OPTIMIZER_RESTARTS = 0


@dataclass(frozen=True)
class Observation:
    """One finished interval: start time ``t`` (ready intervals), values in force, improvement."""

    t: float
    values: dict[str, Value]
    improvement: float


def ucb_beta(candidates: int, t: float, delta: float = DELTA) -> float:
    """beta_t = 2 log(|D| t^2 pi^2 / (6 delta)), t at least 1 (module docstring)."""
    t = max(1.0, float(t))
    return 2.0 * math.log(candidates * t * t * math.pi ** 2 / (6.0 * delta))


def _columns_kernel(kernel: Any, columns: Sequence[int]) -> Any:
    """``kernel`` applied to some input columns only (scikit-learn kernels see all columns)."""
    return _on_columns_class()(kernel, tuple(columns))


@functools.cache
def _on_columns_class() -> type:
    from sklearn.gaussian_process.kernels import Hyperparameter, Kernel

    class OnColumns(Kernel):
        def __init__(self, kernel, columns):
            self.kernel = kernel
            self.columns = columns

        def get_params(self, deep=True):
            params = {"kernel": self.kernel, "columns": self.columns}
            if deep:
                params.update(("kernel__" + k, v) for k, v in self.kernel.get_params().items())
            return params

        @property
        def hyperparameters(self):
            return [Hyperparameter("kernel__" + h.name, h.value_type, h.bounds, h.n_elements)
                    for h in self.kernel.hyperparameters]

        @property
        def theta(self):
            return self.kernel.theta

        @theta.setter
        def theta(self, theta):
            self.kernel.theta = theta

        @property
        def bounds(self):
            return self.kernel.bounds

        def __eq__(self, other):
            return type(self) is type(other) and self.kernel == other.kernel and self.columns == other.columns

        def __call__(self, X, Y=None, eval_gradient=False):
            cols = list(self.columns)
            return self.kernel(np.asarray(X)[:, cols], None if Y is None else np.asarray(Y)[:, cols], eval_gradient)

        def diag(self, X):
            return self.kernel.diag(np.asarray(X)[:, list(self.columns)])

        def is_stationary(self):
            return self.kernel.is_stationary()

    return OnColumns


def time_varying_kernel(dimensions: int) -> Any:
    """C * RBF(x) * Matern(nu=0.5)(t) + White: the TV-GP kernel on ``dimensions`` unit columns
    followed by one time column (module docstring)."""
    from sklearn.gaussian_process.kernels import RBF, ConstantKernel, Matern, WhiteKernel

    space = _columns_kernel(RBF(length_scale=np.full(dimensions, 0.5), length_scale_bounds=(1e-2, 1e2)),
                            range(dimensions))
    time = _columns_kernel(Matern(length_scale=10.0, length_scale_bounds=(1e-1, 1e4), nu=0.5), [dimensions])
    return ConstantKernel(1.0, (1e-3, 1e3)) * space * time + WhiteKernel(0.1, (1e-6, 1e1))


def ucb_choice(inputs: np.ndarray, improvements: np.ndarray, candidates: np.ndarray, now: float,
               pending: np.ndarray, beta: float, seed: int) -> tuple[int, np.ndarray]:
    """Index of the candidate with the highest UCB at time ``now``, and every candidate's UCB.

    inputs: (n, d + 1) unit-cube values with the time last; improvements: (n,); candidates: (m, d);
    pending: (k, d) values other members train with now (k may be 0); seed: the optimiser restarts'.
    Ties go to the lowest index.
    """
    from sklearn.gaussian_process import GaussianProcessRegressor

    y = np.asarray(improvements, dtype=np.float64)
    scale = float(y.std()) or 1.0
    y = (y - y.mean()) / scale
    at_now = lambda points: np.hstack([points, np.full((len(points), 1), float(now))])  # noqa: E731
    from threadpoolctl import threadpool_limits  # a scikit-learn dependency

    # One BLAS thread: the matrices are small (<= MAX_OBSERVATIONS), and more threads only fight
    # the members' processes for the cores (measured 2.5x slower with the default on 2 cores).
    with warnings.catch_warnings(), threadpool_limits(limits=1):
        warnings.simplefilter("ignore")  # bound and convergence warnings of the kernel fit
        gp = GaussianProcessRegressor(time_varying_kernel(candidates.shape[1]), normalize_y=False,
                                      n_restarts_optimizer=OPTIMIZER_RESTARTS, random_state=seed)
        gp.fit(inputs, y)
        query = at_now(candidates)
        mean, std = gp.predict(query, return_std=True)
        if len(pending):
            hallucinated = at_now(pending)
            batch = GaussianProcessRegressor(gp.kernel_, optimizer=None, normalize_y=False)
            batch.fit(np.vstack([inputs, hallucinated]), np.concatenate([y, gp.predict(hallucinated)]))
            _, std = batch.predict(query, return_std=True)
    ucb = mean + math.sqrt(max(beta, 0.0)) * std
    return int(np.argmax(ucb)), ucb


class ImprovementLog:
    """The population's improvement data, kept by the scheduler from what its decisions see."""

    def __init__(self, space: SearchSpace, ready_after_steps: int):
        import importlib.util

        if importlib.util.find_spec("sklearn") is None:  # fail at the start, not at the first exploit
            raise ConfigError("pbt.explore: pb2 needs scikit-learn; install it with pip install 'pbt-rl[pb2]'")
        self.space = space
        self.interval = float(ready_after_steps)
        self.names = space.numeric_names
        self.observations: list[Observation] = []
        self._starts: dict[int, tuple[int, float, dict[str, Value]]] = {}

    # -- data ---------------------------------------------------------------------------------
    def observe(self, member_id: int, env_steps: int, fitness: float, values: Mapping[str, Any]) -> None:
        """The member is at a ready point with ``fitness``: record the interval it finished."""
        start = self._starts.pop(member_id, None)
        if start is None or not self.names:
            return
        steps, score, in_force = start
        current = {n: values.get(n) for n in self.names}
        if env_steps <= steps or not (math.isfinite(score) and math.isfinite(fitness)) or current != in_force:
            return
        improvement = (fitness - score) * self.interval / (env_steps - steps)
        self.observations.append(Observation(steps / self.interval, in_force, float(improvement)))
        del self.observations[:-MAX_OBSERVATIONS]

    def started(self, member_id: int, env_steps: int, score: float, values: Mapping[str, Any]) -> None:
        """The member begins an interval at ``env_steps`` from ``score`` with ``values``."""
        self._starts[member_id] = (int(env_steps), float(score), {n: values[n] for n in self.names})

    def forget(self, member_id: int) -> None:
        self._starts.pop(member_id, None)

    # -- the bandit ---------------------------------------------------------------------------
    def suggest(self, base: Mapping[str, Any], env_steps: int, pending: Sequence[Mapping[str, Any]],
                rng: np.random.Generator) -> dict[str, Value] | None:
        """PB2's numeric values for a member exploiting at ``env_steps`` from ``base`` (the donor's
        values), or None with too little data (module docstring, *Choice*)."""
        if not self.names or len(self.observations) < MIN_OBSERVATIONS:
            return None
        unit = lambda values: [self.space.to_unit(n, values[n]) for n in self.names]  # noqa: E731
        inputs = np.array([unit(o.values) + [o.t] for o in self.observations], dtype=np.float64)
        improvements = np.array([o.improvement for o in self.observations], dtype=np.float64)
        drawn = rng.random((CANDIDATES, len(self.names)))
        snapped = [unit(self._values(row)) for row in drawn]
        candidates = np.array([unit(base)] + snapped, dtype=np.float64)
        others = np.array([unit(p) for p in pending], dtype=np.float64).reshape(-1, len(self.names))
        now = env_steps / self.interval
        seed = int(rng.integers(2**31 - 1))
        best, _ = ucb_choice(inputs, improvements, candidates, now, others, ucb_beta(len(candidates), now), seed)
        return self._values(candidates[best])

    def _values(self, unit_row: Sequence[float]) -> dict[str, Value]:
        return {n: self.space.from_unit(n, u) for n, u in zip(self.names, unit_row)}

    # -- resume -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "observations": [[o.t, dict(o.values), o.improvement] for o in self.observations],
            "starts": {str(m): [s, score if math.isfinite(score) else None, dict(v)]
                       for m, (s, score, v) in self._starts.items()},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.observations = [Observation(float(t), dict(values), float(y)) for t, values, y in state["observations"]]
        self._starts = {int(m): (int(s), math.nan if score is None else float(score), dict(v))
                        for m, (s, score, v) in state["starts"].items()}
