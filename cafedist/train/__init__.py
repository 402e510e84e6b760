"""Clients, the generic round loop, and checkpoints."""
