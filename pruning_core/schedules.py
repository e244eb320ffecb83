"""Sparsity schedules: how much to prune at each step of gradual pruning.

Cubic schedule of Zhu & Gupta 2017 ("To prune, or not to prune", arXiv 1710.01878):
    s_t = s_f * (1 - (1 - t / T_prune)^3)   for 0 <= t <= T_prune, then s_f,
which prunes fast while redundancy is high and slowly near the target. Masks are updated every
`interval` steps (Zhu & Gupta use ~100-1000; short runs need finer updates) and the last pruning update lands
on T_prune exactly, leaving the remaining steps to fine-tune under the fixed mask.
"""

from __future__ import annotations

from dataclasses import dataclass


def cubic_sparsity(t: float, t_prune: float, final: float, initial: float = 0.0) -> float:
    """Zhu & Gupta's cubic ramp from `initial` at t=0 to `final` at t=t_prune (flat afterwards)."""
    assert 0.0 <= initial <= final < 1.0, f"need 0 <= initial <= final < 1, got {initial}, {final}"
    if t_prune <= 0 or t >= t_prune:
        return final
    frac = max(t, 0.0) / t_prune
    return final + (initial - final) * (1.0 - frac) ** 3


@dataclass(frozen=True)
class GradualSchedule:
    """When gradual magnitude pruning updates its masks over `total_steps` optimisation steps."""

    final_sparsity: float
    total_steps: int
    prune_fraction: float = 2 / 3  # prune during the first 2/3 of the steps, then fine-tune with a fixed mask
    updates: int = 10  # mask updates spread over the pruning phase (at least one)

    @property
    def prune_steps(self) -> int:
        return max(1, round(self.total_steps * self.prune_fraction))

    @property
    def interval(self) -> int:
        return max(1, self.prune_steps // max(1, self.updates))

    def is_update(self, step: int) -> bool:
        """Called after optimiser step `step` (0-based): update masks at every interval and at the end of pruning."""
        done = step + 1
        return done <= self.prune_steps and (done % self.interval == 0 or done == self.prune_steps)

    def sparsity_at(self, step: int) -> float:
        return cubic_sparsity(step + 1, self.prune_steps, self.final_sparsity)
