"""Job configuration: frozen dataclasses built from a YAML job file and/or CLI flags (flags win)."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any

from operators import DEFAULT_EMBED_MODEL
from operators.embedder import MIN_DIM, OUTPUT_DTYPES
from operators.errors import ConfigError
from operators.tokenization import DEFAULT_MAX_LENGTH

DEFAULT_ROWS_PER_BLOCK = 1024
DEFAULT_MAX_ERROR_RATIO = 0.01
# Read blocks per model-actor call: the embed stage's Ray Data batch size is this many times --rows-per-block (unless
# --embed-batch-rows sets it), by whether the actor holds a GPU. The actor sorts a call's rows by length before it cuts
# micro-batches, so a larger window pads less. Simulated on a long-tail mix (lognormal lengths, median 150 tokens,
# sigma 1, cap 4,096), real tokens per computed token: at the GPU budget (65,536 tokens) 0.68 with 1,024-row windows,
# 0.88 with 4,096 and 0.96 with 16,384; at the CPU budget (8,192) 0.94, 0.98 and 0.995. A larger window also delays
# the first call (it waits for that many tokenized rows) and loses more work when an actor dies.
DEFAULT_EMBED_BLOCKS_PER_CALL = {"cpu": 4, "gpu": 16}


@dataclass(frozen=True)
class EmbedJobConfig:
    """Everything an embed job needs. ``storage_options`` never reaches logs, manifests or file metadata."""

    input: tuple[str, ...]
    output: str
    id_column: str = "id"
    text_column: str = "text"
    passthrough: tuple[str, ...] = ()
    model: str = DEFAULT_EMBED_MODEL
    revision: str | None = None
    dim: int | None = None
    instruction: str | None = None
    max_length: int = DEFAULT_MAX_LENGTH
    output_dtype: str = "float32"
    batch_tokens: int | None = None
    rows_per_block: int = DEFAULT_ROWS_PER_BLOCK
    embed_batch_rows: int | None = None  # rows per model-actor call; None: DEFAULT_EMBED_BLOCKS_PER_CALL blocks
    concurrency: tuple[int, int] = (1, 1)
    num_gpus: float | None = None  # None: 1 per actor when the cluster has GPUs, else 0
    num_cpus: float = 1.0
    threads: int | None = None  # torch threads per model actor; None: see pipelines.embed.embed_resources
    device: str | None = None
    dtype: str | None = None
    max_error_ratio: float = DEFAULT_MAX_ERROR_RATIO
    storage_options: dict[str, Any] = field(default_factory=dict, repr=False)
    address: str | None = None
    trust_remote_code: bool = False
    compile: bool | None = None  # torch.compile the model in each actor; None: on CUDA (H200: ~1.7-2x for the 0.6B)
    packing: str = "auto"  # padding-free varlen packing: auto (when a CUDA varlen kernel is importable), on, off
    lease_ttl: float = 60.0  # seconds without a heartbeat after which another job may take the output prefix
    lease_heartbeat: float = 10.0  # seconds between lease renewals by the driver
    retry_budget: float = 120.0  # seconds one S3 call may retry throttling / resets before the job fails

    def __post_init__(self) -> None:
        if not self.input:
            raise ConfigError("--input is required")
        if not self.output:
            raise ConfigError("--output is required")
        lo, hi = self.concurrency
        if lo < 1 or hi < lo:
            raise ConfigError(f"--concurrency must be MIN,MAX with 1 <= MIN <= MAX, got {lo},{hi}")
        if self.output_dtype not in OUTPUT_DTYPES:
            raise ConfigError(f"unknown --output-dtype {self.output_dtype!r}; choose float32 or float16")
        if self.dim is not None and self.dim < MIN_DIM:
            raise ConfigError(f"--dim must be at least {MIN_DIM}, got {self.dim}")
        if self.max_length < 2:
            raise ConfigError(f"--max-length must be at least 2, got {self.max_length}")
        if self.batch_tokens is not None and self.batch_tokens < 1:
            raise ConfigError(f"--batch-tokens must be positive, got {self.batch_tokens}")
        if self.rows_per_block < 1:
            raise ConfigError(f"--rows-per-block must be positive, got {self.rows_per_block}")
        if self.embed_batch_rows is not None and self.embed_batch_rows < 1:
            raise ConfigError(f"--embed-batch-rows must be positive, got {self.embed_batch_rows}")
        if self.num_gpus is not None and self.num_gpus < 0:
            raise ConfigError(f"--num-gpus must be >= 0, got {self.num_gpus}")
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"--threads must be positive, got {self.threads}")
        if self.packing not in ("auto", "on", "off"):
            raise ConfigError(f"--packing must be auto, on or off, got {self.packing!r}")
        if not 0 <= self.max_error_ratio <= 1:
            raise ConfigError(f"--max-error-ratio must be within 0..1, got {self.max_error_ratio}")
        if not 0 < self.lease_heartbeat < self.lease_ttl:
            raise ConfigError(
                f"--lease-heartbeat must be positive and below --lease-ttl, got {self.lease_heartbeat:g} and "
                f"{self.lease_ttl:g}"
            )
        if self.retry_budget < 0:
            raise ConfigError(f"--retry-budget must be >= 0 seconds, got {self.retry_budget:g}")
        if self.id_column == self.text_column:
            raise ConfigError("--id-column and --text-column must differ")
        if self.id_column in self.passthrough or "embedding" in self.passthrough:
            raise ConfigError("--passthrough must not repeat the id column or name 'embedding'")

    def public(self) -> dict[str, Any]:
        """The config as recorded in the manifest: no storage options (they may hold credentials)."""
        d = dataclasses.asdict(self)
        d.pop("storage_options")
        d["input"] = list(self.input)
        d["passthrough"] = list(self.passthrough)
        d["concurrency"] = list(self.concurrency)
        return d


def parse_concurrency(value: Any) -> tuple[int, int]:
    parts = [str(v) for v in value] if isinstance(value, (list, tuple)) else [p.strip() for p in str(value).split(",")]
    try:
        nums = [int(p) for p in parts]
    except ValueError:
        raise ConfigError(f"--concurrency must be N or MIN,MAX integers, got {value!r}") from None
    if len(nums) == 1:
        nums = nums * 2
    if len(nums) != 2:
        raise ConfigError(f"--concurrency must be N or MIN,MAX, got {value!r}")
    return nums[0], nums[1]


def parse_storage_options(value: Any) -> dict[str, Any]:
    if value in (None, ""):
        return {}
    if isinstance(value, dict):
        return value
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as e:
        raise ConfigError(f"--storage-options must be a JSON object: {e}") from None
    if not isinstance(parsed, dict):
        raise ConfigError("--storage-options must be a JSON object")
    return parsed


def load_job_file(path: str) -> dict[str, Any]:
    import yaml

    if not os.path.exists(path):
        raise ConfigError(f"--config {path!r} does not exist")
    with open(path) as f:
        try:
            data = yaml.safe_load(f) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"--config {path!r} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path!r} must hold a mapping of option: value")
    return {k.replace("-", "_"): v for k, v in data.items()}


def build_embed_config(values: dict[str, Any]) -> EmbedJobConfig:
    """Normalise raw values (YAML or argparse) into an EmbedJobConfig; unknown keys are an error."""
    known = {f.name for f in dataclasses.fields(EmbedJobConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"unknown option(s) {', '.join(unknown)}")
    v = dict(values)
    if isinstance(v.get("input"), str):
        v["input"] = tuple(p.strip() for p in v["input"].split(",") if p.strip())
    elif v.get("input") is not None:
        v["input"] = tuple(v["input"])
    if isinstance(v.get("passthrough"), str):
        v["passthrough"] = tuple(p.strip() for p in v["passthrough"].split(",") if p.strip())
    elif v.get("passthrough") is not None:
        v["passthrough"] = tuple(v["passthrough"])
    if "concurrency" in v:
        v["concurrency"] = parse_concurrency(v["concurrency"])
    if "storage_options" in v:
        v["storage_options"] = parse_storage_options(v["storage_options"])
    v.setdefault("input", ())
    v.setdefault("output", "")
    return EmbedJobConfig(**v)


# ------------------------------------------------------------------------------------------- rerank and search jobs

DEFAULT_RERANK_MAX_LENGTH = 8192
DEFAULT_SEARCH_K = 100
DEFAULT_QUERIES_PER_BLOCK = 64


def _common_checks(cfg: Any) -> None:
    if cfg.batch_tokens is not None and cfg.batch_tokens < 1:
        raise ConfigError(f"--batch-tokens must be positive, got {cfg.batch_tokens}")
    if cfg.num_gpus is not None and cfg.num_gpus < 0:
        raise ConfigError(f"--num-gpus must be >= 0, got {cfg.num_gpus}")
    if not 0 <= cfg.max_error_ratio <= 1:
        raise ConfigError(f"--max-error-ratio must be within 0..1, got {cfg.max_error_ratio}")


def _public(cfg: Any) -> dict[str, Any]:
    d = dataclasses.asdict(cfg)
    d.pop("storage_options")
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


@dataclass(frozen=True)
class RerankJobConfig:
    """A rerank job: (query, doc) pairs or query rows with candidate lists in, ranked Parquet shards out."""

    input: tuple[str, ...]
    output: str
    query_id_column: str = "query_id"
    query_column: str = "query"
    doc_id_column: str = "doc_id"
    doc_column: str = "doc"
    candidates_column: str = "candidates"
    model: str = "Qwen/Qwen3-Reranker-0.6B"
    revision: str | None = None
    instruction: str | None = None  # None: operators.DEFAULT_INSTRUCTION
    max_length: int = DEFAULT_RERANK_MAX_LENGTH
    batch_tokens: int | None = None
    rows_per_block: int = DEFAULT_ROWS_PER_BLOCK
    concurrency: tuple[int, int] = (1, 1)
    num_gpus: float | None = None
    num_cpus: float = 1.0
    device: str | None = None
    dtype: str | None = None
    max_error_ratio: float = DEFAULT_MAX_ERROR_RATIO
    storage_options: dict[str, Any] = field(default_factory=dict, repr=False)
    address: str | None = None
    trust_remote_code: bool = False

    def __post_init__(self) -> None:
        if not self.input:
            raise ConfigError("--input is required")
        if not self.output:
            raise ConfigError("--output is required")
        lo, hi = self.concurrency
        if lo < 1 or hi < lo:
            raise ConfigError(f"--concurrency must be MIN,MAX with 1 <= MIN <= MAX, got {lo},{hi}")
        if self.rows_per_block < 1:
            raise ConfigError(f"--rows-per-block must be positive, got {self.rows_per_block}")
        if self.max_length < 2:
            raise ConfigError(f"--max-length must be at least 2, got {self.max_length}")
        _common_checks(self)
        cols = [self.query_id_column, self.query_column, self.doc_id_column, self.doc_column, self.candidates_column]
        if len(set(cols)) != len(cols):
            raise ConfigError(f"the query id, query, doc id, doc and candidates columns must differ, got {cols}")

    def public(self) -> dict[str, Any]:
        return _public(self)


@dataclass(frozen=True)
class SearchJobConfig:
    """Retrieve-then-rerank: embed queries, exact top-k over an embed job's vectors, rerank, metrics from qrels."""

    queries: tuple[str, ...]
    vectors: str
    corpus: tuple[str, ...]
    output: str
    qrels: str | None = None
    k: int = DEFAULT_SEARCH_K
    embed_model: str | None = None  # None: the model recorded in the vectors' manifest
    rerank_model: str = "Qwen/Qwen3-Reranker-0.6B"
    revision: str | None = None  # of the embed model
    rerank_revision: str | None = None
    instruction: str | None = None  # query instruction of the embedder; None: operators.DEFAULT_INSTRUCTION
    rerank_instruction: str | None = None  # None: operators.DEFAULT_INSTRUCTION
    max_length: int | None = None  # query tokens; None: the vectors' manifest value
    rerank_max_length: int = DEFAULT_RERANK_MAX_LENGTH
    query_id_column: str = "_id"
    query_text_column: str = "text"
    corpus_id_column: str = "_id"
    corpus_title_column: str = "title"
    corpus_text_column: str = "text"
    queries_per_block: int = DEFAULT_QUERIES_PER_BLOCK
    retrieval_tasks: int | None = None  # None: 2 per cluster CPU, at most one per vector file
    batch_tokens: int | None = None
    concurrency: int = 1
    num_gpus: float | None = None
    num_cpus: float = 1.0
    device: str | None = None
    dtype: str | None = None
    max_error_ratio: float = DEFAULT_MAX_ERROR_RATIO
    storage_options: dict[str, Any] = field(default_factory=dict, repr=False)
    address: str | None = None
    trust_remote_code: bool = False

    def __post_init__(self) -> None:
        for name in ("queries", "vectors", "corpus", "output"):
            if not getattr(self, name):
                raise ConfigError(f"--{name} is required")
        if self.k < 1:
            raise ConfigError(f"--k must be at least 1, got {self.k}")
        if self.concurrency < 1:
            raise ConfigError(f"--concurrency must be a positive number of actors, got {self.concurrency}")
        if self.queries_per_block < 1:
            raise ConfigError(f"--queries-per-block must be positive, got {self.queries_per_block}")
        if self.retrieval_tasks is not None and self.retrieval_tasks < 1:
            raise ConfigError(f"--retrieval-tasks must be positive, got {self.retrieval_tasks}")
        if self.max_length is not None and self.max_length < 2:
            raise ConfigError(f"--max-length must be at least 2, got {self.max_length}")
        if self.rerank_max_length < 2:
            raise ConfigError(f"--rerank-max-length must be at least 2, got {self.rerank_max_length}")
        _common_checks(self)

    def public(self) -> dict[str, Any]:
        return _public(self)


def _split_list(v: dict[str, Any], key: str) -> None:
    if isinstance(v.get(key), str):
        v[key] = tuple(p.strip() for p in v[key].split(",") if p.strip())
    elif v.get(key) is not None:
        v[key] = tuple(v[key])


def _check_known(cls: type, values: dict[str, Any]) -> dict[str, Any]:
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"unknown option(s) {', '.join(unknown)}")
    return dict(values)


def build_rerank_config(values: dict[str, Any]) -> RerankJobConfig:
    """Normalise raw values (YAML or argparse) into a RerankJobConfig; unknown keys are an error."""
    v = _check_known(RerankJobConfig, values)
    _split_list(v, "input")
    if "concurrency" in v:
        v["concurrency"] = parse_concurrency(v["concurrency"])
    if "storage_options" in v:
        v["storage_options"] = parse_storage_options(v["storage_options"])
    v.setdefault("input", ())
    v.setdefault("output", "")
    return RerankJobConfig(**v)


def build_search_config(values: dict[str, Any]) -> SearchJobConfig:
    """Normalise raw values (YAML or argparse) into a SearchJobConfig; unknown keys are an error."""
    v = _check_known(SearchJobConfig, values)
    _split_list(v, "queries")
    _split_list(v, "corpus")
    for key in ("k", "concurrency", "queries_per_block", "retrieval_tasks", "max_length", "rerank_max_length"):
        if v.get(key) is not None and not isinstance(v[key], int):
            try:
                v[key] = int(v[key])
            except (TypeError, ValueError):
                raise ConfigError(f"--{key.replace('_', '-')} must be an integer, got {v[key]!r}") from None
    if "storage_options" in v:
        v["storage_options"] = parse_storage_options(v["storage_options"])
    for key in ("queries", "corpus"):
        v.setdefault(key, ())
    v.setdefault("vectors", "")
    v.setdefault("output", "")
    return SearchJobConfig(**v)
