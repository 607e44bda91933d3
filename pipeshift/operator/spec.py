"""`LLMPipeline.spec` read into typed values, every mistake reported with its field path.

`validation.validate_pipeline` is the authority on what is valid (it names every problem); this module
turns a spec into the values the reconciler uses, and refuses (with field paths too) anything it
could not type, so a gap between the two can never reach a manifest.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from pipeshift.api import Layout, LayoutError, StagePlan
from pipeshift.placement.catalogue import CATALOGUE

GROUP = "pipeshift.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "LLMPipeline"
PLURAL = "llmpipelines"
POLICY_PLURAL = "autoscalingpolicies"

DEFAULT_MOUNT_PATH = "/models"
DEFAULT_CONFIG_KEY = "config.json"
DTYPES = ("float32", "float64", "bfloat16", "float16")
_POOL_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


class SpecError(ValueError):
    """A spec the operator cannot act on; `errors` are `field.path: what is wrong` lines."""

    def __init__(self, errors: list[str]) -> None:
        self.errors = errors
        super().__init__("; ".join(errors))


@dataclass(frozen=True)
class Pool:
    name: str
    gpu: str
    node_selector: Mapping[str, str] = field(default_factory=dict)
    cost_per_hour: float | None = None


@dataclass(frozen=True)
class ModelSource:
    """Where the weights are inside a pod, and where the operator reads `config.json` for planning."""

    path: str
    mount_path: str = DEFAULT_MOUNT_PATH
    volume: Mapping[str, Any] | None = None
    config: Mapping[str, Any] | None = None
    config_map: tuple[str, str] | None = None  # (name, key)


@dataclass(frozen=True)
class PipelineSpec:
    model: ModelSource
    pools: tuple[Pool, ...]
    image: str
    layout: Layout | None = None
    resources: Mapping[str, Any] = field(default_factory=dict)
    dtype: str | None = None
    min_stages: int = 1
    max_stages: int = 8
    scale_to_zero: bool = False
    policy: str | None = None
    inline_policy: Mapping[str, Any] | None = None

    def pool(self, name: str) -> Pool:
        for p in self.pools:
            if p.name == name:
                return p
        raise KeyError(f"no pool {name!r} in spec.pools")


@dataclass(frozen=True)
class PipelineRef:
    """The identity of one `LLMPipeline` object: what owner references and labels need."""

    name: str
    namespace: str
    uid: str
    generation: int = 1

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> PipelineRef:
        meta = body.get("metadata") or {}
        return cls(name=str(meta["name"]), namespace=str(meta.get("namespace") or "default"),
                   uid=str(meta.get("uid") or ""), generation=int(meta.get("generation") or 1))


class _Errors:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def add(self, path: str, message: str) -> None:
        self.lines.append(f"{path}: {message}")


def parse_spec(spec: Mapping[str, Any] | None) -> PipelineSpec:
    """Typed spec, or `SpecError` listing every problem with its field path."""
    err = _Errors()
    if not isinstance(spec, Mapping):
        raise SpecError(["spec: must be an object"])
    model = _model(spec.get("model"), err)
    pools = _pools(spec.get("pools"), err)
    image = spec.get("image")
    if not isinstance(image, str) or not image.strip():
        err.add("spec.image", "is required: the runtime image that runs `pipeshift agent` and `pipeshift frontend`")
    dtype = spec.get("dtype")
    if dtype is not None and dtype not in DTYPES:
        err.add("spec.dtype", f"{dtype!r} is not one of {', '.join(DTYPES)}")
    resources = spec.get("resources") or {}
    if not isinstance(resources, Mapping):
        err.add("spec.resources", "must be an object with `requests` and/or `limits`")
        resources = {}
    min_stages = _int(spec, "minStages", 1, err)
    max_stages = _int(spec, "maxStages", 8, err)
    if min_stages is not None and max_stages is not None and max_stages < min_stages:
        err.add("spec.maxStages", f"{max_stages} is below spec.minStages ({min_stages})")
    policy, inline = spec.get("policy"), spec.get("inlinePolicy")
    if policy is not None and inline is not None:
        err.add("spec.inlinePolicy", "set either spec.policy (a name) or spec.inlinePolicy, not both")
    if policy is not None and (not isinstance(policy, str) or not policy):
        err.add("spec.policy", "must be the name of an AutoscalingPolicy in this namespace")
    if inline is not None and not isinstance(inline, Mapping):
        err.add("spec.inlinePolicy", "must be an object (the AutoscalingPolicy body)")
    layout = None
    if spec.get("layout") is not None:
        layout = _layout(spec["layout"], {p.name for p in pools}, err)
        if layout is not None and min_stages is not None and max_stages is not None \
                and not min_stages <= len(layout) <= max_stages:
            err.add("spec.layout.stages", f"has {len(layout)} stages; spec.minStages..spec.maxStages allows "
                                          f"{min_stages}..{max_stages}")
    if err.lines:
        raise SpecError(err.lines)
    assert model is not None and min_stages is not None and max_stages is not None
    return PipelineSpec(
        model=model, pools=pools, image=str(image), layout=layout, resources=dict(resources),
        dtype=dtype, min_stages=min_stages, max_stages=max_stages,
        scale_to_zero=bool(spec.get("scaleToZero", False)),
        policy=policy, inline_policy=inline,
    )


def _int(spec: Mapping[str, Any], key: str, default: int, err: _Errors) -> int | None:
    value = spec.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        err.add(f"spec.{key}", f"{value!r} must be an integer of at least 1")
        return None
    return value


def _abs_path(value: Any, path: str, err: _Errors, required: bool) -> str | None:
    if value is None and not required:
        return None
    if not isinstance(value, str) or not value.startswith("/"):
        err.add(path, f"{value!r} must be an absolute path inside the pod" if value is not None else "is required")
        return None
    return value


def _model(raw: Any, err: _Errors) -> ModelSource | None:
    if not isinstance(raw, Mapping):
        err.add("spec.model", "is required: {path, volume?, mountPath?, config? | configMapRef?}")
        return None
    path = _abs_path(raw.get("path"), "spec.model.path", err, required=True)
    mount = _abs_path(raw.get("mountPath"), "spec.model.mountPath", err, required=False) or DEFAULT_MOUNT_PATH
    volume = raw.get("volume")
    if volume is not None and (not isinstance(volume, Mapping) or not volume or "name" in volume):
        err.add("spec.model.volume", "must be one core volume source such as {hostPath: {path: ...}} or "
                                     "{persistentVolumeClaim: {claimName: ...}}, without a name")
        volume = None
    if volume is not None and path is not None and not (path == mount or path.startswith(mount.rstrip("/") + "/")):
        err.add("spec.model.path", f"{path!r} is outside spec.model.mountPath {mount!r}, where the volume is mounted")
    config, ref = raw.get("config"), raw.get("configMapRef")
    if config is not None and not isinstance(config, Mapping):
        err.add("spec.model.config", "must be the model's config.json content as an object")
        config = None
    config_map = None
    if ref is not None:
        if config is not None:
            err.add("spec.model.configMapRef", "set either spec.model.config or spec.model.configMapRef, not both")
        elif not isinstance(ref, Mapping) or not isinstance(ref.get("name"), str) or not ref["name"]:
            err.add("spec.model.configMapRef.name", "is required: the ConfigMap holding config.json")
        else:
            key = ref.get("key", DEFAULT_CONFIG_KEY)
            config_map = (ref["name"], key if isinstance(key, str) and key else DEFAULT_CONFIG_KEY)
    if path is None:
        return None
    return ModelSource(path=path, mount_path=mount, volume=volume, config=config, config_map=config_map)


def _pools(raw: Any, err: _Errors) -> tuple[Pool, ...]:
    if not isinstance(raw, list) or not raw:
        err.add("spec.pools", "is required: a list of {name, gpu, nodeSelector, costPerHour?}")
        return ()
    pools: list[Pool] = []
    seen: set[str] = set()
    for i, p in enumerate(raw):
        at = f"spec.pools[{i}]"
        if not isinstance(p, Mapping):
            err.add(at, "must be an object {name, gpu, nodeSelector, costPerHour?}")
            continue
        name, gpu = p.get("name"), p.get("gpu")
        ok = True
        if not isinstance(name, str) or len(name) > 63 or not _POOL_NAME.match(name):
            err.add(f"{at}.name", f"{name!r} must be a DNS label (lowercase letters, digits, '-'; at most 63)")
            ok = False
        elif name in seen:
            err.add(f"{at}.name", f"{name!r} is used by an earlier pool")
            ok = False
        if gpu not in CATALOGUE:
            err.add(f"{at}.gpu", f"{gpu!r} is not a known GPU; the catalogue has {', '.join(CATALOGUE)}")
            ok = False
        selector = p.get("nodeSelector") or {}
        if not isinstance(selector, Mapping) or not all(isinstance(v, str) for v in selector.values()):
            err.add(f"{at}.nodeSelector", "must map label names to string values")
            ok = False
        cost = p.get("costPerHour")
        if cost is not None and (isinstance(cost, bool) or not isinstance(cost, int | float) or cost < 0):
            err.add(f"{at}.costPerHour", f"{cost!r} must be a number >= 0")
            ok = False
        if ok:
            seen.add(name)
            pools.append(Pool(name, gpu, dict(selector), None if cost is None else float(cost)))
    return tuple(pools)


def _layout(raw: Any, pool_names: set[str], err: _Errors) -> Layout | None:
    stages = raw.get("stages") if isinstance(raw, Mapping) else None
    if not isinstance(stages, list) or not stages:
        err.add("spec.layout.stages", "must be a non-empty list of {pool, layers: [start, end]}")
        return None
    plans: list[StagePlan] = []
    for i, s in enumerate(stages):
        at = f"spec.layout.stages[{i}]"
        if not isinstance(s, Mapping):
            err.add(at, "must be an object {pool, layers: [start, end]}")
            return None
        pool, layers = s.get("pool"), s.get("layers")
        stage_id = s.get("stageId", s.get("stage_id", i))
        if pool not in pool_names:
            err.add(f"{at}.pool", f"{pool!r} is not one of spec.pools ({', '.join(sorted(pool_names)) or 'none'})")
        if not (isinstance(layers, list) and len(layers) == 2 and all(_is_int(x) and x >= 0 for x in layers)):
            err.add(f"{at}.layers", f"{layers!r} must be [start, end] with 0 <= start < end (end exclusive)")
            return None
        if not _is_int(stage_id) or stage_id < 0:
            err.add(f"{at}.stageId", f"{stage_id!r} must be an integer >= 0")
            return None
        plans.append(StagePlan(stage_id, str(pool), layers[0], layers[1]))
    try:
        return Layout(tuple(plans))
    except LayoutError as e:
        err.add("spec.layout.stages", str(e))
        return None


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)
