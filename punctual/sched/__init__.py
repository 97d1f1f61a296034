"""Scheduling: pure Python, no torch, so the simulator runs the shipped scheduler unchanged."""
