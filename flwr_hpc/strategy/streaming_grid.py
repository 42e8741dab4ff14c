"""``StreamingGrid``: the explicit opt-in to replies one at a time.

Flower's ``Grid.send_and_receive`` returns every reply at once (a ``list``): Flower's own
workflows iterate the replies twice and take ``len()``, so ``HPCGrid`` keeps that contract.
A strategy that aggregates while it iterates (``flwr_hpc.strategy.streaming``) can hold one reply
at a time instead of all of them -- O(model) server memory, not O(clients x model) -- when
Flower's round loop gets this wrapper: its ``send_and_receive`` is the wrapped grid's
``stream_replies``. Everything else is delegated.

    strategy.start(grid=StreamingGrid(grid), ...)   # StreamingFedAvg and friends

On a grid without ``stream_replies`` (Flower's own), it is the wrapped grid unchanged. On
``HPCGrid`` a reply's arrays are read from the site's store when the strategy first uses
them (``lazy_arrays``): a strategy that releases each array after use
(``StreamingFedAvg``) holds one array of one reply at a time.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Iterator
from typing import Any

from flwr.app import Message, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from typing_extensions import override


def _takes(fn: Any, name: str) -> bool:
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


class StreamingGrid(Grid):
    """Delegates to ``grid``; ``send_and_receive`` yields replies as they arrive.

    Parameters
    ----------
    grid : Grid
        The grid to wrap: ``HPCGrid``, a wrapper of it that has ``stream_replies``, or any
        Flower grid (then replies come as that grid returns them).
    """

    def __init__(self, grid: Grid) -> None:
        self.grid = grid

    @override
    def set_run(self, run: Run) -> None:
        self.grid.set_run(run)

    @property
    @override
    def run(self) -> Run:
        return self.grid.run

    @override
    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int,
                       group_id: str, ttl: float | None = None) -> Message:
        return self.grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    @override
    def get_node_ids(self) -> Iterable[int]:
        return self.grid.get_node_ids()

    @override
    def get_nodes(self) -> Iterable[Any]:
        return self.grid.get_nodes()

    @override
    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.grid.push_messages(messages)

    @override
    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self.grid.pull_messages(message_ids)

    @override
    def send_and_receive(self, messages: Iterable[Message], *,
                         timeout: float | None = None) -> Iterator[Message]:
        stream = getattr(self.grid, "stream_replies", None)
        if stream is None:
            return iter(self.grid.send_and_receive(messages, timeout=timeout))
        if _takes(stream, "lazy_arrays"):  # HPCGrid: arrays read when first used
            return stream(messages, timeout=timeout, lazy_arrays=True)
        return stream(messages, timeout=timeout)

    def stream_replies(self, messages: Iterable[Message], *,
                       timeout: float | None = None) -> Iterator[Message]:
        """The same as :meth:`send_and_receive`: the replies one at a time."""
        return self.send_and_receive(messages, timeout=timeout)

    def __getattr__(self, name: str) -> Any:  # wait_any, site_of, ... of the wrapped grid
        """Any other attribute is the wrapped grid's."""
        if name == "grid":
            raise AttributeError(name)
        return getattr(self.grid, name)
