"""Geo and time filters of a query: `GeoFilter` and its parsers from the CLI's strings.

    --bbox MINLON,MINLAT,MAXLON,MAXLAT   GeoJSON order; MINLON > MAXLON is a box across the antimeridian
    --near LON,LAT --radius-km R         geodesic distance from the point to a footprint (0 inside it) <= R
    --after / --before                   ISO dates or datetimes, both bounds inclusive; naive means UTC and a
                                         date-only --before means the end of that day

Every bad input raises `GeoFilterError` with one line that names the flag and the reason.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta, timezone

from pipelines.geo.errors import GeoFilterError

WGS84_A_KM = 6378.137
# Half the equator: no two points on Earth are further apart, so a larger radius is a mistake, not a filter.
MAX_RADIUS_KM = math.pi * WGS84_A_KM


def _shown(text: str) -> str:
    return repr(text if len(text) <= 60 else text[:57] + "...")


def _number(text: str, flag: str, name: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise GeoFilterError(f"{flag}: {name} {_shown(text.strip())} is not a number") from None
    if not math.isfinite(value):
        raise GeoFilterError(f"{flag}: {name} must be a finite number, got {text.strip()}")
    return value


def _numbers(text: str, flag: str, names: tuple[str, ...]) -> list[float]:
    parts = str(text).split(",")
    if len(parts) != len(names):
        raise GeoFilterError(
            f"{flag}: expected {len(names)} comma-separated numbers {','.join(names)}, "
            f"got {len(parts)} ({_shown(str(text))})"
        )
    return [_number(p, flag, n) for p, n in zip(parts, names)]


def _check_lon(value: float, flag: str, name: str) -> None:
    if not math.isfinite(value):
        raise GeoFilterError(f"{flag}: {name} must be a finite number, got {value}")
    if not -180.0 <= value <= 180.0:
        raise GeoFilterError(f"{flag}: {name} {value:g} is outside [-180, 180]")


def _check_lat(value: float, flag: str, name: str) -> None:
    if not math.isfinite(value):
        raise GeoFilterError(f"{flag}: {name} must be a finite number, got {value}")
    if not -90.0 <= value <= 90.0:
        raise GeoFilterError(f"{flag}: {name} {value:g} is outside [-90, 90]")


def _checked_bbox(box, flag: str = "--bbox") -> tuple[float, float, float, float]:
    try:
        minlon, minlat, maxlon, maxlat = (float(v) for v in box)
    except (TypeError, ValueError):
        raise GeoFilterError(f"{flag}: expected 4 numbers MINLON,MINLAT,MAXLON,MAXLAT, got {box!r}") from None
    _check_lon(minlon, flag, "MINLON")
    _check_lat(minlat, flag, "MINLAT")
    _check_lon(maxlon, flag, "MAXLON")
    _check_lat(maxlat, flag, "MAXLAT")
    if minlat > maxlat:
        raise GeoFilterError(f"{flag}: MINLAT {minlat:g} is greater than MAXLAT {maxlat:g}")
    return (minlon, minlat, maxlon, maxlat)


def _checked_point(point, flag: str = "--near") -> tuple[float, float]:
    try:
        lon, lat = (float(v) for v in point)
    except (TypeError, ValueError):
        raise GeoFilterError(f"{flag}: expected 2 numbers LON,LAT, got {point!r}") from None
    _check_lon(lon, flag, "LON")
    _check_lat(lat, flag, "LAT")
    return (lon, lat)


def _checked_radius(radius, flag: str = "--radius-km") -> float:
    try:
        r = float(radius)
    except (TypeError, ValueError):
        raise GeoFilterError(f"{flag}: {radius!r} is not a number") from None
    if not math.isfinite(r):
        raise GeoFilterError(f"{flag}: must be a finite number, got {r}")
    if r < 0:
        raise GeoFilterError(f"{flag}: {r:g} is negative; a radius is a distance in km >= 0")
    if r > MAX_RADIUS_KM:
        raise GeoFilterError(
            f"{flag}: {r:g} km is more than half Earth's circumference ({MAX_RADIUS_KM:.0f} km)"
        )
    return r


def _utc(value: datetime, flag: str) -> datetime:
    if not isinstance(value, datetime):
        raise GeoFilterError(f"{flag}: expected a datetime, got {type(value).__name__}")
    return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value.astimezone(timezone.utc)


@dataclass(frozen=True)
class GeoFilter:
    """What a hit must satisfy besides the text or image query; every part optional, all parts ANDed.

    `bbox` (minlon, minlat, maxlon, maxlat), minlon > maxlon across the antimeridian; `near` (lon, lat) with
    `radius_km`; `after` / `before` inclusive bounds, stored as aware UTC datetimes (naive ones are UTC)."""

    bbox: tuple[float, float, float, float] | None = None
    near: tuple[float, float] | None = None
    radius_km: float | None = None
    after: datetime | None = None
    before: datetime | None = None

    def __post_init__(self) -> None:
        if self.bbox is not None:
            object.__setattr__(self, "bbox", _checked_bbox(self.bbox))
        if (self.near is None) != (self.radius_km is None):
            raise GeoFilterError(
                "--near needs --radius-km (a distance in km)"
                if self.near is not None
                else "--radius-km needs --near LON,LAT (the point to measure from)"
            )
        if self.near is not None:
            object.__setattr__(self, "near", _checked_point(self.near))
            object.__setattr__(self, "radius_km", _checked_radius(self.radius_km))
        for flag, name in (("--after", "after"), ("--before", "before")):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, _utc(getattr(self, name), flag))
        if self.after is not None and self.before is not None and self.after > self.before:
            raise GeoFilterError(
                f"--after {self.after.isoformat()} is later than --before {self.before.isoformat()}"
            )

    @property
    def spatial(self) -> bool:
        """True when the filter needs footprints (bbox or near): rows without one never match it."""
        return self.bbox is not None or self.near is not None

    @property
    def temporal(self) -> bool:
        return self.after is not None or self.before is not None

    @property
    def empty(self) -> bool:
        return not (self.spatial or self.temporal)

    def bbox_parts(self) -> list[tuple[float, float, float, float]]:
        """The query box as boxes with minlon <= maxlon: two when it crosses the antimeridian."""
        if self.bbox is None:
            return []
        minlon, minlat, maxlon, maxlat = self.bbox
        if minlon <= maxlon:
            return [self.bbox]
        return [(minlon, minlat, 180.0, maxlat), (-180.0, minlat, maxlon, maxlat)]


def check_columns(
    filt: GeoFilter,
    columns,
    geometry: str = "geometry",
    bbox: str = "bbox",
    datetime_column: str = "datetime",
) -> None:
    """Refuse a filter that a table with these columns cannot answer, instead of silently finding nothing:
    a spatial part without footprint columns, a time part without a datetime column."""
    names = set(columns)
    if filt.spatial and not {geometry, bbox} <= names:
        flags = " and ".join(f for f, on in (("--bbox", filt.bbox), ("--near", filt.near)) if on is not None)
        raise GeoFilterError(
            f"{flags}: this table has no footprints (no {geometry!r} / {bbox!r} columns); "
            "only chips of georeferenced scenes have them"
        )
    if filt.temporal and datetime_column not in names:
        flags = " and ".join(
            f for f, on in (("--after", filt.after), ("--before", filt.before)) if on is not None
        )
        raise GeoFilterError(f"{flags}: this table has no {datetime_column!r} column to filter on")


def parse_bbox(text: str, flag: str = "--bbox") -> tuple[float, float, float, float]:
    """`MINLON,MINLAT,MAXLON,MAXLAT` -> a checked tuple (MINLON > MAXLON: across the antimeridian)."""
    return _checked_bbox(_numbers(text, flag, ("MINLON", "MINLAT", "MAXLON", "MAXLAT")), flag)


def parse_point(text: str, flag: str = "--near") -> tuple[float, float]:
    """`LON,LAT` -> a checked (lon, lat)."""
    return _checked_point(_numbers(text, flag, ("LON", "LAT")), flag)


def parse_radius_km(text: str, flag: str = "--radius-km") -> float:
    """A distance in km, 0 <= R <= half Earth's circumference."""
    return _checked_radius(_number(str(text), flag, "R"), flag)


def parse_time(text: str, flag: str, *, end_of_day: bool = False) -> datetime:
    """An ISO 8601 date or datetime -> aware UTC datetime. Naive is UTC; a date is its first instant, or its
    last microsecond with `end_of_day` (so `--before 2024-05-31` keeps the whole of May 31)."""
    s = str(text).strip()
    try:
        day = date.fromisoformat(s)
    except ValueError:
        day = None
    if day is not None:
        moment = datetime.combine(day, time(), tzinfo=timezone.utc)
        return moment + timedelta(days=1, microseconds=-1) if end_of_day else moment
    try:
        return _utc(datetime.fromisoformat(s), flag)
    except ValueError:
        raise GeoFilterError(
            f"{flag}: {_shown(s)} is not an ISO date or datetime (e.g. 2024-05-01 or 2024-05-01T12:00:00Z)"
        ) from None


def parse_geo_filter(
    bbox: str | None = None,
    near: str | None = None,
    radius_km: str | float | None = None,
    after: str | None = None,
    before: str | None = None,
) -> GeoFilter:
    """The flags' strings (None = flag not given) -> a checked `GeoFilter`."""
    return GeoFilter(
        bbox=parse_bbox(bbox) if bbox is not None else None,
        near=parse_point(near) if near is not None else None,
        radius_km=parse_radius_km(radius_km) if radius_km is not None else None,
        after=parse_time(after, "--after") if after is not None else None,
        before=parse_time(before, "--before", end_of_day=True) if before is not None else None,
    )
