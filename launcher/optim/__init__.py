"""Optimisation: parameter groups (freezing, per-group LR), LR schedules, optimizers, losses,
EMA and MixUp/CutMix."""
