"""Autoscaling policies: the YAML schema, metric sources, and the step-at-a-time decision loop.

Pure Python like the planner it drives: no torch, no Kubernetes client.
"""

from pipeshift.policy.autoscaler import Autoscaler, Decision, describe_change
from pipeshift.policy.load import load_policy, parse_policy
from pipeshift.policy.schema import AutoscalingPolicy, crd_schema, json_schema
from pipeshift.policy.signals import Signals
from pipeshift.policy.source import MetricsSource, MetricsUnavailable, build_source

__all__ = ["Autoscaler", "AutoscalingPolicy", "Decision", "MetricsSource", "MetricsUnavailable", "Signals",
           "build_source", "crd_schema", "describe_change", "json_schema", "load_policy", "parse_policy"]
