"""The serving frontend: continuous batching over the stage agents behind an OpenAI-compatible HTTP API.

`start_frontend(config)` runs one on the current event loop; `BackgroundFrontend` runs one in a thread.
"""

from pipeshift.runtime.frontend.background import BackgroundFrontend
from pipeshift.runtime.frontend.config import FrontendConfig
from pipeshift.runtime.frontend.server import Frontend, start_frontend

__all__ = ["BackgroundFrontend", "Frontend", "FrontendConfig", "start_frontend"]
