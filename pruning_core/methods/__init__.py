"""Pruning methods: magnitude (baseline), SMART (learned masks) and 3D (depth/width/resolution).

Each method scores the units of a `pruning_core.geometry.PruningPlan` and lets the plan select, mask and
finalize, so every method honours the same geometry, budget and per-layer minimum.
"""
