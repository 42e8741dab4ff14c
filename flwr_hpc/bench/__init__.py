"""Benchmarks that anyone can run: ``flwr-hpc bench transport`` (see :mod:`.transport`)."""
