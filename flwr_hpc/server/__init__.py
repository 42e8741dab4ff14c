"""The server side: what runs in the process that drives one run.

Owns the Flower ``Grid`` over HPC sites (:mod:`.grid`, with its task bookkeeping in
:mod:`.tasks`, result-to-reply in :mod:`.replies`, staging in :mod:`.staging`, site wiring
in :mod:`.sites`, delivery timelines in :mod:`.delivery` and the simulator's virtual-time
grid in :mod:`.sim`), :func:`~flwr_hpc.server.wiring.make_grid` (the grid for a
federation), the runner (one run: lock, FAB, ServerApp, run records), telemetry and the
timing signals scheduler-aware strategies read. It may import the shared modules
(``protocol``, ``payload``, ``config``, ``errors``, ``fab``, ``_proc``), ``compute`` (the
backends it submits through) and, from the site side, only ``flwr_hpc.worker.run_task``
(the function it submits, by reference). Nothing here imports ``control``.
"""
