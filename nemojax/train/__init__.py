"""Losses, optimizer, pure train steps and the training loop."""
