"""HPCGrid keeps Flower's Grid contract: a list from send_and_receive, any number of
concurrent callers, Contexts that follow SuperNode semantics, and workers that outlive
the thread that started them (issue #15, items 1-4)."""

from __future__ import annotations

import threading

import pytest
from helpers import fed_of, train_messages


@pytest.fixture(autouse=True)
def _task_identity():
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 4242, 1, 1


def _rounds_seen(reply) -> int:
    assert not reply.has_error(), reply.error.reason
    return int(reply.content["metrics"]["rounds-seen"])


def test_concurrent_callers_each_get_exactly_their_replies(grid_factory):
    """Flower's legacy Server sends one message per client, each from its own thread."""
    grid = grid_factory(fed_of({"a": 2, "b": 2}))  # process-pool
    nodes = sorted(grid.get_node_ids())
    got: dict[int, list] = {}

    def one(nid: int) -> None:
        got[nid] = grid.send_and_receive(train_messages(grid, 1, nodes=[nid]), timeout=60)

    threads = [threading.Thread(target=one, args=(nid,)) for nid in nodes]
    for t in threads:
        t.start()
    for t in threads:
        t.join(90)
    assert sorted(got) == nodes
    for nid, replies in got.items():
        assert [r.metadata.src_node_id for r in replies] == [nid]
        assert not replies[0].has_error()


def test_two_streams_interleaved_do_not_steal_replies(grid_factory):
    grid = grid_factory(fed_of({"a": 2}, engine="thread-pool"))
    n1, n2 = sorted(grid.get_node_ids())
    s1 = grid.stream_replies(train_messages(grid, 1, nodes=[n1]), timeout=60)
    s2 = grid.stream_replies(train_messages(grid, 1, nodes=[n2]), timeout=60)
    assert [r.metadata.src_node_id for r in s2] == [n2]
    assert [r.metadata.src_node_id for r in s1] == [n1]


def test_fire_and_forget_messages_still_advance_the_context(grid_factory):
    """A SuperNode saves the node's Context when its ClientApp finishes, pulled or not."""
    grid = grid_factory(fed_of({"a": 1}, engine="thread-pool"))
    (nid,) = grid.get_node_ids()
    (first,) = grid.push_messages(train_messages(grid, 1))
    assert grid.wait_any([first], until=grid.clock.now() + 60) == [first]  # never pulled
    (reply,) = grid.send_and_receive(train_messages(grid, 2), timeout=60)
    assert _rounds_seen(reply) == 2
    assert grid.node_context(nid).state["history"]["rounds"] == 2


def test_a_message_waits_for_the_earlier_one_to_its_node(grid_factory):
    """Pushed while the node still runs an earlier message, it is staged with the Context
    that message leaves (one message at a time per node, as on a SuperNode)."""
    grid = grid_factory(fed_of({"a": 1}, engine="thread-pool"))
    grid._run_config.update({"sleep-partition": 0, "sleep-s": 1.5, "sleep-round": 1})
    ids = [*grid.push_messages(train_messages(grid, 1)),
           *grid.push_messages(train_messages(grid, 2)),
           *grid.push_messages(train_messages(grid, 3))]
    replies = {}
    while len(replies) < 3:
        ready = grid.wait_any([m for m in ids if m not in replies],
                              until=grid.clock.now() + 60)
        assert ready, "a reply never came"
        for reply in grid.pull_messages(ready):
            replies[reply.metadata.reply_to_message_id] = reply
    assert [_rounds_seen(replies[m]) for m in ids] == [1, 2, 3]


def test_site_workers_outlive_the_thread_that_started_them(grid_factory):
    """Flower's legacy Server makes a new thread pool every round; the process pool's
    workers are spawned from it and must not die when its threads exit."""
    grid = grid_factory(fed_of({"a": 1}))  # process-pool
    backend = grid.sites["a"].backend
    out: dict[int, object] = {}

    def round_in_a_thread(r: int) -> None:
        (out[r],) = grid.send_and_receive(train_messages(grid, r), timeout=120)

    for r in (1, 2, 3):
        t = threading.Thread(target=round_in_a_thread, args=(r,))
        t.start()
        t.join(180)
        if r == 1:
            pids = backend._worker_pids()
    assert [_rounds_seen(out[r]) for r in (1, 2, 3)] == [1, 2, 3]
    assert backend._worker_pids() == pids and pids
