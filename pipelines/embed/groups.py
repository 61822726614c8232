"""Units that must reach the store together: a tiled scene's shards, and the old units they take the place of.

A scene that was re-tiled (its file or its STAC item changed) comes back as new shard paths, and its old shards
leave the tile manifest. Its rows must change in one store commit: the new units' rows appear in the same
manifest update that unlists the old units', so a query never sees the scene twice or not at all. So the
driver holds the finished units of a group until every unit of the group is finished, then stages them and
the group's removals at once (`VersionWriter` commits everything staged together). A unit of a group that
fails holds the whole group back: nothing of it is committed, and the next run plans it again.

Units without a group (any other archive) are groups of one: staged when finished, as before.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from pipelines.store.writer import VersionWriter

log = logging.getLogger(__name__)


def group_of(unit: dict[str, Any]) -> str:
    return unit.get("group") or unit["id"]


@dataclass
class StagedGroups:
    """Holds finished units per group and stages each group whole (see the module docstring)."""

    writer: VersionWriter
    expected: Counter = field(default_factory=Counter)  # group -> units to finish this run
    removals: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # group -> gone units
    held: dict[str, list[tuple[dict[str, Any], dict[str, Any], dict[str, Any] | None]]] = field(
        default_factory=dict
    )
    failed: dict[str, str] = field(default_factory=dict)  # group -> why it is held back

    @classmethod
    def plan(
        cls, writer: VersionWriter, todo: list[dict[str, Any]], gone: list[dict[str, Any]]
    ) -> StagedGroups:
        """Groups for this run's units; removals whose group has nothing to embed are staged right away."""
        groups = cls(writer, expected=Counter(group_of(u) for u in todo))
        for g in gone:
            key = g["group"] or g["id"]
            if key in groups.expected:
                groups.removals.setdefault(key, []).append(g)
            else:  # a scene gone from the source (or re-tiled into no chips): only its old rows leave
                writer.stage_removal(g["id"], g["replaces"])
        return groups

    def finished(self, unit: dict[str, Any], entry: dict[str, Any], tables: dict[str, Any]) -> list[tuple]:
        """Record a finished unit; returns the (unit, entry, tables) staged now (its whole group, once complete)."""
        key = group_of(unit)
        if key in self.failed:
            return []
        self.held.setdefault(key, []).append((unit, entry, tables))
        if len(self.held[key]) < self.expected[key]:
            return []
        staged = self.held.pop(key)
        for u, e, t in staged:
            self.writer.stage(e, t, replaces=u.get("replaces"))
        for g in self.removals.pop(key, []):
            self.writer.stage_removal(g["id"], g["replaces"])
        return staged

    def unit_failed(self, unit: dict[str, Any], reason: str) -> list[dict[str, str]]:
        """A unit that could not be embedded; returns the failures to report (the held units of its group too)."""
        key = group_of(unit)
        out = [{"unit": unit["id"], "reason": reason}]
        if self.expected[key] > 1 and key not in self.failed:
            self.failed[key] = f"not committed: unit {unit['id']} of the same scene failed ({reason})"
            out += [{"unit": u["id"], "reason": self.failed[key]} for u, _, _ in self.held.pop(key, [])]
        return out

    def held_back(self, unit: dict[str, Any]) -> str | None:
        """Why a finished unit is not staged: its group failed; None otherwise."""
        return self.failed.get(group_of(unit))

    def unfinished(self) -> list[dict[str, str]]:
        """Finished units still held when the stream ended (another unit of their group never came back)."""
        out = []
        for key, held in self.held.items():
            for u, _, _ in held:
                out.append({"unit": u["id"], "reason": f"not committed: scene {key} did not finish this run"})
        self.held.clear()
        return out
