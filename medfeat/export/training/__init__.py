"""Weights made here: the task UNet trained on a cohort's masks (and other training
loops that write checkpoints the registry loads).
"""
