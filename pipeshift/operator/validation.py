"""Checks on LLMPipeline and AutoscalingPolicy bodies that name the field path of every problem.

The API server (Kubernetes 1.20: structural schema, no CEL) catches types, enums and bounds; it cannot
catch what spans fields (layout against pools and the model, min against max, policy against inline
policy) nor typos inside the policy body, which it keeps because that body preserves unknown fields.
This module catches those, and repeats the schema's checks so a body that never went through an API
server (a file, a test) gets the same answers. Pure Python: no Kubernetes client, no torch.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import cache
from typing import Any

from pydantic import ValidationError

from pipeshift.api import Layout, LayoutError
from pipeshift.crds import DEFAULT_MOUNT_PATH, PIPELINE_NAME_MAX, PIPELINE_NAME_PATTERN, llmpipeline_crd
from pipeshift.errors import UserError
from pipeshift.placement.catalogue import CATALOGUE
from pipeshift.placement.input_errors import problems
from pipeshift.placement.profile import ModelProfile
from pipeshift.policy.schema import AutoscalingPolicy

GPU_RESOURCE = "nvidia.com/gpu"
# core/v1 VolumeSource members: `spec.model.volume` is one of them, the operator names the volume.
VOLUME_SOURCES = frozenset({
    "hostPath", "emptyDir", "gcePersistentDisk", "awsElasticBlockStore", "gitRepo", "secret", "nfs", "iscsi",
    "glusterfs", "persistentVolumeClaim", "rbd", "flexVolume", "cinder", "cephfs", "flocker", "downwardAPI", "fc",
    "azureFile", "configMap", "vsphereVolume", "quobyte", "azureDisk", "photonPersistentDisk", "projected",
    "portworxVolume", "scaleIO", "storageos", "csi", "ephemeral", "image",
})
_TYPES: dict[str, tuple[type, ...]] = {
    "string": (str,), "integer": (int,), "number": (int, float), "boolean": (bool,), "object": (Mapping,),
    "array": (list, tuple),
}


@dataclass(frozen=True)
class FieldError:
    """One problem: `path` as kubectl shows it (`spec.pools[1].gpu`), `message` what is wrong and what is valid."""

    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


def describe(errors: Iterable[FieldError], limit: int = 5) -> str:
    """One line for a status condition or an Event: the first `limit` problems, then how many more."""
    listed = list(errors)
    text = "; ".join(str(e) for e in listed[:limit])
    return text + (f" (and {len(listed) - limit} more)" if len(listed) > limit else "")


def join(base: str, *parts: int | str) -> str:
    """`spec` + (`pools`, 1, `gpu`) → `spec.pools[1].gpu`; keys with dots or slashes are quoted."""
    path = base
    for part in parts:
        if isinstance(part, int):
            path += f"[{part}]"
        elif re.fullmatch(r"[A-Za-z_][A-Za-z0-9_-]*", part):
            path += f".{part}" if path else part
        else:
            path += f"[{part!r}]"
    return path


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _type_ok(value: object, node: Mapping[str, Any]) -> bool:
    if value is None:
        return bool(node.get("nullable"))
    if node.get("x-kubernetes-int-or-string"):
        return _is_int(value) or isinstance(value, str)
    kind = node.get("type")
    if kind is None:
        return True
    if isinstance(value, bool) and kind != "boolean":
        return False
    return isinstance(value, _TYPES[kind]) and not (kind == "integer" and isinstance(value, float))


def _bounds(value: object, node: Mapping[str, Any], path: str) -> list[FieldError]:
    """The scalar and size constraints of an OpenAPI node, with kubectl-like wording."""
    errors = []
    if "enum" in node and value not in node["enum"]:
        if node["enum"] == list(CATALOGUE):
            hint = next((f"; did you mean {k!r}?" for k in CATALOGUE if str(value).lower() == k), "")
            errors.append(FieldError(path, f"{value!r} is not in the GPU catalogue; use one of "
                                           f"{', '.join(CATALOGUE)}{hint}"))
        else:
            errors.append(FieldError(path, f"{value!r} is not one of {', '.join(map(str, node['enum']))}"))
    if isinstance(value, int | float) and not isinstance(value, bool) and "minimum" in node:
        low = node["minimum"]
        if value < low or (node.get("exclusiveMinimum") and value == low):
            relation = "greater than" if node.get("exclusiveMinimum") else "at least"
            errors.append(FieldError(path, f"must be {relation} {low} (got {value})"))
    if isinstance(value, str):
        if len(value) < node.get("minLength", 0):
            least = node["minLength"]
            errors.append(FieldError(path, "must not be empty" if least == 1 else f"needs {least}+ characters"))
        if "maxLength" in node and len(value) > node["maxLength"]:
            errors.append(FieldError(path, f"{value!r} is longer than {node['maxLength']} characters"))
        if "pattern" in node and value and not re.search(node["pattern"], value):
            errors.append(FieldError(path, f"{value!r} does not match {node['pattern']}"))
    if isinstance(value, list | tuple):
        if len(value) < node.get("minItems", 0):
            errors.append(FieldError(path, f"needs at least {node['minItems']} item(s), has {len(value)}"))
        if "maxItems" in node and len(value) > node["maxItems"]:
            errors.append(FieldError(path, f"takes at most {node['maxItems']} item(s), has {len(value)}"))
    return errors


def check_schema(value: object, node: Mapping[str, Any], path: str) -> list[FieldError]:
    """What the API server would refuse or prune, for a body that did not come through one.

    A pruned field is an error here: in a file it is a typo the cluster would drop silently. Nodes that
    keep unknown fields are only type-checked; their content is someone else's (a core Volume source,
    a config.json, a policy body validated by `validate_policy`).
    """
    if not _type_ok(value, node):
        shown = "null" if value is None else type(value).__name__
        wanted = node.get("type", "integer or string")
        return [FieldError(path, f"must be {'an' if wanted[0] in 'aeiou' else 'a'} {wanted}, got {shown}")]
    errors = _bounds(value, node, path)
    if isinstance(value, Mapping) and not node.get("x-kubernetes-preserve-unknown-fields"):
        props: Mapping[str, Any] = node.get("properties", {})
        extra = node.get("additionalProperties")
        for key in node.get("required", ()):
            if key not in value:
                errors.append(FieldError(join(path, key), "required but missing"))
        for key, sub in value.items():
            if key in props:
                errors += check_schema(sub, props[key], join(path, key))
            elif isinstance(extra, Mapping):
                errors += check_schema(sub, extra, join(path, key))
            else:
                valid = ", ".join(props) or "none"
                errors.append(FieldError(join(path, key), f"unknown key {key!r}; valid keys here: {valid}"))
    elif isinstance(value, list | tuple) and "items" in node:
        for i, item in enumerate(value):
            errors += check_schema(item, node["items"], join(path, i))
    return errors


@cache
def _pipeline_schema() -> dict[str, Any]:
    return llmpipeline_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def check_policy(body: object, *, path: str = "spec",
                 name: str | None = None) -> tuple[AutoscalingPolicy | None, list[FieldError]]:
    """The policy model of a policy body, or the problems, each under `path` (`spec.scale_up.cooldown_seconds`).

    `name` is the resource's (or, for an inline policy, the pipeline's) name: the body's `name` defaults
    to it and, when set, must equal it, so a copied policy cannot quietly carry another one's name.
    """
    if not isinstance(body, Mapping):
        return None, [FieldError(path, f"must be an object (a policy body), got {type(body).__name__}")]
    data = dict(body)
    if name is not None:
        if "name" not in data:
            data["name"] = name
        elif data["name"] != name:
            return None, [FieldError(join(path, "name"), f"{data['name']!r} differs from the resource's name "
                                                         f"{name!r}; leave it out or make them equal")]
    try:
        return AutoscalingPolicy.model_validate(data), []
    except ValidationError as e:
        return None, [FieldError(join(path, *loc), message) for loc, message in problems(e, AutoscalingPolicy)]


def validate_policy(body: object, *, path: str = "spec", name: str | None = None) -> list[FieldError]:
    """Problems of an AutoscalingPolicy's spec (or an inline policy at `path`); empty when valid."""
    return check_policy(body, path=path, name=name)[1]


def validate_pipeline(spec: object, *, name: str | None = None, policy: Mapping[str, Any] | None = None,
                      model_config: Mapping[str, Any] | None = None) -> list[FieldError]:
    """Problems of an LLMPipeline's spec; empty when valid.

    Optional context the caller may have read from the cluster: `name` is metadata.name; `policy` the
    spec of the AutoscalingPolicy that `spec.policy` names (its pools must exist in spec.pools);
    `model_config` the config.json that `spec.model.configMapRef` points at (a pinned layout must
    cover its layers).
    """
    errors: list[FieldError] = []
    if name is not None:
        errors += _check_name(name)
    schema = _pipeline_schema()
    errors += check_schema(spec, schema["properties"]["spec"], "spec")
    if not isinstance(spec, Mapping):
        return errors
    pools = _pool_names(spec.get("pools"), errors)
    num_layers = _check_model(spec.get("model"), model_config, errors)
    _check_bounds(spec, errors)
    _check_layout(spec, pools, num_layers, errors)
    _check_policy_choice(spec, pools, name, policy, errors)
    _check_resources(spec.get("resources"), errors)
    return errors


def _check_name(name: str) -> list[FieldError]:
    if len(name) > PIPELINE_NAME_MAX:
        return [FieldError("metadata.name", f"{name!r} is longer than {PIPELINE_NAME_MAX} characters (the operator "
                                            "derives pod and Service names from it)")]
    if not re.fullmatch(PIPELINE_NAME_PATTERN, name):
        return [FieldError("metadata.name", f"{name!r} must be lower-case letters, digits and '-', starting with a "
                                            "letter (it becomes a Service name)")]
    return []


def _pool_names(pools: object, errors: list[FieldError]) -> dict[str, int]:
    """Pool name → index of its first definition; a repeated name is an error at the repeat."""
    names: dict[str, int] = {}
    if not isinstance(pools, list):
        return names
    for i, pool in enumerate(pools):
        name = pool.get("name") if isinstance(pool, Mapping) else None
        if not isinstance(name, str):
            continue
        if name in names:
            errors.append(FieldError(f"spec.pools[{i}].name", f"{name!r} is already the name of "
                                                              f"spec.pools[{names[name]}]; pool names are unique"))
        else:
            names[name] = i
    return names


def _check_model(model: object, read_config: Mapping[str, Any] | None, errors: list[FieldError]) -> int | None:
    """Cross-field checks of spec.model; returns the model's layer count when its config is known."""
    if not isinstance(model, Mapping):
        return None
    volume = model.get("volume")
    if isinstance(volume, Mapping):
        keys = list(volume)
        if "name" in volume:
            errors.append(FieldError("spec.model.volume.name", "the operator names the volume; leave name out"))
        sources = [k for k in keys if k != "name"]
        if len(sources) != 1:
            errors.append(FieldError("spec.model.volume", f"needs exactly one volume source such as hostPath or "
                                                          f"persistentVolumeClaim, got {', '.join(sources) or 'none'}"))
        elif sources[0] not in VOLUME_SOURCES:
            known = ", ".join(sorted(VOLUME_SOURCES))
            errors.append(FieldError(f"spec.model.volume.{sources[0]}",
                                     f"{sources[0]!r} is not a volume source; use one of {known}"))
        mount = model.get("mountPath", DEFAULT_MOUNT_PATH)
        path = model.get("path")
        if isinstance(mount, str) and isinstance(path, str) and not _under(path, mount):
            errors.append(FieldError("spec.model.path", f"{path!r} is outside spec.model.mountPath {mount!r}, where "
                                                        "spec.model.volume is mounted"))
    elif "mountPath" in model:
        errors.append(FieldError("spec.model.mountPath", "has no effect without spec.model.volume"))
    if "config" in model and "configMapRef" in model:
        errors.append(FieldError("spec.model.configMapRef", "set spec.model.config or spec.model.configMapRef, "
                                                            "not both"))
    config, where = model.get("config"), "spec.model.config"
    if not isinstance(config, Mapping) and read_config is not None:
        config, where = read_config, "spec.model.configMapRef"
    if not isinstance(config, Mapping):
        return None
    try:
        return ModelProfile.from_config(dict(config), source=where, dtype="float32").num_layers
    except UserError as e:
        errors.append(FieldError(where, str(e).removeprefix(f"{where}: ")))
        return None


def _under(path: str, mount: str) -> bool:
    mount = mount.rstrip("/") or "/"
    return path == mount or path.startswith(mount if mount == "/" else mount + "/")


def _check_bounds(spec: Mapping[str, Any], errors: list[FieldError]) -> None:
    low, high = spec.get("minStages", 1), spec.get("maxStages")
    if _is_int(low) and _is_int(high) and high < low:
        errors.append(FieldError("spec.maxStages", f"{high} is less than spec.minStages ({low})"))


def _check_layout(spec: Mapping[str, Any], pools: Mapping[str, int], num_layers: int | None,
                  errors: list[FieldError]) -> None:
    """A pinned layout covers layers 0..n-1 exactly, on pools of spec.pools, within the stage bounds."""
    layout = spec.get("layout")
    stages = layout.get("stages") if isinstance(layout, Mapping) else None
    if not isinstance(stages, list) or not stages:
        return
    expected, sound = 0, True
    for i, stage in enumerate(stages):
        if not isinstance(stage, Mapping):
            return
        pool, layers = stage.get("pool"), stage.get("layers")
        if isinstance(pool, str) and pools and pool not in pools:
            errors.append(FieldError(f"spec.layout.stages[{i}].pool", f"{pool!r} is not a pool of spec.pools; use "
                                                                      f"one of {', '.join(pools)}"))
        if not (isinstance(layers, list) and len(layers) == 2 and all(_is_int(x) for x in layers)):
            return
        start, end = layers
        where = f"spec.layout.stages[{i}].layers"
        if start != expected:
            kind = "a gap" if start > expected else "an overlap"
            errors.append(FieldError(where, f"starts at layer {start}, expected {expected} ({kind}: stages must "
                                            "cover the layers in order, each exactly once)"))
            sound = False
        if end <= start:
            errors.append(FieldError(where, f"[{start}, {end}) is empty; end is exclusive and must exceed start"))
            sound = False
        expected = end
    last = len(stages) - 1
    if num_layers is not None and expected != num_layers:
        errors.append(FieldError(f"spec.layout.stages[{last}].layers", f"the layout ends at layer {expected}; the "
                                 f"model has {num_layers} (num_hidden_layers of its config.json)"))
    low, high = spec.get("minStages", 1), spec.get("maxStages")
    if _is_int(low) and len(stages) < low:
        errors.append(FieldError("spec.layout.stages", f"{len(stages)} stage(s); spec.minStages is {low}"))
    if _is_int(high) and len(stages) > high:
        errors.append(FieldError("spec.layout.stages", f"{len(stages)} stages; spec.maxStages is {high}"))
    if sound:
        try:
            Layout.from_json({"stages": [{"pool": s.get("pool"), "layers": s["layers"],
                                          "stage_id": s.get("stageId", i)} for i, s in enumerate(stages)]})
        except LayoutError as e:
            errors.append(FieldError("spec.layout", str(e)))


def _check_policy_choice(spec: Mapping[str, Any], pools: Mapping[str, int], name: str | None,
                         referenced: Mapping[str, Any] | None, errors: list[FieldError]) -> None:
    has_ref, has_inline = "policy" in spec, "inlinePolicy" in spec
    if has_ref and has_inline:
        errors.append(FieldError("spec.inlinePolicy", "set spec.policy or spec.inlinePolicy, not both"))
        return
    if not (has_ref or has_inline or "layout" in spec):
        errors.append(FieldError("spec.policy", "required unless spec.layout pins the layout: name an "
                                                "AutoscalingPolicy, or give spec.inlinePolicy"))
    if spec.get("scaleToZero") is True and not (has_ref or has_inline):
        errors.append(FieldError("spec.scaleToZero", "needs spec.policy or spec.inlinePolicy (its "
                                                     "scale_to_zero.idle_seconds sets when to scale to zero)"))
    if has_inline:
        inline = spec["inlinePolicy"]
        # Its name defaults to the pipeline's; without that name at hand, any name will do.
        if name is None and isinstance(inline, Mapping):
            name = inline.get("name") if isinstance(inline.get("name"), str) else "inline"
        model, found = check_policy(inline, path="spec.inlinePolicy", name=name)
        errors += found
        if model is not None and pools:
            errors += _policy_pools(model, pools, lambda *loc: join("spec.inlinePolicy", *loc))
    elif has_ref and referenced is not None:
        ref = spec["policy"]
        model, found = check_policy(referenced, path="spec", name=ref if isinstance(ref, str) else None)
        if found:
            errors.append(FieldError("spec.policy", f"AutoscalingPolicy {ref!r} is invalid: {describe(found, 1)}"))
        elif model is not None and pools:
            errors += [FieldError("spec.policy", f"AutoscalingPolicy {ref!r}: {e}")
                       for e in _policy_pools(model, pools, lambda *loc: join("", *loc))]


def _policy_pools(model: AutoscalingPolicy, pools: Mapping[str, int], at: Any) -> list[FieldError]:
    """A policy may only allow, and pin to, pools that the pipeline defines."""
    valid = ", ".join(pools)
    errors = [FieldError(at("pools", i, "name"), f"{choice.name!r} is not a pool of spec.pools; use one of {valid}")
              for i, choice in enumerate(model.pools) if choice.name not in pools]
    if model.pin is not None:
        errors += [FieldError(at("pin", "stages", i, "pool"), f"{stage.pool!r} is not a pool of spec.pools; use "
                                                              f"one of {valid}")
                   for i, stage in enumerate(model.pin.stages) if stage.pool not in pools]
    return errors


def _check_resources(resources: object, errors: list[FieldError]) -> None:
    if not isinstance(resources, Mapping):
        return
    for kind in ("limits", "requests"):
        values = resources.get(kind)
        if isinstance(values, Mapping) and GPU_RESOURCE in values and str(values[GPU_RESOURCE]) != "1":
            errors.append(FieldError(join("spec.resources", kind, GPU_RESOURCE),
                                     f"is {values[GPU_RESOURCE]!r}; a stage uses one GPU (the operator sets "
                                     f"{GPU_RESOURCE}: 1), so leave it out"))
