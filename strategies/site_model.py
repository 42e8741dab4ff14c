"""A ServerApp that never loads the base model (``server.site``): the model lives at a site.

With Llama-2-7B the base model is 13.5 GB: too much for a login node or a small VM, and
the server only ever needs it for three things. With ``server.site: <site>`` it does none
of them itself:

* the **initial adapter** is made by that site's first client (a ``query`` message with
  ``request: initial-adapter``): the adapter every client starts from, with the
  ``adapter_config.json`` peft writes for it;
* **central evaluation** runs there too: an ``evaluate`` message carrying the global adapter
  and ``central-eval: 1``, which the ClientApp answers with the metrics of the whole
  held-out split -- the same function the server would have run, so the same numbers;
* **adapters are saved without the base**: ``adapter_model.safetensors`` (numpy, the keys
  peft saves) and the site's ``adapter_config.json``, loadable with
  ``PeftModel.from_pretrained(base, dir)``.

This module imports neither torch nor transformers: with ``server.site`` the ServerApp's
process holds Flower, numpy and the adapter only.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from flwr_hpc.errors import ConfigError

REQUEST_KEY = "request"
INITIAL_ADAPTER = "initial-adapter"
CENTRAL_EVAL_KEY = "central-eval"
ADAPTER_CONFIG_KEY = "adapter-config"
BASE_BYTES_KEY = "base-bytes"


class SiteModel:
    """The base model at ``site``, reached through ``grid`` (see the module docstring)."""

    def __init__(self, grid: Grid, site: str, config: ConfigRecord,
                 timeout: float = 3600.0) -> None:
        from flwr_hpc.server.timing import site_of  # server side only (sites import the keys)

        self.grid, self.site, self.timeout = grid, site, timeout
        self.config = config  # what every message carries (job digest, local steps)
        nodes = sorted(n for n in grid.get_node_ids() if site_of(grid, n) == site)
        if not nodes:
            sites = sorted({site_of(grid, n) for n in grid.get_node_ids()})
            raise ConfigError("job", "server.site",
                              f"no client at site {site!r}; the federation's sites are "
                              f"{', '.join(sites)}")
        self.node_id = nodes[0]
        self.adapter_config: str | None = None
        self.base_bytes = 0

    def _ask(self, message_type: str, content: RecordDict) -> RecordDict:
        msg = Message(content=content, dst_node_id=self.node_id, message_type=message_type)
        (reply,) = self.grid.send_and_receive([msg], timeout=self.timeout)
        if reply.has_error():
            raise RuntimeError(f"site {self.site!r} (node {self.node_id}) could not "
                               f"{message_type}: {reply.error.reason}")
        return reply.content

    def initial_adapter(self) -> ArrayRecord:
        """The adapter every client starts from, made at the site."""
        config = ConfigRecord({**dict(self.config), REQUEST_KEY: INITIAL_ADAPTER})
        content = self._ask(MessageType.QUERY, RecordDict({"config": config}))
        meta = content["config"]
        self.adapter_config = str(meta[ADAPTER_CONFIG_KEY])
        self.base_bytes = int(meta.get(BASE_BYTES_KEY, 0))
        return content["arrays"]

    def central(self, arrays: ArrayRecord) -> dict[str, float]:
        """Central evaluation of ``arrays`` on the whole held-out split, at the site."""
        config = ConfigRecord({**dict(self.config), CENTRAL_EVAL_KEY: 1})
        content = self._ask(MessageType.EVALUATE,
                            RecordDict({"arrays": arrays, "config": config}))
        return {k: float(v) for k, v in content["metrics"].items()
                if k != "num-examples"}

    def save(self, arrays: ArrayRecord, where: Path) -> None:
        """``arrays`` as a peft adapter directory, without the base model."""
        save_adapter_files(arrays, self.adapter_config or "{}", where)


def save_adapter_files(arrays: ArrayRecord, adapter_config: str, where: Path) -> Path:
    """Write ``adapter_model.safetensors`` (the tensors under peft's saved names) and
    ``adapter_config.json`` into ``where``: what ``PeftModel.save_pretrained`` writes."""
    from safetensors.numpy import save_file

    where.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, Any] = {key: arr.numpy() for key, arr in arrays.items()}
    save_file(tensors, str(where / "adapter_model.safetensors"), metadata={"format": "pt"})
    (where / "adapter_config.json").write_text(
        json.dumps(json.loads(adapter_config), indent=2, sort_keys=True))
    return where
