"""Strategies and the project's ServerApp.

Strategy construction from config and the scheduler-aware strategies land with their
issues (#3, #5, #8). Any Flower strategy already runs over ``flwr_hpc.HPCGrid`` unchanged.
"""
