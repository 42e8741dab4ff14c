"""A task's error in tasks.jsonl keeps what failed (its start) and the log tail (its end)."""

from __future__ import annotations

from flwr_hpc.server.tasks import clip


def test_a_long_error_keeps_its_headline_and_its_tail():
    headline = "torchrun rank group of 2 ranks exited -9 while running this task; command: x"
    tail = "traceback : Signal 9 (SIGKILL) received by PID 26157"
    text = headline + "\nlog tail:\n" + "noise line\n" * 500 + tail
    out = clip(text)
    assert len(out) <= 1003 and out.startswith(headline) and out.endswith(tail)
    assert " … " in out
    assert clip("short error") == "short error"
