"""What every benchmark does with its measurements: progress on stderr, the table on stdout, JSON on request."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any


def log(message: str) -> None:
    """Progress goes to stderr, so stdout holds only the table."""
    print(message, file=sys.stderr, flush=True)


def publish(result: dict[str, Any], table: str, json_path: Path | None) -> int:
    """Prints ``table`` and, when asked, writes ``result`` as JSON; returns the exit status."""
    print(table)
    if json_path:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(result, indent=2) + "\n")
        print(f"\nwrote {json_path}")
    return 0
