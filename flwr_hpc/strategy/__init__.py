"""Strategy plug-ins that run inside the ServerApp.

Owns :class:`~flwr_hpc.strategy.rounds.ScreenedStrategy` (reply screening, failed-round
limit, resume), checkpoints (:mod:`.checkpoint`) and the streaming FedAvg family
(:mod:`.streaming`, with :class:`~.streaming_grid.StreamingGrid`, the opt-in that gives
Flower's round loop replies one at a time). They wrap or extend Flower's own strategies,
talk to the grid only through Flower's ``Grid`` API and the server side's timing signals
(``server.timing``), and never import the grid implementation, ``control`` or the site
side.
"""
