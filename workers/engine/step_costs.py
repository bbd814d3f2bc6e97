"""How long this engine's steps take, learned from the steps it runs: the model a router uses to
predict a request's time to first token on this replica (`EngineStats.step_cost`).

A step's time is fitted as base + per_prefill_token x prefill tokens + per_decode_seq x decode
sequences, by nonnegative least squares over the recent steps, each step's weight decaying by
`DECAY` per step after it (about the last thousand steps count): the fit follows a replica
whose load or model changes. Only sums are kept, so a step costs a few float operations.
"""

import numpy as np

from kvserve.workers.engine.outputs import StepCost

DECAY = 0.999
MIN_STEPS = 32  # fitted steps before the model is reported
REFIT_STEPS = 16  # steps between solves: heartbeats ask for the model after nearly every step
_RIDGE = 1e-9  # keeps the solve defined while one kind of step has not been seen
_SUBSETS = [[i for i in range(3) if mask >> i & 1] for mask in range(1, 8)]  # the nonempty sets of coefficients


class StepCostFit:
    def __init__(self, tokens_per_step: int):
        self.tokens_per_step = tokens_per_step
        self._xtx = [0.0] * 6  # the symmetric 3 x 3 sums of x x^T, x = (1, prefill, decodes)
        self._xty = [0.0] * 3
        self._prefill_weight = 0.0  # decayed steps that computed prompt tokens
        self.num_steps = 0
        self._model: StepCost | None = None
        self._solved_at = -REFIT_STEPS

    def observe_batch(self, num_new_tokens: list[int], seconds: float) -> None:
        """A step that computed `num_new_tokens` per sequence (one: a decode) in `seconds`."""
        decodes = num_new_tokens.count(1)
        self.observe(sum(num_new_tokens) - decodes, decodes, seconds)

    def observe(self, prefill_tokens: int, decode_seqs: int, seconds: float) -> None:
        s, y = self._xtx, self._xty
        p, d = float(prefill_tokens), float(decode_seqs)
        for i, v in enumerate((1.0, p, d, p * p, p * d, d * d)):
            s[i] = s[i] * DECAY + v
        for i, v in enumerate((seconds, p * seconds, d * seconds)):
            y[i] = y[i] * DECAY + v
        self._prefill_weight = self._prefill_weight * DECAY + (prefill_tokens > 0)
        self.num_steps += 1

    def model(self) -> StepCost | None:
        """The fitted step cost, once enough steps were seen, with prompt tokens among them;
        None before. Coefficients are kept at or above zero. Solved again every REFIT_STEPS."""
        if self.num_steps - self._solved_at >= REFIT_STEPS:
            self._model, self._solved_at = self._solve(), self.num_steps
        return self._model

    def _solve(self) -> StepCost | None:
        if self.num_steps < MIN_STEPS or self._prefill_weight < 1.0:
            return None
        n, sp, sd, spp, spd, sdd = self._xtx
        xtx = np.array([[n, sp, sd], [sp, spp, spd], [sd, spd, sdd]])
        base, per_token, per_decode = _nonnegative_least_squares(xtx + _RIDGE * np.diag(np.diag(xtx) + 1.0),
                                                                 np.array(self._xty))
        return StepCost(base, per_token, per_decode, self.tokens_per_step)


def _nonnegative_least_squares(xtx: np.ndarray, xty: np.ndarray) -> tuple[float, ...]:
    """The coefficients c >= 0 that fit best, from the normal equations' sums: the best of the
    least-squares fits over each subset of the coefficients (the others held at 0) that come
    out nonnegative. Clipping the unconstrained fit instead goes badly wrong where the steps
    seen so far leave a coefficient loose: after two long prefills of about the same length
    the slope per prompt token came out negative, and with it clipped to 0 the fit charged
    a one-sequence decode step 0.18 s, as much as the prefills."""
    best, best_loss = np.zeros(len(xty)), 0.0
    for subset in _SUBSETS:
        coef = np.zeros(len(xty))
        coef[subset] = np.linalg.solve(xtx[np.ix_(subset, subset)], xty[subset])
        loss = coef @ xtx @ coef - 2 * coef @ xty  # the squared error, less the constant sum of y^2
        if (coef >= 0).all() and loss < best_loss:
            best, best_loss = coef, loss
    return tuple(map(float, best))

