"""S3 with a retry budget: every S3 call retries throttling (503 SlowDown, 5xx) and reset connections with
exponential backoff and full jitter, then fails with one line naming the call and the cause.

Split from storage.py so that importing storage (for ``rayembed status`` or ``--help``) does not import s3fs and
botocore: fsspec imports this module only when an ``s3://`` URL is opened.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import random
import time
from typing import Any

import s3fs
from fsspec.asyn import sync_wrapper
from s3fs.core import translate_boto_error

from operators.storage import (
    CONNECT_RETRIES,
    DEFAULT_RETRY_BUDGET,
    StorageError,
    count_retry,
    describe_error,
)

_THROTTLE_CODES = {
    "SlowDown",
    "Throttling",
    "ThrottlingException",
    "RequestLimitExceeded",
    "TooManyRequests",
    "ServiceUnavailable",
    "InternalError",
    "RequestTimeout",
    "RequestTimeTooSkewed",
}


def _retry_kind(e: BaseException) -> str | None:
    """The cause to name when ``e`` is transient (throttling, 5xx, a reset connection), else None."""
    from botocore.exceptions import ClientError, EndpointConnectionError, HTTPClientError
    from botocore.parsers import ResponseParserError

    if isinstance(e, ClientError):
        err = e.response.get("Error", {}) or {}
        code = str(err.get("Code", ""))
        status = int((e.response.get("ResponseMetadata", {}) or {}).get("HTTPStatusCode") or 0)
        if code in _THROTTLE_CODES or status in (500, 502, 503, 504):
            return f"{code or status} (HTTP {status})" if status else code
        return None
    if isinstance(e, EndpointConnectionError):
        # "Could not connect" covers a refused connection (wrong endpoint: fail fast) and a reset one (retry).
        cause = str(getattr(e, "kwargs", {}).get("error", "")).lower()
        return "connection error (reset)" if "reset" in cause or "disconnect" in cause else "connect"
    transient = (HTTPClientError, ResponseParserError, ConnectionError, TimeoutError, http.client.IncompleteRead)
    if isinstance(e, transient):
        return f"connection error ({type(e).__name__})"
    mod = type(e).__module__ or ""
    if mod.startswith("aiohttp") and type(e).__name__ in (
        "ServerDisconnectedError",
        "ClientOSError",
        "ClientPayloadError",
        "ServerTimeoutError",
    ):
        return f"connection error ({type(e).__name__})"
    return None


class RetryingS3FileSystem(s3fs.S3FileSystem):
    """s3fs whose every S3 call retries throttling (503 SlowDown, 5xx) and reset connections with exponential
    backoff and full jitter until ``retry_budget`` seconds have passed since the call's first failure; then it
    raises a StorageError that names the cause. Retries are counted per process (``take_retries``)."""

    def __init__(self, *args: Any, retry_budget: float = DEFAULT_RETRY_BUDGET, **kwargs: Any):
        self.retry_budget = float(retry_budget)
        super().__init__(*args, **kwargs)

    async def _call_s3(self, method, *akwarglist, **kwargs):
        await self.set_session()
        s3 = await self.get_s3(kwargs.get("Bucket"))
        fn = getattr(s3, method)
        call_kwargs = self._get_s3_method_kwargs(fn, *akwarglist, **kwargs)
        deadline, attempt = None, 0
        while True:
            try:
                return await fn(**call_kwargs)
            except Exception as e:
                kind = _retry_kind(e)
                if kind is None or (kind == "connect" and attempt + 1 >= CONNECT_RETRIES):
                    raise translate_boto_error(e) from e
                now = time.monotonic()
                deadline = deadline if deadline is not None else now + self.retry_budget
                if now >= deadline:
                    where = f"{kwargs.get('Bucket', '')}/{kwargs.get('Key', '')}".rstrip("/")
                    raise StorageError(
                        f"S3 {method} {where} still failing after {attempt} retries within the "
                        f"{self.retry_budget:g}s retry budget (--retry-budget): {kind}: {describe_error(e)}"
                    ) from None
                attempt += 1
                count_retry(kind)
                # Full jitter: uniform in [0, min(cap, base * 2**attempt)], never past the deadline.
                delay = random.uniform(0, min(5.0, 0.05 * 2**attempt))
                await asyncio.sleep(max(0.0, min(delay, deadline - now)))

    call_s3 = sync_wrapper(_call_s3)  # the base class binds its own _call_s3 here (S3File uses it)

    def abort_uploads(self, path: str) -> int:
        """Abort every unfinished multipart upload under ``path`` (bucket/key prefix); returns how many."""
        bucket, _, key = path.partition("/")
        key = key.rstrip("/") + "/"
        n, markers = 0, {}
        while True:
            resp = self.call_s3("list_multipart_uploads", Bucket=bucket, Prefix=key, **markers)
            for up in resp.get("Uploads", []) or []:
                with contextlib.suppress(Exception):
                    self.call_s3("abort_multipart_upload", Bucket=bucket, Key=up["Key"], UploadId=up["UploadId"])
                    n += 1
            if not resp.get("IsTruncated"):
                return n
            markers = {"KeyMarker": resp["NextKeyMarker"], "UploadIdMarker": resp["NextUploadIdMarker"]}
