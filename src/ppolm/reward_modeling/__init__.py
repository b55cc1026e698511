"""Reward models learned from preference pairs (Bradley-Terry): data, trainer, checkpoints."""
