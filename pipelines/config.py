"""Job configuration: frozen dataclasses built from a YAML job file and/or CLI flags (flags win).

``JobConfig`` declares what every job shares (output, actors, devices, errors, storage, lease, Ray) once; each job
adds its own fields. Every default lives here, in the field; the CLI builds its flags from these fields.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any

from operators import DEFAULT_EMBED_MODEL, DEFAULT_RERANK_MODEL, MIN_DIM, MODEL_IMPLS, OUTPUT_DTYPE_NAMES
from operators.errors import ConfigError
from operators.location import Location
from operators.tokenization import DEFAULT_MAX_LENGTH, DEFAULT_RERANK_MAX_LENGTH
from pipelines.lease import DEFAULT_LEASE_HEARTBEAT, DEFAULT_LEASE_TTL

DEFAULT_ROWS_PER_BLOCK = 1024
DEFAULT_MAX_ERROR_RATIO = 0.01
DEFAULT_MAX_DELETE_RATIO = 0.5  # a refresh may delete at most half of the previous version's rows
DEFAULT_SEARCH_K = 100
DEFAULT_QUERIES_PER_BLOCK = 64
# Read blocks per model-actor call: the model stage's Ray Data batch size is this many times --rows-per-block (unless
# --embed-batch-rows sets it), by whether the actor holds a GPU. The actor sorts a call's rows by length before it cuts
# micro-batches, so a larger window pads less. Simulated on a long-tail mix (lognormal lengths, median 150 tokens,
# sigma 1, cap 4,096), real tokens per computed token: at the GPU budget (65,536 tokens) 0.68 with 1,024-row windows,
# 0.88 with 4,096 and 0.96 with 16,384; at the CPU budget (8,192) 0.94, 0.98 and 0.995. A larger window also delays
# the first call (it waits for that many tokenized rows) and loses more work when an actor dies.
DEFAULT_EMBED_BLOCKS_PER_CALL = {"cpu": 4, "gpu": 16}
# Output parts of about this many bytes of vectors (query engines and vector-store bulk loaders want files of 100 MB
# to 1 GB): --part-rows is derived from it, the dimension and the output dtype (32,513 rows at 1,024 x float32).
DEFAULT_PART_BYTES = 128 * 2**20
PART_ROW_OVERHEAD = 32  # bytes per row besides the vector: the content hash and a typical id


@dataclass(frozen=True, kw_only=True)
class JobConfig:
    """What every job shares. ``storage_options`` never reaches logs, manifests or file metadata."""

    output: str = ""
    batch_tokens: int | None = None
    concurrency: tuple[int, int] = (1, 1)
    num_gpus: float | None = None  # None: 1 per actor when the cluster has GPUs, else 0
    num_cpus: float = 1.0
    threads: int | None = None  # torch threads per model actor; None: pipelines.runtime.actor_threads
    device: str | None = None
    dtype: str | None = None
    max_error_ratio: float = DEFAULT_MAX_ERROR_RATIO
    storage_options: dict[str, Any] = field(default_factory=dict, repr=False)
    address: str | None = None
    trust_remote_code: bool = False
    model_impl: str = "auto"  # auto: native Qwen3 decoder (operators/qwen3.py) where it applies; native; transformers
    lease_ttl: float = DEFAULT_LEASE_TTL  # seconds without a heartbeat after which another job may take the output
    lease_heartbeat: float = DEFAULT_LEASE_HEARTBEAT  # seconds between lease renewals by the driver
    retry_budget: float = 120.0  # seconds one S3 call may retry throttling / resets before the job fails

    def __post_init__(self) -> None:
        if not self.output:
            raise ConfigError("--output is required")
        lo, hi = self.concurrency
        if lo < 1 or hi < lo:
            raise ConfigError(f"--concurrency must be MIN,MAX with 1 <= MIN <= MAX, got {lo},{hi}")
        _positive(self, "batch_tokens", "threads")
        if self.num_gpus is not None and self.num_gpus < 0:
            raise ConfigError(f"--num-gpus must be >= 0, got {self.num_gpus}")
        if not 0 <= self.max_error_ratio <= 1:
            raise ConfigError(f"--max-error-ratio must be within 0..1, got {self.max_error_ratio}")
        if not 0 < self.lease_heartbeat < self.lease_ttl:
            raise ConfigError(
                f"--lease-heartbeat must be positive and below --lease-ttl, got {self.lease_heartbeat:g} and "
                f"{self.lease_ttl:g}"
            )
        if self.model_impl not in MODEL_IMPLS:
            raise ConfigError(f"--model-impl must be one of {', '.join(MODEL_IMPLS)}, got {self.model_impl!r}")
        if self.retry_budget < 0:
            raise ConfigError(f"--retry-budget must be >= 0 seconds, got {self.retry_budget:g}")

    @property
    def options(self) -> dict[str, Any]:
        """fsspec options for every storage call of the job: the user's, plus the S3 retry budget."""
        return {"retry_budget": self.retry_budget, **self.storage_options}

    def location(self, url: str | None = None) -> Location:
        return Location(url or self.output, self.options)

    def public(self) -> dict[str, Any]:
        """The config as recorded in the manifest: no storage options (they may hold credentials)."""
        d = dataclasses.asdict(self)
        d.pop("storage_options")
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def _positive(cfg: Any, *names: str) -> None:
    for name in names:
        value = getattr(cfg, name)
        if value is not None and value < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be positive, got {value}")


@dataclass(frozen=True, kw_only=True)
class EmbedJobConfig(JobConfig):
    input: tuple[str, ...] = ()
    id_column: str = "id"
    text_column: str = "text"
    passthrough: tuple[str, ...] = ()
    model: str = DEFAULT_EMBED_MODEL
    revision: str | None = None
    dim: int | None = None
    instruction: str | None = None
    max_length: int = DEFAULT_MAX_LENGTH
    output_dtype: str = "float32"
    rows_per_block: int = DEFAULT_ROWS_PER_BLOCK
    embed_batch_rows: int | None = None  # rows per model-actor call; None: DEFAULT_EMBED_BLOCKS_PER_CALL blocks
    part_rows: int | None = None  # rows per output part; None: about DEFAULT_PART_BYTES of vectors
    compile: bool | None = None  # torch.compile the model in each actor; None: on CUDA (H200: ~1.7-2x for the 0.6B)
    packing: str = "auto"  # padding-free varlen packing: auto (when a CUDA varlen kernel is importable), on, off
    max_delete_ratio: float = DEFAULT_MAX_DELETE_RATIO  # a refresh deleting more of its parent's rows fails
    match_buckets: int | None = None  # buckets of the refresh's match shuffle; None: about 256 MB of key rows each

    def __post_init__(self) -> None:
        if not self.input:
            raise ConfigError("--input is required")
        super().__post_init__()
        if self.output_dtype not in OUTPUT_DTYPE_NAMES:
            raise ConfigError(f"unknown --output-dtype {self.output_dtype!r}; choose float32 or float16")
        if self.dim is not None and self.dim < MIN_DIM:
            raise ConfigError(f"--dim must be at least {MIN_DIM}, got {self.dim}")
        if self.max_length < 2:
            raise ConfigError(f"--max-length must be at least 2, got {self.max_length}")
        _positive(self, "rows_per_block", "embed_batch_rows", "part_rows", "match_buckets")
        if not 0 <= self.max_delete_ratio <= 1:
            raise ConfigError(f"--max-delete-ratio must be within 0..1, got {self.max_delete_ratio}")
        if self.packing not in ("auto", "on", "off"):
            raise ConfigError(f"--packing must be auto, on or off, got {self.packing!r}")
        if self.id_column == self.text_column:
            raise ConfigError("--id-column and --text-column must differ")
        if self.id_column in self.passthrough or "embedding" in self.passthrough:
            raise ConfigError("--passthrough must not repeat the id column or name 'embedding'")


@dataclass(frozen=True, kw_only=True)
class RerankJobConfig(JobConfig):
    """A rerank job: (query, doc) pairs or query rows with candidate lists in, ranked Parquet shards out."""

    input: tuple[str, ...] = ()
    query_id_column: str = "query_id"
    query_column: str = "query"
    doc_id_column: str = "doc_id"
    doc_column: str = "doc"
    candidates_column: str = "candidates"
    model: str = DEFAULT_RERANK_MODEL
    revision: str | None = None
    instruction: str | None = None  # None: operators.DEFAULT_INSTRUCTION
    max_length: int = DEFAULT_RERANK_MAX_LENGTH
    rows_per_block: int = DEFAULT_ROWS_PER_BLOCK

    def __post_init__(self) -> None:
        if not self.input:
            raise ConfigError("--input is required")
        super().__post_init__()
        _positive(self, "rows_per_block")
        if self.max_length < 2:
            raise ConfigError(f"--max-length must be at least 2, got {self.max_length}")
        cols = [self.query_id_column, self.query_column, self.doc_id_column, self.doc_column, self.candidates_column]
        if len(set(cols)) != len(cols):
            raise ConfigError(f"the query id, query, doc id, doc and candidates columns must differ, got {cols}")


@dataclass(frozen=True, kw_only=True)
class SearchJobConfig(JobConfig):
    """Retrieve-then-rerank: embed queries, exact top-k over an embed job's vectors, rerank, metrics from qrels."""

    queries: tuple[str, ...] = ()
    vectors: str = ""
    corpus: tuple[str, ...] = ()
    qrels: str | None = None
    k: int = DEFAULT_SEARCH_K
    embed_model: str | None = None  # None: the model recorded in the vectors' manifest
    rerank_model: str = DEFAULT_RERANK_MODEL
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

    def __post_init__(self) -> None:
        for name in ("queries", "vectors", "corpus"):
            if not getattr(self, name):
                raise ConfigError(f"--{name} is required")
        super().__post_init__()
        if self.k < 1:
            raise ConfigError(f"--k must be at least 1, got {self.k}")
        _positive(self, "queries_per_block", "retrieval_tasks")
        if self.max_length is not None and self.max_length < 2:
            raise ConfigError(f"--max-length must be at least 2, got {self.max_length}")
        if self.rerank_max_length < 2:
            raise ConfigError(f"--rerank-max-length must be at least 2, got {self.rerank_max_length}")


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


def _coerce(name: str, kind: str, value: Any) -> Any:
    """A raw value (a YAML scalar or list, an argparse string) as the field's type."""
    if value is None:
        return None
    if kind == "tuple[str, ...]":
        items = value.split(",") if isinstance(value, str) else value
        return tuple(str(p).strip() for p in items if str(p).strip())
    if kind == "tuple[int, int]":
        return parse_concurrency(value)
    if kind == "dict[str, Any]":
        return parse_storage_options(value)
    for prefix, cast in (("int", int), ("float", float)):
        if kind.startswith(prefix) and not isinstance(value, bool):
            try:
                return cast(value)
            except (TypeError, ValueError):
                raise ConfigError(f"--{name.replace('_', '-')} must be a number, got {value!r}") from None
    return value


def build_config(cls: type[JobConfig], values: dict[str, Any]) -> Any:
    """Normalise raw values (YAML or argparse) into ``cls``; unknown keys are an error."""
    fields = {f.name: str(f.type) for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(f"unknown option(s) {', '.join(unknown)}")
    return cls(**{k: _coerce(k, fields[k], v) for k, v in values.items()})


def build_embed_config(values: dict[str, Any]) -> EmbedJobConfig:
    return build_config(EmbedJobConfig, values)


def build_rerank_config(values: dict[str, Any]) -> RerankJobConfig:
    return build_config(RerankJobConfig, values)


def build_search_config(values: dict[str, Any]) -> SearchJobConfig:
    return build_config(SearchJobConfig, values)
