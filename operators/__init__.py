"""Building blocks that work on one batch and need no running Ray: loading, tokenization, models, storage."""

from operators.errors import RayembedError

__version__ = "0.1.0"
DEFAULT_EMBED_MODEL = "Qwen/Qwen3-Embedding-0.6B"
DEFAULT_INSTRUCTION = "Given a web search query, retrieve relevant passages that answer the query"
DEFAULT_RERANK_MODEL = "Qwen/Qwen3-Reranker-0.6B"
MIN_DIM = 32  # the smallest MRL dimension Qwen3-Embedding supports
OUTPUT_DTYPE_NAMES = ("float32", "float16")
MODEL_IMPLS = ("auto", "native", "transformers")  # how a Qwen3 model runs: operators.loading.native_blocker

__all__ = [
    "DEFAULT_EMBED_MODEL",
    "DEFAULT_INSTRUCTION",
    "DEFAULT_RERANK_MODEL",
    "MIN_DIM",
    "MODEL_IMPLS",
    "OUTPUT_DTYPE_NAMES",
    "RayembedError",
    "__version__",
]
