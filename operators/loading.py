"""Model resolution and loading: hub id, local directory or object-store prefix, safetensors only."""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from typing import Any

from operators import MODEL_IMPLS, checkpoint, modelcache, storage
from operators.errors import ConfigError, ModelLoadError, RayembedError

QWEN_EOD_TOKEN = "<|endoftext|>"
ST_POOLING_MODES = {
    "pooling_mode_lasttoken": "lasttoken",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_cls_token": "cls",
}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_REMOTE_SCHEMES = ("s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "hf", "http", "https")
# Files a model needs; .bin / .pt / .pth pickles are never fetched or loaded.
_HUB_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "*.tiktoken", "1_Pooling/*", "2_Normalize/*"]
# What CPU stages (tokenizer, driver-side validation) need: configs and tokenizer files, no weights.
METADATA_PATTERNS = ["*.json", "*.txt", "*.model", "*.tiktoken", "merges.txt", "1_Pooling/*"]


@dataclass(frozen=True)
class ModelSpec:
    """What the operators need to know about a model directory, read from its config files."""

    path: str
    source: str
    model_type: str
    family: str  # "qwen3" or "sentence-transformers"
    pooling: str  # "lasttoken", "mean" or "cls"
    hidden_size: int
    vocab_size: int
    max_seq_length: int | None  # sentence-transformers' own limit, if it ships one
    architectures: tuple[str, ...] = ()

    @property
    def is_qwen3(self) -> bool:
        return self.family == "qwen3"


def default_cache_dir() -> str:
    return os.environ.get("RAYEMBED_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "rayembed", "models"))


def _hint(source: str) -> str:
    repo = source if _HUB_ID.match(source) else "Qwen/Qwen3-Embedding-0.6B"
    return (
        "pass a local model directory (or an s3:// prefix) with --model PATH, "
        f"e.g. one made by `huggingface-cli download {repo} --local-dir ./qwen3-emb`"
    )


def resolve_model_dir(
    source: str,
    *,
    revision: str | None = None,
    cache_dir: str | None = None,
    storage_options: dict[str, Any] | None = None,
    metadata_only: bool = False,
) -> str:
    """A local directory holding the model: the path itself, a per-machine cached copy of a remote prefix, or a
    hub snapshot. ``metadata_only`` fetches configs and tokenizer files but no weights. Every failure is one line
    that names the source."""
    scheme = source.split("://", 1)[0] if "://" in source else ""
    only = METADATA_PATTERNS if metadata_only else None
    if scheme in _REMOTE_SCHEMES and scheme not in ("hf", "http", "https"):
        try:
            path, _ = modelcache.copy_prefix_to_cache(source, cache_dir or default_cache_dir(), storage_options, only)
        except RayembedError as e:
            raise ModelLoadError(f"cannot load model {source!r}: {e}") from None
        except Exception as e:  # network / credentials: still one line
            raise ModelLoadError(f"cannot copy model {source!r}: {storage.describe_error(e)}") from None
        return path
    local = source[len("file://") :] if scheme == "file" else os.path.expanduser(source)
    if os.path.isdir(local):
        return os.path.abspath(local)
    if os.path.exists(local):
        raise ModelLoadError(f"model path {source!r} is a file; --model takes a directory with config.json")
    if local.startswith((".", "/", "~")) or not _HUB_ID.match(local):
        raise ModelLoadError(f"model path {source!r} does not exist; {_hint(source)}")
    return _hub_snapshot(local, revision, only or _HUB_PATTERNS)


def _hub_snapshot(repo_id: str, revision: str | None, patterns: list[str]) -> str:
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(repo_id, revision=revision, allow_patterns=patterns, local_files_only=offline)
    except Exception as e:
        reason = "HF_HUB_OFFLINE is set and it is not in the local hub cache" if offline else storage.describe_error(e)
        raise ModelLoadError(
            f"cannot fetch model {repo_id!r} from the Hugging Face hub ({reason}); {_hint(repo_id)}"
        ) from None


def _read_json(path: str) -> dict[str, Any] | None:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"cannot read {path}: {e}") from None


def inspect_model_dir(path: str, source: str | None = None, require_weights: bool = True) -> ModelSpec:
    """Classify a model directory as Qwen3 (last-token pooling) or sentence-transformers (its Pooling config)."""
    source = source or path
    config = _read_json(os.path.join(path, "config.json"))
    if config is None:
        raise ModelLoadError(f"model {source!r} has no config.json; is {path!r} a Hugging Face model directory?")
    files = os.listdir(path)
    if require_weights and not any(f.endswith(".safetensors") for f in files):
        pickles = [f for f in files if f.endswith((".bin", ".pt", ".pth"))]
        what = f"only pickle weights ({', '.join(sorted(pickles))})" if pickles else "no weights"
        raise ModelLoadError(f"model {source!r} has {what}; rayembed loads safetensors only")
    model_type = str(config.get("model_type", ""))
    hidden = int(config.get("hidden_size") or config.get("d_model") or 0)
    common = {
        "path": path,
        "source": source,
        "model_type": model_type,
        "hidden_size": hidden,
        "vocab_size": int(config.get("vocab_size") or 0),
        "architectures": tuple(config.get("architectures") or ()),
    }
    if model_type == "qwen3":
        return ModelSpec(family="qwen3", pooling="lasttoken", max_seq_length=None, **common)

    modules = _read_json(os.path.join(path, "modules.json")) or []
    pooling_dirs = [m.get("path", "") for m in modules if str(m.get("type", "")).endswith("Pooling")]
    if not pooling_dirs:
        raise ModelLoadError(
            f"model {source!r} (model_type {model_type!r}) is neither a Qwen3 model nor a sentence-transformers model "
            "with a Pooling module"
        )
    pool_cfg = _read_json(os.path.join(path, pooling_dirs[0], "config.json")) or {}
    modes = [mode for key, mode in ST_POOLING_MODES.items() if pool_cfg.get(key)]
    others = [k for k, v in pool_cfg.items() if k.startswith("pooling_mode") and v and k not in ST_POOLING_MODES]
    if len(modes) != 1 or others:
        raise ModelLoadError(
            f"model {source!r}: unsupported sentence-transformers pooling "
            f"{sorted(k for k, v in pool_cfg.items() if v)}; rayembed supports exactly one of mean, cls or lasttoken"
        )
    st_cfg = _read_json(os.path.join(path, "sentence_bert_config.json")) or {}
    max_seq = st_cfg.get("max_seq_length")
    return ModelSpec(
        family="sentence-transformers", pooling=modes[0], max_seq_length=int(max_seq) if max_seq else None, **common
    )


def load_tokenizer(spec: ModelSpec):
    """The model's fast tokenizer: the Rust ``tokenizers.Tokenizer`` of its tokenizer.json, parsed once.

    transformers' ``AutoTokenizer`` parses the same file twice (its added tokens in Python, then the whole file in
    Rust) and imports torch on the way; the encoders need only the Rust tokenizer. A directory without tokenizer.json
    goes through ``AutoTokenizer`` (which converts a slow tokenizer when it can) and its fast tokenizer is returned.
    """
    path = os.path.join(spec.path, "tokenizer.json")
    try:
        if os.path.isfile(path):
            from tokenizers import Tokenizer

            return Tokenizer.from_file(path)
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(spec.path, use_fast=True)
    except Exception as e:
        raise ModelLoadError(f"cannot load the tokenizer of {spec.source!r}: {storage.describe_error(e)}") from None
    if not getattr(tok, "is_fast", False):
        raise ModelLoadError(f"model {spec.source!r} ships no fast tokenizer (tokenizer.json); rayembed needs one")
    # Long documents are truncated by us; the warning about sequences above model_max_length is noise.
    tok.model_max_length = int(1e30)
    return tok


def _dtype_kwarg() -> str:
    import transformers
    from packaging.version import Version

    return "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"


def load_model(spec: ModelSpec, *, dtype, device, causal_lm: bool = False, trust_remote_code: bool = False):
    """Load weights natively in ``dtype`` (never autocast) with SDPA attention, in eval mode on ``device``."""
    from transformers import AutoModel, AutoModelForCausalLM

    cls = AutoModelForCausalLM if causal_lm else AutoModel
    kwargs = {_dtype_kwarg(): dtype, "use_safetensors": True, "trust_remote_code": trust_remote_code}
    try:
        model = cls.from_pretrained(spec.path, attn_implementation="sdpa", **kwargs)
    except (ValueError, TypeError) as e:
        if "sdpa" not in str(e).lower():
            raise ModelLoadError(f"cannot load model {spec.source!r}: {storage.describe_error(e)}") from None
        model = cls.from_pretrained(spec.path, **kwargs)
    except Exception as e:
        raise ModelLoadError(f"cannot load model {spec.source!r}: {storage.describe_error(e)}") from None
    return model.to(device).eval()


def native_blocker(spec: ModelSpec, impl: str, trust_remote_code: bool = False) -> str | None:
    """Why ``impl`` does not run this model natively (operators/qwen3.py for Qwen3, operators/bert.py for BERT), or
    None when it does. ``auto``: native for every checkpoint those support; ``native`` insists (a one-line error)."""
    if impl not in MODEL_IMPLS:
        raise ConfigError(f"model implementation must be one of {', '.join(MODEL_IMPLS)}, got {impl!r}")
    if impl == "transformers":
        return "transformers asked for"
    from operators import bert, qwen3

    reason = "trust_remote_code runs the checkpoint's own code" if trust_remote_code else None
    if reason is None:
        raw = checkpoint.read_config(spec.path)
        reason = qwen3.unsupported(raw) if spec.is_qwen3 else bert.unsupported(raw)
    if reason and impl == "native":
        raise ConfigError(f"model {spec.source!r} cannot run on rayembed's native implementation: {reason}")
    return reason


def load_backbone(
    spec: ModelSpec, *, dtype, device, impl: str = "auto", head_rows: tuple[int, ...] = (), trust_remote_code=False
):
    """``(backbone, head)``: the model without its LM head, on ``device`` in eval mode, and, when ``head_rows`` is
    given, just those rows of the LM head ([len(head_rows), hidden], in ``dtype``). Qwen3 and BERT run natively
    unless ``native_blocker`` says why not; anything else loads through transformers."""
    if native_blocker(spec, impl, trust_remote_code) is None:
        from operators import bert, qwen3

        try:
            if spec.is_qwen3:
                return qwen3.load_decoder(spec.path, dtype=dtype, device=device, head_rows=head_rows)
            return bert.load_encoder(spec.path, dtype=dtype, device=device), None
        except Exception as e:
            raise ModelLoadError(f"cannot load model {spec.source!r}: {storage.describe_error(e)}") from None
    if not head_rows:
        return load_model(spec, dtype=dtype, device=device, trust_remote_code=trust_remote_code), None
    lm = load_model(spec, dtype=dtype, device=device, causal_lm=True, trust_remote_code=trust_remote_code)
    head = lm.get_output_embeddings()
    if head is None or not hasattr(lm, "model"):
        raise ModelLoadError(f"model {spec.source!r} loaded without a language-model head; the reranker needs one")
    if max(head_rows) >= head.weight.shape[0]:
        rows = head.weight.shape[0]
        raise ModelLoadError(f"model {spec.source!r}: lm_head has {rows} rows, too few for the ids {head_rows}")
    # Keep the backbone alone; an untied lm_head (1.2 GB for the 8B in bf16) is freed with the wrapper.
    return lm.model, head.weight.detach()[list(head_rows)].contiguous()


# ------------------------------------------------------------------------------------------------------ reranker


def check_qwen3(spec: ModelSpec) -> None:
    if not spec.is_qwen3:
        raise ModelLoadError(
            f"model {spec.source!r} (model_type {spec.model_type!r}) is not a Qwen3 model; the reranker needs a "
            "Qwen3-Reranker checkpoint (Qwen3ForCausalLM), e.g. Qwen/Qwen3-Reranker-0.6B"
        )


def check_reranker_dir(spec: ModelSpec) -> None:
    """A reranker needs a Qwen3 causal LM whose ``lm_head`` is in the checkpoint (or tied to the embeddings)."""
    check_qwen3(spec)
    if spec.architectures and not any(a.endswith("ForCausalLM") for a in spec.architectures):
        raise ModelLoadError(
            f"model {spec.source!r} is a {', '.join(spec.architectures)} checkpoint without a language-model head; "
            "the reranker needs Qwen3ForCausalLM weights, e.g. Qwen/Qwen3-Reranker-0.6B"
        )
    with open(os.path.join(spec.path, "config.json")) as f:
        tied = json.load(f).get("tie_word_embeddings", True)
    if not tied and "lm_head.weight" not in _checkpoint_keys(spec.path):
        raise ModelLoadError(
            f"model {spec.source!r} has an untied lm_head but no lm_head.weight in its safetensors; it would be "
            "randomly initialised. Is it an embedding model? The reranker needs a Qwen3-Reranker checkpoint"
        )


def _checkpoint_keys(path: str) -> set[str]:
    try:
        return set(checkpoint.checkpoint_files(path))
    except FileNotFoundError:
        return set()
