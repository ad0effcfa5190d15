"""Eager PyTorch model definitions and checkpoint loaders: the ground truth for everything compiled."""
