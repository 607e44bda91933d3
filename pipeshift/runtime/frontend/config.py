"""The frontend's settings: where the model and the stage agents are, and the batching and queue bounds.

Secrets come from the environment only: `PIPESHIFT_API_KEY` guards the OpenAI API, the control token
(`PIPESHIFT_CONTROL_TOKEN[_FILE]`) guards the agents' control APIs, the data plane and our control API.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

from pipeshift.runtime.security import load_control_token

API_KEY_ENV = "PIPESHIFT_API_KEY"


@dataclass(frozen=True)
class FrontendConfig:
    """`stages` are the agents' control addresses (`host:port`) in pipeline order; none: start scaled to zero,
    holding requests until `POST /control/recover` attaches a chain (see `zero`)."""

    model_dir: Path
    stages: tuple[str, ...]
    host: str = "127.0.0.1"
    port: int = 8000
    model_name: str | None = None
    slots: int | None = None
    max_batch_tokens: int = 2048
    max_queue: int = 256
    step_timeout_s: float = 30.0
    health_interval_s: float = 2.0
    default_max_tokens: int = 16
    # Seconds requests wait for a stage that died to be replaced (`POST /control/recover`) before they fail;
    # 0: they fail at once. See `recovery`.
    recover_timeout_s: float = 0.0
    # Seconds a request waits for stages while the pipeline is scaled to zero before it ends with 503.
    zero_wait_timeout_s: float = 60.0
    api_key: str | None = field(default=None, repr=False)
    control_token: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        checks = {
            "zero_wait_timeout_s": self.zero_wait_timeout_s,
            "max_batch_tokens": self.max_batch_tokens,
            "default_max_tokens": self.default_max_tokens,
            "step_timeout_s": self.step_timeout_s,
            "health_interval_s": self.health_interval_s,
        }
        for name, value in checks.items():
            if value <= 0:
                raise ValueError(f"FrontendConfig.{name} must be positive, got {value}")
        if self.slots is not None and self.slots < 1:
            raise ValueError(f"FrontendConfig.slots must be at least 1, got {self.slots}")
        if self.max_queue < 0:
            raise ValueError(f"FrontendConfig.max_queue must be >= 0, got {self.max_queue}")
        if not self.recover_timeout_s >= 0:
            raise ValueError(f"FrontendConfig.recover_timeout_s must be >= 0, got {self.recover_timeout_s}")

    @property
    def micro_batch_slots(self) -> int:
        """One batch in flight per stage keeps every stage busy; two at least so sampling overlaps compute."""
        return self.slots if self.slots is not None else max(2, len(self.stages))

    def with_secrets_from(self, environ: Mapping[str, str] | None = None) -> FrontendConfig:
        """This config with the API key and control token read from the environment."""
        env = os.environ if environ is None else environ
        return replace(self, api_key=env.get(API_KEY_ENV) or None, control_token=load_control_token(env))
