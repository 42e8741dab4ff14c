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

    @property
    def step_time_s(self) -> float:
        return self.seconds / max(self.steps, 1)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


def batches(samples: Sequence[dict], collate: Callable, *, batch_size: int, seed: int,
            dist: DistInfo):
    """Endless shuffled batches (epoch after epoch); each rank gets its own shard."""
    from torch.utils.data import DataLoader, DistributedSampler, RandomSampler

    generator = torch.Generator().manual_seed(seed)
    if dist.enabled:
        sampler = DistributedSampler(samples, num_replicas=dist.world_size, rank=dist.rank,
                                     shuffle=True, seed=seed, drop_last=False)
    else:
        sampler = RandomSampler(samples, generator=generator)
    loader = DataLoader(samples, batch_size=batch_size, sampler=sampler, collate_fn=collate)
    epoch = 0
    while True:
        if dist.enabled:
            sampler.set_epoch(epoch)
        yield from loader
        epoch += 1


def proximal_term(model, global_params: Sequence[torch.Tensor]) -> torch.Tensor:
    trainable = [p for p in model.parameters() if p.requires_grad]
    return sum(((p - g) ** 2).sum() for p, g in zip(trainable, global_params, strict=True))


def train_steps(model, batch_iter, loss_fn: LossFn, *, steps: int, lr: float,
                weight_decay: float = 0.0, proximal_mu: float = 0.0, max_grad_norm: float = 0.0,
                device: torch.device, dist: DistInfo) -> TrainStats:
    """Train ``model``'s trainable parameters for ``steps`` optimizer steps."""
    if dist.enabled:
        from torch.nn.parallel import DistributedDataParallel

        train_model = DistributedDataParallel(model)  # broadcasts rank 0's weights
    else:
        train_model = model
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    global_params = [p.detach().clone() for p in params] if proximal_mu > 0 else []
    losses: list[float] = []
    seen = tokens = 0
    start = time.perf_counter()
    for _ in range(steps):
        batch = {k: v.to(device) for k, v in next(batch_iter).items()}
        loss, n_tokens = loss_fn(train_model, batch)
        loss_value = loss.item()
        if not math.isfinite(loss_value):
            raise FloatingPointError(f"training loss is {loss_value} (lower the learning rate?)")
        objective = loss
        if proximal_mu > 0:
            objective = loss + proximal_mu / 2 * proximal_term(model, global_params)
        optimizer.zero_grad(set_to_none=True)
        objective.backward()
        if max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        optimizer.step()
        losses.append(loss_value)
        seen += len(batch["input_ids"])
        tokens += n_tokens
    seconds = time.perf_counter() - start
    return TrainStats(train_loss=sum(losses) / max(len(losses), 1), steps=steps,
                      examples_seen=seen, tokens=tokens, seconds=seconds)
