"""Reading a policy file: YAML in, a validated `AutoscalingPolicy` out, or one line saying what is wrong.

Errors name the file, the field path and what would be valid; unknown keys are errors, never ignored.
"""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import ValidationError

from pipeshift.errors import UserError
from pipeshift.placement.input_errors import explain
from pipeshift.policy.schema import AutoscalingPolicy


def load_policy(path: Path) -> AutoscalingPolicy:
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise UserError(f"{path}: policy file not found") from None
    return parse_policy(text, source=str(path))


def parse_policy(text: str, source: str = "policy") -> AutoscalingPolicy:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise UserError(f"{source}: not valid YAML{where}: {getattr(e, 'problem', None) or e}") from None
    if not isinstance(data, dict):
        raise UserError(f"{source}: a policy is a YAML mapping with at least name, targets and metrics; "
                        f"got {type(data).__name__}")
    try:
        return AutoscalingPolicy.model_validate(data)
    except ValidationError as e:
        raise UserError(explain(e, AutoscalingPolicy, source)) from None
