"""Reference profiles stored with the model version in the MLflow registry.

The analysis stage (monitor/analysis.py) asks a `References` source for the reference of
each (model, version) it sees in the traffic. This is that source for MLflow: the registry
edge (connectors/registry.py) finds the reference's JSON with the model version, and this
adapter turns it into a `Reference` whose ``source`` says where it came from
(``mlflow:models:/ctr/7``), which /status and every drift incident's evidence show.

It raises whatever the registry raises (`connectors.registry.RegistryError` on an outage):
the analysis stage catches it, logs it and asks again on a later window.
"""

from __future__ import annotations

import dataclasses
from typing import Protocol

from monitor.analysis import References
from monitor.stats.reference import Reference

__all__ = ["FirstOf", "MlflowReferences", "ReferenceStore"]


class ReferenceStore(Protocol):
    """What `MlflowReferences` needs of the registry (`connectors.registry.ModelRegistry`)."""

    def reference_json(self, model: str, version: str) -> str | None: ...


class MlflowReferences:
    """`References` from the model registry: the profile logged with each model version.

    Args:
        registry: a `connectors.registry.ModelRegistry` (or anything with its
            ``reference_json``).

    Example:
        >>> refs = MlflowReferences(ModelRegistry("http://mlflow:5000"))  # doctest: +SKIP
        >>> refs.lookup("ctr", "7").source  # doctest: +SKIP
        'mlflow:models:/ctr/7'
    """

    def __init__(self, registry: ReferenceStore) -> None:
        self.registry = registry

    def lookup(self, model: str, version: str) -> Reference | None:
        text = self.registry.reference_json(model, version)
        if text is None:
            return None
        ref = Reference.from_json(text)
        return dataclasses.replace(ref, source=f"mlflow:models:/{model}/{version}")

    def __repr__(self) -> str:
        return f"MlflowReferences({self.registry!r})"


class FirstOf:
    """The first reference any of several sources has (the registry, then a directory).

    A source that fails raises: the analysis stage retries the whole lookup later rather
    than settle for a lower-priority source while the preferred one is down.
    """

    def __init__(self, sources: list[References]) -> None:
        self.sources = list(sources)

    def lookup(self, model: str, version: str) -> Reference | None:
        for source in self.sources:
            ref = source.lookup(model, version)
            if ref is not None:
                return ref
        return None

    def __repr__(self) -> str:
        return f"FirstOf({self.sources!r})"
