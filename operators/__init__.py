"""Building blocks that work on one batch and need no running Ray: loading, tokenization, models, storage."""

from operators.errors import RayembedError

__version__ = "0.1.0"
DEFAULT_EMBED_MODEL = "Qwen/Qwen3-Embedding-0.6B"
DEFAULT_INSTRUCTION = "Given a web search query, retrieve relevant passages that answer the query"

__all__ = ["DEFAULT_EMBED_MODEL", "DEFAULT_INSTRUCTION", "RayembedError", "__version__"]
