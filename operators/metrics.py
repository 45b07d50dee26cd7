"""Retrieval metrics as BEIR reports them (through pytrec_eval / trec_eval), and qrels parsing.

Definitions, for one query with judgements ``qrels[qid] = {doc_id: relevance}`` and a ranked list of doc ids:

- relevant: judged with relevance > 0. Unjudged docs and relevance <= 0 count as non-relevant (gain 0).
- nDCG@k: DCG@k / IDCG@k, DCG@k = sum over ranks i = 1..k of gain(doc_i) / log2(i + 1), with the *linear* gain
  gain = relevance, as trec_eval's ``ndcg_cut`` (what BEIR uses) computes it; not the ``2^rel - 1`` gain of some other
  libraries. IDCG@k is the DCG@k of the judged relevance levels sorted descending. 0 when the query has no
  relevant doc.
- Recall@k: relevant docs within the first k / all relevant docs of the query (judged relevant docs that are missing
  from the corpus stay in the denominator, as in trec_eval).
- MRR@k: 1 / rank of the first relevant doc within the first k, else 0.

The ranked list is evaluated in the order given (trec_eval would re-sort by score and break ties by doc id
descending; rayembed's lists already have a total order: score descending, then id ascending). A metric's value
for a run is the mean over the evaluated queries: those present in the run that have at least one relevant judgement.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from operators.errors import ConfigError

Qrels = dict[str, dict[str, int]]
DEFAULT_METRICS = (("ndcg", 10), ("recall", 100), ("mrr", 10))


def _gain(rel: Any) -> float:
    return float(rel) if rel is not None and rel > 0 else 0.0


def dcg_at_k(ranked: Sequence[str], judgements: Mapping[str, int], k: int) -> float:
    return sum(_gain(judgements.get(d)) / math.log2(i + 2) for i, d in enumerate(list(ranked)[:k]))


def ndcg_at_k(ranked: Sequence[str], judgements: Mapping[str, int], k: int) -> float:
    ideal = sorted((_gain(r) for r in judgements.values()), reverse=True)[:k]
    idcg = sum(g / math.log2(i + 2) for i, g in enumerate(ideal))
    return dcg_at_k(ranked, judgements, k) / idcg if idcg > 0 else 0.0


def recall_at_k(ranked: Sequence[str], judgements: Mapping[str, int], k: int) -> float:
    relevant = {d for d, r in judgements.items() if _gain(r) > 0}
    if not relevant:
        return 0.0
    return len(relevant.intersection(list(ranked)[:k])) / len(relevant)


def mrr_at_k(ranked: Sequence[str], judgements: Mapping[str, int], k: int) -> float:
    for i, d in enumerate(list(ranked)[:k]):
        if _gain(judgements.get(d)) > 0:
            return 1.0 / (i + 1)
    return 0.0


METRICS = {"ndcg": ndcg_at_k, "recall": recall_at_k, "mrr": mrr_at_k}


def metric_name(name: str, k: int) -> str:
    return {"ndcg": "nDCG", "recall": "Recall", "mrr": "MRR"}[name] + f"@{k}"


def evaluate(
    run: Mapping[str, Sequence[str]], qrels: Qrels, metrics: Iterable[tuple[str, int]] = DEFAULT_METRICS
) -> dict[str, Any]:
    """Mean of each metric over the evaluated queries (in the run, with a relevant judgement), plus their count."""
    metrics = list(metrics)
    for name, k in metrics:
        if name not in METRICS or k < 1:
            raise ConfigError(f"unknown metric {name}@{k}; choose ndcg, recall or mrr with k >= 1")
    evaluated = sorted(q for q in run if any(_gain(r) > 0 for r in qrels.get(q, {}).values()))
    out: dict[str, Any] = {}
    for name, k in metrics:
        values = [METRICS[name](run[q], qrels[q], k) for q in evaluated]
        out[metric_name(name, k)] = sum(values) / len(values) if values else 0.0
    out["queries"] = len(evaluated)
    return out


# ------------------------------------------------------------------------------------------------------------ qrels


@dataclass
class QrelsCoverage:
    """How the judgements relate to the query set and the corpus; unknown ids are counted, never fatal."""

    judgements: int = 0
    queries: int = 0
    unknown_query_ids: int = 0  # distinct qrels query ids not among the queries
    unknown_query_judgements: int = 0
    unknown_doc_ids: int = 0  # distinct qrels doc ids not in the corpus
    unknown_doc_judgements: int = 0
    examples: dict[str, list[str]] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    def line(self) -> str:
        return (
            f"qrels: {self.judgements} judgements for {self.queries} queries; "
            f"{self.unknown_query_judgements} reference {self.unknown_query_ids} unknown query ids (ignored), "
            f"{self.unknown_doc_judgements} reference {self.unknown_doc_ids} doc ids not in the corpus "
            "(kept: they count as relevant docs never retrieved)"
        )


def qrels_coverage(qrels: Qrels, query_ids: Iterable[str], doc_ids: Iterable[str], examples: int = 5) -> QrelsCoverage:
    queries, docs = set(query_ids), set(doc_ids)
    cov = QrelsCoverage(judgements=sum(len(j) for j in qrels.values()), queries=len(qrels))
    bad_q = sorted(q for q in qrels if q not in queries)
    cov.unknown_query_ids = len(bad_q)
    cov.unknown_query_judgements = sum(len(qrels[q]) for q in bad_q)
    bad_d: set[str] = set()
    for j in qrels.values():
        for d in j:
            if d not in docs:
                bad_d.add(d)
                cov.unknown_doc_judgements += 1
    cov.unknown_doc_ids = len(bad_d)
    cov.examples = {"query_ids": bad_q[:examples], "doc_ids": sorted(bad_d)[:examples]}
    return cov


def parse_qrels(text: str, source: str = "qrels") -> Qrels:
    """BEIR's TSV (``query-id  corpus-id  score`` with a header line) or TREC's ``qid iter docid rel`` (no header).

    Columns are split on tabs or spaces; blank lines are skipped; a first line whose relevance is not an integer is
    the header. A repeated (query, doc) pair keeps its last relevance, as pytrec_eval does.
    """
    qrels: Qrels = {}
    for n, raw in enumerate(text.splitlines(), start=1):
        parts = raw.split()
        if not parts:
            continue
        if len(parts) not in (3, 4):
            raise ConfigError(
                f"{source} line {n}: expected 'query-id corpus-id score' (BEIR) or 'qid iter docid rel' (TREC), "
                f"got {len(parts)} columns"
            )
        qid, did, rel = (parts[0], parts[1], parts[2]) if len(parts) == 3 else (parts[0], parts[2], parts[3])
        try:
            value = int(rel)
        except ValueError:
            try:
                value = int(float(rel))
            except ValueError:
                if not qrels and n == _first_line(text):
                    continue  # the header
                raise ConfigError(f"{source} line {n}: relevance {rel!r} is not an integer") from None
        qrels.setdefault(qid, {})[did] = value
    return qrels


def _first_line(text: str) -> int:
    for n, raw in enumerate(text.splitlines(), start=1):
        if raw.strip():
            return n
    return 0


__all__ = [
    "DEFAULT_METRICS",
    "QrelsCoverage",
    "evaluate",
    "metric_name",
    "mrr_at_k",
    "ndcg_at_k",
    "parse_qrels",
    "qrels_coverage",
    "recall_at_k",
]
