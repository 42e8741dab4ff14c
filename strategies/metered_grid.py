"""A Grid wrapper that counts the array bytes each round moves, for ``metrics.jsonl``.

It delegates everything to the real grid (``HPCGrid`` under flwr-hpc, or any other) and
adds up the bytes of the ArrayRecords in messages sent and replies received -- the
payload a transport has to move, independent of how it moves it.
"""

from __future__ import annotations

from collections.abc import Iterable

from flwr.app import Message
from flwr.serverapp import Grid
from flwr.supercore.run import Run


def array_bytes(message: Message) -> int:
    if message.has_error():
        return 0
    return sum(len(arr.data) for rec in message.content.array_records.values()
               for arr in rec.values())


class MeteredGrid(Grid):
    """Counts ``bytes_sent`` / ``bytes_received`` (ArrayRecord bytes) through ``grid``."""

    def __init__(self, grid: Grid) -> None:
        self.grid = grid
        self.bytes_sent = 0
        self.bytes_received = 0

    def take(self) -> tuple[int, int]:
        """Bytes (sent, received) since the last call."""
        out = (self.bytes_sent, self.bytes_received)
        self.bytes_sent = self.bytes_received = 0
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
        self.bytes_sent += sum(array_bytes(m) for m in messages)
        return self.grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        replies = list(self.grid.pull_messages(message_ids))
        self.bytes_received += sum(array_bytes(m) for m in replies)
        return replies

    def send_and_receive(self, messages: Iterable[Message], *,
                         timeout: float | None = None) -> Iterable[Message]:
        messages = list(messages)
        self.bytes_sent += sum(array_bytes(m) for m in messages)
        replies = list(self.grid.send_and_receive(messages, timeout=timeout))
        self.bytes_received += sum(array_bytes(m) for m in replies)
        return replies
