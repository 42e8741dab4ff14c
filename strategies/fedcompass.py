"""FedCompass: computing-power-aware semi-asynchronous FL (APPFL's baseline, reimplemented).

Li, Ryu, Chen, Kumar, Huerta & Kindratenko, "FedCompass: Efficient Cross-Silo Federated
Learning on Heterogeneous Client Devices using a Computing Power Aware Scheduler"
(ICLR 2024, arXiv:2309.14675); APPFL's ``CompassScheduler`` / ``FedCompassAggregator``.
Written here from the published algorithm, in the grid's (virtual) time.

Contract
--------
* **Speed.** Per node, seconds per local step as the server sees them: the time from
  sending the model to the reply, divided by the steps asked (queue wait included -- the
  server cannot tell them apart); EWMA ``v <- (1 - m) v + m v_obs`` (``speed_momentum``).
* **Arrival groups.** Nodes are sent the model with a step count chosen so that they
  arrive together: a group has an expected arrival time ``E`` and a latest one
  ``L = start + (E - start) * latest_time_factor``. A node joins the existing group that
  lets it run the most steps ``floor((E - now) / v)`` within ``[min_steps, max_steps]``;
  if none fits, a new group is made with steps that bring it in one ``max_steps`` of the
  fastest member after the latest arrival of a live group (``max_steps`` when there is
  none), clamped to ``[min_steps, max_steps]``.
* **Aggregation** (one Flower round), mixing models
  ``w <- (1 - sum a_i) w + sum a_i w_i`` with ``a_i = alpha * s(tau_i) / N``
  (``s(tau) = (1 + tau) ** -staleness_exponent``, ``N`` nodes):
  - a node's first arrival (it has no group yet) is merged alone, at once;
  - when every member of a group has arrived, or at the group's latest time with those
    that have, the group's updates are merged together with the general buffer; its
    members, fastest first, are assigned new groups and sent the new model.
* A node arriving after its group's latest time goes to the **general buffer** (merged at
  the next group aggregation) and is sent the current model at once with a new group.
  Failed jobs are treated alike without an update.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message

from flwr_hpc.protocol import LOCAL_STEPS_KEY
from strategies.scheduled import (
    InFlight,
    ScheduledFedAvg,
    grid_now,
    mix_models,
    model_of,
    staleness_weight,
)

log = logging.getLogger("flwr")


@dataclass
class ArrivalGroup:
    """Nodes sent the model to arrive together."""

    expected: float  # grid time
    latest: float
    members: set[int] = field(default_factory=set)  # not yet arrived
    arrived: list[int] = field(default_factory=list)


def join_steps(expected: float, now: float, speed: float, min_steps: int,
               max_steps: int) -> int | None:
    """Steps that bring a node of ``speed`` s/step in by ``expected`` (None: outside
    ``[min_steps, max_steps]``)."""
    steps = math.floor((expected - now) / speed)
    return steps if min_steps <= steps <= max_steps else None


def new_group_steps(groups: list[tuple[float, float]], now: float, speed: float,
                    min_steps: int, max_steps: int) -> int:
    """Steps of a node that founds a new group; ``groups`` are ``(latest, fastest member's
    speed)`` of the live groups (see the module docstring)."""
    assigned = -1
    for latest, fastest in groups:
        if now < latest:
            steps = math.floor((latest + fastest * max_steps - now) / speed)
            if steps <= max_steps:
                assigned = max(assigned, steps)
    if 0 <= assigned < min_steps:
        return min_steps
    return max_steps if assigned < 0 else assigned


def compass_coefficient(alpha: float, staleness: int, exponent: float, num_nodes: int
                        ) -> float:
    """``alpha * s(staleness) / num_nodes``: one update's share in the mix."""
    return float(alpha) * staleness_weight(staleness, exponent) / max(num_nodes, 1)


class FedCompass(ScheduledFedAvg):
    """Arrival groups sized by each node's measured speed (see the module docstring).

    Parameters
    ----------
    min_steps, max_steps : int (default: 5, 40)
        Bounds of a node's local steps (APPFL's ``min_local_steps`` / ``max_local_steps``).
    latest_time_factor : float (default: 1.5)
        A group's latest arrival, relative to its expected one.
    speed_momentum : float (default: 0.9)
        Weight of the newest speed observation.
    alpha : float (default: 0.9)
        Mixing weight (divided by the number of nodes).
    staleness_exponent : float (default: 0.5)
        Polynomial staleness ``(1 + tau) ** -a``.
    """

    def __init__(self, *, min_steps: int = 5, max_steps: int = 40,
                 latest_time_factor: float = 1.5, speed_momentum: float = 0.9,
                 alpha: float = 0.9, max_staleness: int = 1000, **kwargs: Any) -> None:
        super().__init__(max_staleness=max_staleness, **kwargs)
        if not 1 <= min_steps <= max_steps or latest_time_factor < 1:
            raise ValueError("need 1 <= min_steps <= max_steps and latest_time_factor >= 1")
        self.min_steps = int(min_steps)
        self.max_steps = int(max_steps)
        self.latest_time_factor = float(latest_time_factor)
        self.speed_momentum = float(speed_momentum)
        self.alpha = float(alpha)
        self.speed: dict[int, float] = {}
        self.steps: dict[int, int] = {}
        self.sent_at: dict[int, float] = {}
        self.group_of: dict[int, int] = {}
        self.groups: dict[int, ArrivalGroup] = {}
        self._next_group = 0
        self._general: list[tuple[InFlight, Message]] = []
        self._buffers: dict[int, list[tuple[InFlight, Message]]] = {}
        self._to_send: list[int] = []  # nodes to send the new model at the next round
        self._carry: list[tuple[InFlight, Message]] = []  # collected, not yet handled
        self._started = False

    checkpoint_transient = ScheduledFedAvg.checkpoint_transient + (
        "_general", "_buffers", "_carry", "groups", "group_of", "_to_send", "sent_at")

    # ------------------------------------------------------------------ groups

    def _assign(self, node: int, now: float) -> None:
        speed = self.speed[node]
        live = {g: grp for g, grp in self.groups.items() if grp.members or grp.arrived}
        best: tuple[int, int] | None = None
        for g, grp in sorted(live.items()):
            steps = join_steps(grp.expected, now, speed, self.min_steps, self.max_steps)
            if steps is not None and (best is None or steps >= best[1]):
                best = (g, steps)
        if best is None:
            speeds = [(grp.latest, min(self.speed[n] for n in grp.members | set(grp.arrived)))
                      for grp in live.values() if grp.members or grp.arrived]
            steps = (self.max_steps if not live else
                     new_group_steps(speeds, now, speed, self.min_steps, self.max_steps))
            g = self._next_group
            self._next_group += 1
            self.groups[g] = ArrivalGroup(now + steps * speed,
                                          now + steps * speed * self.latest_time_factor)
            best = (g, steps)
        g, steps = best
        self.groups[g].members.add(node)
        self.group_of[node] = g
        self.steps[node] = steps

    # ------------------------------------------------------------------ Flower hooks

    def select_train_nodes(self, server_round: int, idle: list[int],
                           all_nodes: list[int]) -> list[int]:
        now = grid_now(self._grid)
        if not self._started:  # everybody starts with max_steps and no group
            self._started = True
            for n in idle:
                self.steps[n] = self.max_steps
                self.sent_at[n] = now
            return list(idle)
        nodes, self._to_send = [n for n in self._to_send if n in idle], []
        for n in nodes:
            self.sent_at[n] = now
        return nodes

    def node_train_config(self, server_round: int, node_id: int,
                          config: ConfigRecord) -> ConfigRecord:
        config[LOCAL_STEPS_KEY] = self.steps.get(node_id, self.max_steps)
        return config

    def _observe(self, node: int, now: float) -> None:
        steps = self.steps.get(node, self.max_steps)
        v = max(now - self.sent_at.get(node, 0.0), 1e-9) / steps
        self.speed[node] = (v if node not in self.speed else
                            (1 - self.speed_momentum) * self.speed[node]
                            + self.speed_momentum * v)

    def _leave_group(self, node: int) -> None:
        g = self.group_of.pop(node, None)
        if g is not None and g in self.groups:
            self.groups[g].members.discard(node)
            if not self.groups[g].members and not self.groups[g].arrived:
                del self.groups[g]

    def _resend_now(self, server_round: int, node: int, now: float) -> None:
        self._assign(node, now)
        self.sent_at[node] = now
        self._push(server_round, [node])

    def _due_group(self) -> int | None:
        """A group whose latest time is the next deadline with arrivals to merge."""
        due = [(grp.latest, g) for g, grp in self.groups.items() if grp.arrived]
        return min(due)[1] if due else None

    def aggregate_train(self, server_round: int,
                        replies: Any) -> tuple[ArrayRecord | None, Any]:
        for reply in replies:
            log.warning("ignoring a reply that FedCompass did not dispatch (node %s)",
                        reply.metadata.src_node_id)
        grid = self._grid
        entries: list[tuple[InFlight, Message]] | None = None
        event = ""
        while entries is None:
            g_due = self._due_group()
            until = self.groups[g_due].latest if g_due is not None else None
            if self._carry:
                batch, self._carry = self._carry, []
            else:
                if not self._inflight:
                    break
                batch = self._next_replies(grid, until)
            now = grid_now(grid)
            if not batch:
                if g_due is None:
                    break  # nothing left in flight
                entries, event = self._close_group(g_due, now), f"group {g_due} (timer)"
                break
            for i, (task, reply) in enumerate(batch):
                node = task.node_id
                self._observe(node, now)
                g = self.group_of.get(node)
                if g is None:  # first arrival: merged alone, at once
                    if reply.has_error():
                        self._resend_now(server_round, node, now)
                        continue
                    entries, event = [(task, reply)], f"node {node} (first arrival)"
                    self._assign(node, now)
                    self._to_send.append(node)
                    self._carry = batch[i + 1:]
                    break
                grp = self.groups.get(g)
                if grp is None or now > grp.latest or reply.has_error():
                    self._leave_group(node)
                    if not reply.has_error():
                        self._general.append((task, reply))
                    self._resend_now(server_round, node, now)
                    continue
                grp.members.discard(node)
                grp.arrived.append(node)
                self._buffers.setdefault(g, []).append((task, reply))
                if not grp.members:
                    entries, event = self._close_group(g, now), f"group {g} (complete)"
                    self._carry = batch[i + 1:]
                    break
        if entries is None:
            self.waiting_only = bool(self._inflight)
            return None, None
        log.info("FedCompass: aggregating %s: %d update(s)", event, len(entries))
        current = self._models[self.version]
        arrays, metrics = self._merge(current, entries)
        if arrays is not None:
            self.version += 1
        self._forget_models()
        return arrays, metrics

    def _close_group(self, g: int, now: float) -> list[tuple[InFlight, Message]]:
        """The group's arrived updates plus the general buffer; its arrived members get new
        groups (fastest first) and are sent the new model at the next round."""
        grp = self.groups[g]
        entries = self._general + self._buffers.pop(g, [])
        self._general = []
        arrived = sorted(grp.arrived, key=lambda n: self.speed[n])
        grp.arrived = []
        grp.expected = grp.latest = 0.0  # whoever is still out of it arrives late
        if not grp.members:
            del self.groups[g]
        for n in arrived:
            self.group_of.pop(n, None)
        for n in arrived:
            self._assign(n, now)
        self._to_send.extend(arrived)
        return entries

    def combine(self, current: ArrayRecord,
                used: list[tuple[float, float, InFlight, Message]]) -> ArrayRecord:
        n = len(list(self._grid.get_node_ids()))
        return mix_models(current, [
            (compass_coefficient(self.alpha, self.version - t.version,
                                 self.staleness_exponent, n), model_of(r))
            for _, _, t, r in used])

    def held_updates(self) -> list[InFlight]:
        return [t for t, _ in self._general + self._carry
                + [e for b in self._buffers.values() for e in b]]

    def summary(self) -> None:
        log.info("\t├── FedCompass: steps %d-%d, latest-time factor %.2f, alpha %.2f",
                 self.min_steps, self.max_steps, self.latest_time_factor, self.alpha)
        super().summary()
