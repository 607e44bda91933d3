"""`pipeshift operator`: run the LLMPipeline operator (kopf, standalone) until SIGTERM or SIGINT.

Every flag can also be set as `PIPESHIFT_OPERATOR_<FLAG>` (the Helm chart configures the Deployment
through the environment); a flag wins over the environment. The API server is reached with the
in-cluster ServiceAccount when there is one, else with `$KUBECONFIG` / `~/.kube/config`.
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass

from pipeshift.errors import UserError

HELP = "run the Kubernetes operator that serves LLMPipeline resources"
LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def env_name(flag: str) -> str:
    return "PIPESHIFT_OPERATOR_" + flag.lstrip("-").upper().replace("-", "_")


@dataclass(frozen=True)
class OperatorConfig:
    namespaces: tuple[str, ...] = ()  # empty: every namespace (cluster-wide)
    metrics_host: str = "0.0.0.0"
    metrics_port: int | None = 8080  # None: no metrics server; 0 picks a free port
    health_port: int | None = None
    log_level: str = "INFO"
    recheck_seconds: float = 10.0
    prometheus_url: str | None = None  # the autoscaling loop's Prometheus (replaces a policy's metrics URL)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--namespace", action="append", default=None, metavar="NS",
                        help="watch this namespace (repeat for several; default: all namespaces); "
                             f"env {env_name('--namespaces')} (comma-separated)")
    parser.add_argument("--all-namespaces", action="store_true", default=None,
                        help="watch every namespace (the default when no --namespace is given)")
    parser.add_argument("--prometheus-url", default=None,
                        help=f"Prometheus for the autoscaling loop's metrics (default: scrape directly); "
                             f"env {env_name('--prometheus-url')}")
    parser.add_argument("--metrics-host", default=None, help=f"address of /metrics (default 0.0.0.0); "
                                                             f"env {env_name('--metrics-host')}")
    parser.add_argument("--metrics-port", default=None,
                        help=f"port of /metrics (default 8080; 0 picks a free one, 'off' serves none); "
                             f"env {env_name('--metrics-port')}")
    parser.add_argument("--health-port", default=None,
                        help=f"serve kopf's liveness probe at :PORT/healthz (default: off); "
                             f"env {env_name('--health-port')}")
    parser.add_argument("--log-level", default=None, help=f"one of {', '.join(LEVELS)} (default INFO); "
                                                          f"env {env_name('--log-level')}")
    parser.add_argument("--recheck-seconds", default=None,
                        help=f"how often every pipeline is re-checked besides the events that trigger it "
                             f"(default 10); env {env_name('--recheck-seconds')}")


def _port(text: str, source: str, allow_off: bool) -> int | None:
    if allow_off and text.lower() == "off":
        return None
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise UserError(f"{source}={text!r}: must be a port in 0..65535" + (" or 'off'" if allow_off else ""))
    return port


def resolve(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> OperatorConfig:
    """Flags over environment over defaults; a bad value names its flag or variable."""
    env = os.environ if environ is None else environ

    def pick(flag: str, env_flag: str | None = None) -> tuple[str | None, str]:
        value = getattr(args, flag.lstrip("-").replace("-", "_"), None)
        if value is not None:
            return value, flag
        var = env_name(env_flag or flag)
        return env.get(var), var

    default = OperatorConfig()
    namespaces: tuple[str, ...]
    if args.namespace and args.all_namespaces:
        raise UserError("--namespace and --all-namespaces exclude each other; give one of them")
    if args.namespace:
        namespaces = tuple(args.namespace)
    elif args.all_namespaces:
        namespaces = ()
    else:
        namespaces = tuple(n.strip() for n in env.get(env_name("--namespaces"), "").split(",") if n.strip())
    host, _ = pick("--metrics-host")
    metrics_raw, metrics_src = pick("--metrics-port")
    health_raw, health_src = pick("--health-port")
    level_raw, level_src = pick("--log-level")
    level = (level_raw or default.log_level).upper()
    if level not in LEVELS:
        raise UserError(f"{level_src}={level_raw!r}: must be one of {', '.join(LEVELS)}")
    recheck_raw, recheck_src = pick("--recheck-seconds")
    recheck = default.recheck_seconds
    if recheck_raw is not None:
        try:
            recheck = float(recheck_raw)
        except ValueError:
            recheck = -1.0
        if not recheck > 0:
            raise UserError(f"{recheck_src}={recheck_raw!r}: must be a number of seconds above 0")
    return OperatorConfig(
        namespaces=namespaces,
        metrics_host=host or default.metrics_host,
        metrics_port=default.metrics_port if metrics_raw is None else _port(metrics_raw, metrics_src, True),
        health_port=None if health_raw is None else _port(health_raw, health_src, True),
        log_level=level,
        recheck_seconds=recheck,
        prometheus_url=_url(*pick("--prometheus-url")),
    )


def _url(text: str | None, source: str) -> str | None:
    if not text:
        return None
    if not text.startswith(("http://", "https://")):
        raise UserError(f"{source}={text!r}: must be an http:// or https:// URL")
    return text.rstrip("/")


def _load_client_config() -> None:
    """Configure the `kubernetes` client's default: in-cluster first, then the kubeconfig."""
    from kubernetes import config

    try:
        config.load_incluster_config()
    except config.ConfigException:
        try:
            config.load_kube_config()
        except (config.ConfigException, OSError) as e:
            raise UserError(f"cannot reach a cluster: no in-cluster ServiceAccount and no usable kubeconfig "
                            f"(KUBECONFIG={os.environ.get('KUBECONFIG', '~/.kube/config')}): {e}") from None


def run(args: argparse.Namespace) -> int:
    cfg = resolve(args)
    logging.getLogger().setLevel(cfg.log_level)
    logging.getLogger("pipeshift").setLevel(cfg.log_level)
    if cfg.log_level != "DEBUG":
        # kopf logs every handler and timer run at INFO; our own lines say what was done and why.
        logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    _load_client_config()

    import contextlib

    import kopf

    from pipeshift.operator.handlers import PipelineOperator, build_registry, settings
    from pipeshift.operator.kube import Kube
    from pipeshift.operator.metrics import OperatorMetrics, serve_metrics

    metrics = OperatorMetrics()
    op = PipelineOperator(Kube(), metrics, prometheus_url=cfg.prometheus_url)
    with contextlib.ExitStack() as stack:
        where = "all namespaces" if not cfg.namespaces else "namespaces " + ", ".join(cfg.namespaces)
        line = f"pipeshift operator: watching {where}"
        if cfg.metrics_port is not None:
            port = stack.enter_context(serve_metrics(metrics, cfg.metrics_host, cfg.metrics_port))
            line += f"; metrics on http://{cfg.metrics_host}:{port}/metrics"
        print(line, flush=True)
        kopf.run(
            registry=build_registry(op, cfg.recheck_seconds),
            settings=settings(),
            standalone=True,
            clusterwide=not cfg.namespaces,
            namespaces=list(cfg.namespaces),
            liveness_endpoint=None if cfg.health_port is None else f"http://0.0.0.0:{cfg.health_port}/healthz",
        )
    return 0
