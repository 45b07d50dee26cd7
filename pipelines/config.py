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
    concurrency: tuple[int, int] = (1, 1)
    num_gpus: float | None = None  # None: 1 per actor when the cluster has GPUs, else 0
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
        if self.num_gpus is not None and self.num_gpus < 0:
            raise ConfigError(f"--num-gpus must be >= 0, got {self.num_gpus}")
        if not 0 <= self.max_error_ratio <= 1:
            raise ConfigError(f"--max-error-ratio must be within 0..1, got {self.max_error_ratio}")
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
