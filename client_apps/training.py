"""The local training loop shared by every ClientApp: K steps of AdamW on the adapter.

It reads like the algorithm: sample a batch, compute the task loss, add FedProx's
proximal term when the strategy sent ``proximal-mu``, step. In a data-parallel group
(``flwr_hpc.dist``) the model is wrapped in DistributedDataParallel and every rank draws
a disjoint shard of each batch from a DistributedSampler, so all replicas stay identical.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from flwr_hpc.dist import DistInfo

LossFn = Callable[[Any, Mapping[str, torch.Tensor]], tuple[torch.Tensor, int]]


@dataclass
class TrainStats:
    train_loss: float
    steps: int
    examples_seen: int
    tokens: int
    seconds: float
    epsilon: float | None = None  # DP-SGD: privacy spent so far (all rounds)
    noise_multiplier: float | None = None
    dp_state: str | None = None  # DP-SGD: the accountant's state, for Context.state

    @property
    def step_time_s(self) -> float:
        return self.seconds / max(self.steps, 1)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


def make_loader(samples: Sequence[dict], collate: Callable, *, batch_size: int, seed: int,
                dist: DistInfo):
    """Shuffled batches; in a rank group each rank draws its own shard."""
    from torch.utils.data import DataLoader, DistributedSampler, RandomSampler

    if dist.enabled:
        sampler = DistributedSampler(samples, num_replicas=dist.world_size, rank=dist.rank,
                                     shuffle=True, seed=seed, drop_last=False)
    else:
        sampler = RandomSampler(samples, generator=torch.Generator().manual_seed(seed))
    return DataLoader(samples, batch_size=batch_size, sampler=sampler, collate_fn=collate)


def endless(loader):
    """Epoch after epoch of ``loader`` (re-seeding a DistributedSampler each epoch)."""
    epoch = 0
    while True:
        if hasattr(loader.sampler, "set_epoch"):
            loader.sampler.set_epoch(epoch)
        yield from loader
        epoch += 1


def batches(samples: Sequence[dict], collate: Callable, *, batch_size: int, seed: int,
            dist: DistInfo):
    """Endless shuffled batches (kept for callers that only need an iterator)."""
    return endless(make_loader(samples, collate, batch_size=batch_size, seed=seed, dist=dist))


def proximal_term(model, global_params: Sequence[torch.Tensor]) -> torch.Tensor:
    trainable = [p for p in model.parameters() if p.requires_grad]
    return sum(((p - g) ** 2).sum() for p, g in zip(trainable, global_params, strict=True))


def train_steps(model, data, loss_fn: LossFn, *, steps: int, lr: float,
                optimizer: str = "adamw", weight_decay: float = 0.0, proximal_mu: float = 0.0,
                max_grad_norm: float = 0.0,
                device: torch.device, dist: DistInfo, dp: Mapping[str, Any] | None = None,
                dp_total_steps: int = 0, dp_state: str | None = None) -> TrainStats:
    """Train ``model``'s trainable parameters for ``steps`` optimizer steps.

    ``data`` is a DataLoader (required for DP-SGD, whose Poisson sampler replaces it) or
    any batch iterator. With ``dp`` (the job's ``dp`` section, type ``opacus``) the step is
    DP-SGD: per-sample clipping to ``dp.max_grad_norm`` plus Gaussian noise, accounted
    from ``dp_state`` onwards.
    """
    private = dp is not None and dp.get("type") == "opacus"
    if dist.enabled:
        if private:
            from opacus.distributed import DifferentiallyPrivateDistributedDataParallel as DPDDP

            train_model = DPDDP(model)  # broadcasts rank 0's weights; the optimizer averages
        else:
            from torch.nn.parallel import DistributedDataParallel

            train_model = DistributedDataParallel(model)  # broadcasts rank 0's weights
    else:
        train_model = model
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = (torch.optim.SGD(params, lr=lr, weight_decay=weight_decay) if optimizer == "sgd"
                 else torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay))
    session = None
    if private:
        from client_apps.privacy import make_private

        session = make_private(train_model, optimizer, data, dp, total_steps=dp_total_steps,
                               accountant_state=dp_state, distributed=dist.enabled)
        optimizer, data = session.optimizer, session.loader
    batch_iter = endless(data) if hasattr(data, "sampler") else data
    global_params = [p.detach().clone() for p in params] if proximal_mu > 0 else []
    losses: list[float] = []
    seen = tokens = 0
    start = time.perf_counter()
    try:
        for _ in range(steps):
            batch = {k: v.to(device) for k, v in next(batch_iter).items()}
            loss, n_tokens = loss_fn(train_model, batch)
            loss_value = loss.item()
            if not math.isfinite(loss_value):
                raise FloatingPointError(
                    f"training loss is {loss_value} (lower the learning rate?)")
            objective = loss
            if proximal_mu > 0:
                objective = loss + proximal_mu / 2 * proximal_term(model, global_params)
            optimizer.zero_grad(set_to_none=True)
            objective.backward()
            if max_grad_norm > 0 and not private:
                torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
            optimizer.step()
            losses.append(loss_value)
            seen += len(batch["input_ids"])
            tokens += n_tokens
        seconds = time.perf_counter() - start
        stats = TrainStats(train_loss=sum(losses) / max(len(losses), 1), steps=steps,
                           examples_seen=seen, tokens=tokens, seconds=seconds)
        if session is not None:
            stats.epsilon = session.epsilon(float(dp["delta"]))
            stats.noise_multiplier = session.noise_multiplier
            stats.dp_state = session.accountant_state()
        return stats
    finally:
        if session is not None:
            session.close()
