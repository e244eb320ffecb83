"""SMART's dynamic temperature: exponential annealing plus an escape rule (Ding et al., arXiv 2403.19969).

As tau -> 0 the soft top-k mask tends to the hard top-k indicator while its sum stays k, so annealing
moves from "all groups share the budget" to "exactly k groups on". The paper uses the temperature to leave
non-sparse local minima (many mask entries stuck between 0 and 1); its schedule is not public. Ours: tau
decays exponentially from tau_start to tau_end over the soft phase; in the second half, every step on which
more than `fractional_limit` of the mask entries lie inside `fractional_band`, a persistent correction is
multiplied by `escape_factor`, so tau shrinks faster until the mask is (nearly) binary. Without it, a few
fractional channels at the switch to the hard mask cost up to 24 points before fine-tuning (paper notes).
"""

from __future__ import annotations

from pruning_core.methods.smart.config import SmartConfig


class Temperature:
    """tau for each soft-phase step; `observe` feeds back the fraction of fractional mask entries."""

    def __init__(self, cfg: SmartConfig, soft_steps: int) -> None:
        assert soft_steps >= 1, f"the soft phase needs at least one step, got {soft_steps}"
        self.cfg, self.soft_steps = cfg, soft_steps
        self.correction = 1.0
        self.escapes = 0

    def base(self, step: int) -> float:
        """Annealing schedule alone: tau_start at step 0, tau_end at the last soft step."""
        c = self.cfg
        anneal_steps = max(round(c.anneal_fraction * self.soft_steps) - 1, 1)
        frac = min(step / anneal_steps, 1.0)
        return c.tau_start * (c.tau_end / c.tau_start) ** frac

    def tau(self, step: int) -> float:
        return max(self.base(step) * self.correction, self.cfg.tau_min)

    def observe(self, step: int, fractional: float) -> bool:
        """Apply the escape rule after step `step`; returns True when it fired."""
        c = self.cfg
        if step >= c.escape_after * self.soft_steps and fractional > c.fractional_limit:
            self.correction *= c.escape_factor
            self.escapes += 1
            return True
        return False
