"""Reading a JSON object from a file with errors a user can act on (file, line, what was expected).

Shared by the engine (config.json), the planner (config.json, `--current`) and anything else that
takes a JSON file from a user; pure Python, so every deployable can use it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pipeshift.errors import UserError


def read_json_object(path: Path, missing: str, expected: str = "a JSON object") -> dict[str, Any]:
    """`missing` says what the file should have been; `expected` what its top level must be."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise UserError(f"{path}: not found ({missing})") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read: {e.strerror}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: must hold {expected}, got {type(data).__name__}")
    return data
