"""A Grid wrapper that counts the array bytes each round moves, for ``metrics.jsonl``.

It delegates everything to the real grid (``HPCGrid`` under flwr-hpc, or any other) and
adds up the bytes of the ArrayRecords in messages sent and replies received -- the
payload a transport has to move, independent of how it moves it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator

from flwr.app import Message
from flwr.serverapp import Grid
from flwr.supercore.run import Run

from flwr_hpc.payload.objects import array_bytes


class MeteredGrid(Grid):
    """Counts ArrayRecord bytes and messages through ``grid``, by direction and type."""

    def __init__(self, grid: Grid) -> None:
        self.grid = grid
        self.counts: Counter[str] = Counter()

    def _count(self, direction: str, messages: list[Message]) -> None:
        for m in messages:
            kind = m.metadata.message_type.split(".")[0]
            self.counts[f"{direction}_bytes"] += (n := array_bytes(m))
            self.counts[f"{direction}_{kind}_bytes"] += n
            self.counts[f"{direction}_{kind}_messages"] += 1

    def take(self) -> dict[str, int]:
        """Counters since the last call: ``sent_bytes``, ``sent_train_messages``, ..."""
        out = dict(self.counts)
        self.counts.clear()
        return out

    def set_run(self, run: Run) -> None:
        self.grid.set_run(run)

    @property
    def run(self) -> Run:
        return self.grid.run

    def create_message(self, *args, **kwargs) -> Message:
        return self.grid.create_message(*args, **kwargs)

    def get_node_ids(self) -> Iterable[int]:
        return self.grid.get_node_ids()

    def get_nodes(self):
        return self.grid.get_nodes()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        messages = list(messages)
        self._count("sent", messages)
        return self.grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        replies = list(self.grid.pull_messages(message_ids))
        self._count("received", replies)
        return replies

    def send_and_receive(self, messages: Iterable[Message], *,
                         timeout: float | None = None) -> list[Message]:
        """All replies at once, as a list (Flower's contract)."""
        return list(self.stream_replies(messages, timeout=timeout))

    def stream_replies(self, messages: Iterable[Message], *,
                       timeout: float | None = None) -> Iterator[Message]:
        """Replies pass through one by one, as the wrapped grid yields them (the
        wrapped grid's ``stream_replies``; its ``send_and_receive`` on other grids)."""
        messages = list(messages)
        self._count("sent", messages)
        stream = getattr(self.grid, "stream_replies", None)
        replies = (stream(messages, timeout=timeout) if stream is not None
                   else self.grid.send_and_receive(messages, timeout=timeout))

        def counted() -> Iterator[Message]:
            for reply in replies:
                self._count("received", [reply])
                yield reply

        return counted()
