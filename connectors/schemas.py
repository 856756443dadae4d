"""Write the event contract as JSON Schema into docs/schemas/ (``python -m connectors.schemas``).

Generated from the msgspec Structs, which are the contract as enforced, so the
published schema cannot drift from the decoder; a test checks the files are current.
"""

from __future__ import annotations

import sys
from pathlib import Path

import msgspec

from connectors.events import Feedback, Prediction


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for struct, name in ((Prediction, "prediction-v1"), (Feedback, "feedback-v1")):
        text = msgspec.json.format(msgspec.json.encode(msgspec.json.schema(struct)))
        (out / f"{name}.schema.json").write_bytes(text + b"\n")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parents[1] / "docs" / "schemas")
