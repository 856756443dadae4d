"""The reference a model version is compared against: its profile and label summary.

A value type shared by the monitor (which stores, looks up and bootstraps references)
and the training job (which writes the new version's reference from its training data).
"""

from __future__ import annotations

import dataclasses
import json

from monitor.stats.labels import LabelSummary
from monitor.stats.profile import Profile

__all__ = ["Reference"]


@dataclasses.dataclass(frozen=True)
class Reference:
    """What a model version is compared against."""

    profile: Profile
    #: Label summary of the reference period (None: bootstrapped from live labels).
    labels: LabelSummary | None
    source: str

    def to_json(self) -> str:
        return json.dumps({"profile": self.profile.to_dict(), "source": self.source,
                           "labels": None if self.labels is None else self.labels.to_dict()})

    @classmethod
    def from_json(cls, text: str) -> Reference:
        d = json.loads(text)
        labels = d.get("labels")
        return cls(Profile.from_dict(d["profile"]),
                   None if labels is None else LabelSummary.from_dict(labels), d["source"])
