"""Arrow to PostgreSQL: column types (as ``format_type`` spells them, so an existing table compares as text), the
binary COPY type of each column, and the Python values psycopg's binary dumpers take, one record batch at a time.

The embedding goes out as pgvector's binary wire format, encoded for the whole batch with numpy: ``int16 dim``,
``int16 0``, then ``dim`` big-endian float32 (``vector``) or float16 (``halfvec``) values.
"""

from __future__ import annotations

import decimal
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from pipelines.sync.base import SyncError, castable


@dataclass(frozen=True)
class PgColumn:
    name: str
    pg_type: str  # as format_type() prints it: "bigint", "text", "vector(256)", "numeric(20,0)" ...
    copy_type: str  # the type name for Copy.set_types: "int8", "text", "vector" ...
    values: Callable[[pa.Array], list[Any]]  # the batch's column as Python values for the binary dumper


def _pylist(array: pa.Array) -> list[Any]:
    return array.to_pylist()


def _decimal(array: pa.Array) -> list[Any]:
    return [None if v is None else decimal.Decimal(v) for v in array.to_pylist()]


def _micros(array: pa.Array) -> list[Any]:
    # PostgreSQL keeps microseconds; nanosecond timestamps would come back as pandas objects the dumper rejects.
    unit_type = pa.timestamp("us", array.type.tz) if pa.types.is_timestamp(array.type) else pa.time64("us")
    return array.cast(unit_type, safe=False).to_pylist()


def _json(array: pa.Array) -> list[Any]:
    from psycopg.types.json import Jsonb

    def dumps(obj: Any) -> str:
        return json.dumps(obj, default=str, separators=(",", ":"))

    return [None if v is None else Jsonb(v, dumps=dumps) for v in array.to_pylist()]


# arrow type predicate -> (format_type spelling, COPY type, converter)
_SCALARS: list[tuple[Callable[[pa.DataType], bool], str, str, Callable[[pa.Array], list[Any]]]] = [
    (pa.types.is_boolean, "boolean", "bool", _pylist),
    (lambda t: t in (pa.int8(), pa.int16(), pa.uint8()), "smallint", "int2", _pylist),
    (lambda t: t in (pa.int32(), pa.uint16()), "integer", "int4", _pylist),
    (lambda t: t in (pa.int64(), pa.uint32()), "bigint", "int8", _pylist),
    (lambda t: t == pa.uint64(), "numeric(20,0)", "numeric", _decimal),
    (lambda t: t in (pa.float16(), pa.float32()), "real", "float4", _pylist),
    (lambda t: t == pa.float64(), "double precision", "float8", _pylist),
    (lambda t: pa.types.is_string(t) or pa.types.is_large_string(t), "text", "text", _pylist),
    (
        lambda t: pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_fixed_size_binary(t),
        "bytea",
        "bytea",
        _pylist,
    ),
    (pa.types.is_date, "date", "date", _pylist),
    (lambda t: pa.types.is_timestamp(t) and t.tz is not None, "timestamp with time zone", "timestamptz", _micros),
    (lambda t: pa.types.is_timestamp(t) and t.tz is None, "timestamp without time zone", "timestamp", _micros),
    (lambda t: pa.types.is_time(t), "time without time zone", "time", _micros),
    (pa.types.is_duration, "interval", "interval", _pylist),
    (
        lambda t: (
            pa.types.is_list(t)
            or pa.types.is_large_list(t)
            or pa.types.is_fixed_size_list(t)
            or pa.types.is_struct(t)
            or pa.types.is_map(t)
        ),
        "jsonb",
        "jsonb",
        _json,
    ),
]


def column_for(field: pa.Field) -> PgColumn:
    """The PostgreSQL column of a pass-through (or id / content_hash) field; SyncError for a type with no mapping."""
    t = field.type
    if pa.types.is_dictionary(t):
        t = t.value_type
    if pa.types.is_decimal(t):
        return PgColumn(field.name, f"numeric({t.precision},{t.scale})", "numeric", _pylist)
    for matches, pg_type, copy_type, values in _SCALARS:
        if matches(t):
            if field.type != t:  # dictionary-encoded: decode first
                return PgColumn(field.name, pg_type, copy_type, lambda a, v=values, t=t: v(a.cast(t)))
            return PgColumn(field.name, pg_type, copy_type, values)
    raise SyncError(f"column {field.name!r} has type {field.type}, which has no PostgreSQL mapping in rayembed sync")


# format_type spellings -> the Arrow type whose values COPY sends as that type
_ARROW_OF = {
    "smallint": pa.int16(),
    "integer": pa.int32(),
    "bigint": pa.int64(),
    "real": pa.float32(),
    "double precision": pa.float64(),
}


def conformed(schema: pa.Schema, table_types: dict[str, str]) -> pa.Schema:
    """``schema`` with a numeric column retyped to the existing table's, where a safe cast takes its values there
    (int64 into integer, int32 into bigint, float64 of whole numbers into bigint, ...). Other kinds map to one
    PostgreSQL type whatever their width (string and large_string are text), so they need nothing here."""
    fields = []
    for f in schema:
        want = _ARROW_OF.get(table_types.get(f.name, ""))
        if want is not None and f.name != "embedding" and want != f.type and castable(f.type, want):
            f = pa.field(f.name, want, f.nullable)
        fields.append(f)
    return pa.schema(fields)


def vector_bytes(array: pa.Array, dim: int, half: bool) -> list[bytes | None]:
    """pgvector's binary input for each row of a fixed_size_list embedding column."""
    n = len(array)
    values = array.flatten() if array.null_count == 0 else array.fill_null([0.0] * dim).flatten()
    mat = np.asarray(values.to_numpy(zero_copy_only=False)).reshape(n, dim)
    elem = ">f2" if half else ">f4"
    rows = np.empty(n, dtype=[("dim", ">i2"), ("unused", ">i2"), ("v", elem, (dim,))])
    rows["dim"], rows["unused"], rows["v"] = dim, 0, mat
    buf, step = rows.tobytes(), rows.dtype.itemsize
    out: list[bytes | None] = [buf[i * step : (i + 1) * step] for i in range(n)]
    if array.null_count:
        for i in np.flatnonzero(array.is_null().to_numpy(zero_copy_only=False)):
            out[i] = None
    return out


def vector_dumper(oid: int) -> type:
    """A binary dumper that sends bytes already in pgvector's wire format, looked up by the type's oid in COPY."""
    from psycopg.adapt import Dumper
    from psycopg.pq import Format

    class VectorBytesDumper(Dumper):
        format = Format.BINARY

        def dump(self, obj: Any) -> bytes:
            return obj

    VectorBytesDumper.oid = oid
    return VectorBytesDumper


def columns_for(schema: pa.Schema, vec_type: str) -> list[PgColumn]:
    """Every column of the output's rows, the embedding as ``vec_type`` ("vector" or "halfvec")."""
    dim = schema.field("embedding").type.list_size
    half = vec_type == "halfvec"
    cols = []
    for f in schema:
        if f.name == "embedding":
            cols.append(PgColumn(f.name, f"{vec_type}({dim})", vec_type, lambda a: vector_bytes(a, dim, half)))
        else:
            cols.append(column_for(f))
    if cols[[c.name for c in cols].index("id")].pg_type in ("jsonb", "real", "double precision", "boolean"):
        raise SyncError(f"the id column's type {schema.field('id').type} cannot be a PostgreSQL primary key here")
    return cols


def rows(batch: pa.RecordBatch, cols: list[PgColumn]) -> Any:
    """The batch as row tuples for ``Copy.write_row``, converted column by column."""
    return zip(*(c.values(batch.column(c.name)) for c in cols))
