"""The `MetricsSource` interface the decision loop reads through, and building one from a policy."""

from __future__ import annotations

from typing import Protocol

from pipeshift.policy.schema import MetricsConfig
from pipeshift.policy.signals import Signals


class MetricsUnavailable(RuntimeError):
    """The source could not be read this interval; the loop holds and tries again next interval."""


class MetricsSource(Protocol):
    def read(self) -> Signals: ...


def build_source(config: MetricsConfig) -> MetricsSource:
    # Imported here: each source pulls in its own client only when a policy uses it.
    if config.prometheus is not None:
        from pipeshift.policy.prometheus import PrometheusSource

        return PrometheusSource.from_config(config.prometheus, config.window_seconds)
    from pipeshift.policy.scrape import ScrapeSource

    assert config.scrape is not None  # the schema requires exactly one source
    return ScrapeSource(config.scrape.url, stage_urls=config.scrape.stage_urls)
