"""What a search returns: `Hit` (one stored row that matched, with its score and rank) and `QueryResult` (a
query's hits and how they were found); `hits()` turns global rows and scores into hits, reading the winners'
metadata only."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

import numpy as np

from pipelines.store.reader import Snapshot
from pipelines.store.schema import CAPTION_COLUMNS, GEO_META_COLUMNS


@dataclass
class Hit:
    rank: int
    score: float
    key: str
    source: str
    split: str | None = None
    class_name: str | None = None
    lat: float | None = None
    lon: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    # The footprint (WKB), read only when a query asks for it (`--geojson`); never part of the JSON.
    geometry: bytes | None = field(default=None, repr=False)

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("geometry")
        out["class"] = out.pop("class_name")
        extra = out.pop("extra")
        out.update(extra)
        return out

    def feature(self) -> dict[str, Any]:
        """What `pipelines.geo.geojson.feature_collection` takes: the JSON fields plus the footprint."""
        return {**self.to_json(), "geometry": self.geometry}

    @classmethod
    def from_record(cls, rank: int, score: float, rec: dict[str, Any]) -> Hit:
        """A hit from one stored row's metadata (the store's column names -> the hit's fields)."""
        return cls(
            rank=rank,
            score=float(score),
            key=rec["key"],
            source=rec["source"],
            split=rec["split"],
            class_name=rec["class"],
            lat=rec["lat"],
            lon=rec["lon"],
            extra={c: _plain(rec[c]) for c in (*GEO_META_COLUMNS, *CAPTION_COLUMNS) if c in rec},
        )


def _plain(value: Any) -> Any:
    """A hit field as JSON: datetimes as ISO 8601 (UTC)."""
    return value.isoformat() if isinstance(value, datetime) else value


@dataclass
class QueryResult:
    query: str
    model_id: str
    mode: str  # "exact" | "ann"
    hits: list[Hit]
    seconds: float
    ann: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "query": self.query,
            "model_id": self.model_id,
            "mode": self.mode,
            "seconds": round(self.seconds, 4),
            "ann": self.ann,
            "hits": [h.to_json() for h in self.hits],
        }


def hits(snapshot: Snapshot, table: str, rows: np.ndarray, scores: np.ndarray) -> list[Hit]:
    """Hits for one query's global rows and scores (best first; rows < 0 pad short ANN results)."""
    keep = np.asarray(rows) >= 0
    rows, scores = np.asarray(rows)[keep], np.asarray(scores)[keep]
    records = snapshot.take(table, rows, snapshot.meta_columns(table)).to_pylist()
    out = []
    for rank, (score, rec) in enumerate(zip(scores, records), start=1):
        out.append(Hit.from_record(rank, score, rec))
    return out
