"""Write the event contract as JSON Schema into docs/schemas/ (``python -m connectors.schemas``).

Generated from the msgspec Structs, which are the contract as enforced, so the
published schema cannot drift from the decoder; a test checks the files are current.
"""

from __future__ import annotations

import inspect
import sys
from pathlib import Path
from typing import Any

import msgspec

from connectors.events import Feedback, Prediction

__all__ = ["SCHEMAS", "json_schema", "main"]

#: The published contract: struct and file stem.
SCHEMAS = ((Prediction, "prediction-v1"), (Feedback, "feedback-v1"))


def _clean(node: Any) -> Any:
    # msgspec 0.19 kept docstrings' indentation, 0.23 dedents them: normalise, so the
    # published file depends on the contract, not on the msgspec release.
    if isinstance(node, dict):
        return {k: inspect.cleandoc(v) if k == "description" and isinstance(v, str) else _clean(v)
                for k, v in node.items()}
    if isinstance(node, list):
        return [_clean(v) for v in node]
    return node


def json_schema(struct: type) -> dict[str, Any]:
    """The JSON Schema of one event struct, as published in docs/schemas/."""
    schema: dict[str, Any] = _clean(msgspec.json.schema(struct))
    return schema


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for struct, name in SCHEMAS:
        text = msgspec.json.format(msgspec.json.encode(json_schema(struct)))
        (out / f"{name}.schema.json").write_bytes(text + b"\n")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parents[1] / "docs" / "schemas")
