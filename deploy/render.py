"""Render a kustomization offline: the subset of kustomize that deploy/k8s uses, in Python.

Why: CI has no ``kubectl kustomize`` / ``kustomize`` binary (and no network to fetch one), and no PyPI
package renders kustomizations offline. What it does, as kustomize v5 does it:

- ``resources``: YAML files and other kustomization folders (recursively);
- ``configMapGenerator``: ``envs``, ``files`` (``key=path`` too), ``literals``, ``behavior``
  (create / merge / replace), ``options`` (``labels``, ``annotations``, ``disableNameSuffixHash``); the
  name gets kustomize's content-hash suffix (same hash, so names match the real tool's);
- ``patches`` with a ``target`` and a JSON 6902 patch file (add / replace / remove);
- ``images`` (newName / newTag / digest) on every ``containers`` / ``initContainers`` list;
- ``namespace`` on namespaced objects;
- name references: a generated ConfigMap's final name is written wherever a pod template names it, plus
  the ``nameReference`` field specs of ``configurations`` files (for CRDs).

Anything else in a kustomization is refused (``UnsupportedError``), so the renderer never silently
renders something kustomize would not. Like kustomize, files must lie in or below the kustomization's
folder. ``tests/test_deploy_manifests.py`` compares the output with ``kubectl kustomize`` where one is
installed.

    python -m deploy.render deploy/k8s/overlays/cpu > cpu.yaml
"""

from __future__ import annotations

import copy
import hashlib
import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

SUPPORTED_KEYS = {"apiVersion", "kind", "resources", "namespace", "images", "configMapGenerator", "patches",
                  "configurations"}
# Kinds without a namespace (the ones a kustomization here could plausibly hold).
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition", "APIService",
                  "PriorityClass", "StorageClass", "PersistentVolume", "ValidatingWebhookConfiguration",
                  "MutatingWebhookConfiguration"}
POD_TEMPLATE_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"}
# Internal marker on generated ConfigMaps: {"hash": bool}; removed before output.
GENERATED = "__nnserve_generated__"


class UnsupportedError(ValueError):
    """A kustomization uses something this renderer does not implement."""


@dataclass
class Build:
    objects: list[dict] = field(default_factory=list)
    # (kind of the referenced object, kind of the referrer, path in the referrer as a list of keys)
    name_references: list[tuple[str, str, list[str]]] = field(default_factory=list)


def render(folder: str | Path) -> list[dict]:
    """The objects ``kustomize build folder`` outputs (order aside)."""
    build = _build(Path(folder).resolve())
    renamed: dict[tuple[str, str], str] = {}
    for obj in build.objects:
        marker = obj.pop(GENERATED, None)
        if marker and marker["hash"]:
            old = obj["metadata"]["name"]
            obj["metadata"]["name"] = f"{old}-{configmap_hash(obj)}"
            renamed[(obj["kind"], old)] = obj["metadata"]["name"]
    for obj in build.objects:
        for ref_kind, path in _reference_paths(obj, build.name_references):
            for holder in _walk(obj, path[:-1]):
                key = path[-1]
                if isinstance(holder, dict) and (ref_kind, holder.get(key)) in renamed:
                    holder[key] = renamed[(ref_kind, holder[key])]
    return build.objects


def dump(objects: list[dict]) -> str:
    return "---\n".join(yaml.safe_dump(obj, sort_keys=True, width=120) for obj in objects)


def configmap_hash(obj: dict) -> str:
    """kustomize's name suffix of a generated ConfigMap: sha256 of the Go JSON encoding of
    {data, kind, name: ""} (keys sorted, HTML characters escaped as Go does), first 10 hex digits with
    0 1 3 a e replaced by g h k m t (so the suffix never reads as a number or a word)."""
    content: dict[str, Any] = {"data": obj.get("data", {}), "kind": obj["kind"], "name": ""}
    if obj.get("binaryData"):
        content["binaryData"] = obj["binaryData"]
    text = json.dumps(content, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    for char, escaped in (("&", "\\u0026"), ("<", "\\u003c"), (">", "\\u003e"), ("\u2028", "\\u2028"),
                          ("\u2029", "\\u2029")):
        text = text.replace(char, escaped)
    return hashlib.sha256(text.encode()).hexdigest()[:10].translate(str.maketrans("013ae", "ghkmt"))


# -- one kustomization ------------------------------------------------------------------------------


def _build(folder: Path) -> Build:
    kfile = folder / "kustomization.yaml"
    if not kfile.is_file():
        raise FileNotFoundError(f"{folder}: no kustomization.yaml")
    spec = yaml.safe_load(kfile.read_text()) or {}
    unsupported = set(spec) - SUPPORTED_KEYS
    if unsupported:
        raise UnsupportedError(f"{kfile}: {sorted(unsupported)} not supported by deploy/render.py")
    build = Build()
    for entry in spec.get("resources", []):
        path = (folder / entry).resolve()
        if path.is_dir():
            sub = _build(path)  # another kustomization: its own root, so no containment check
            build.objects += sub.objects
            build.name_references += sub.name_references
        else:
            build.objects += _load_documents(_inside(folder, entry))
    for config in spec.get("configurations", []):
        build.name_references += _name_references(yaml.safe_load(_inside(folder, config).read_text()))
    for generator in spec.get("configMapGenerator", []):
        _generate_configmap(folder, generator, build.objects)
    for patch in spec.get("patches", []):
        _apply_patch(folder, patch, build.objects)
    for image in spec.get("images", []):
        for obj in build.objects:
            _set_image(obj, image)
    if "namespace" in spec:
        for obj in build.objects:
            if obj["kind"] not in CLUSTER_SCOPED:
                obj.setdefault("metadata", {})["namespace"] = spec["namespace"]
    return build


def _inside(folder: Path, relative: str) -> Path:
    """kustomize's load restriction: a file must be in or below the kustomization's folder."""
    path = (folder / relative).resolve()
    if not path.is_relative_to(folder):
        raise UnsupportedError(f"{relative}: not in or below {folder} (kustomize refuses it)")
    return path


def _load_documents(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def _generate_configmap(folder: Path, generator: dict, objects: list[dict]) -> None:
    unsupported = set(generator) - {"name", "envs", "files", "literals", "behavior", "options"}
    if unsupported:
        raise UnsupportedError(f"configMapGenerator {generator.get('name')}: {sorted(unsupported)}")
    data: dict[str, str] = {}
    for env_file in generator.get("envs", []):
        data.update(_parse_env(_inside(folder, env_file).read_text()))
    for literal in generator.get("literals", []):
        key, _, value = literal.partition("=")
        data[key] = value
    for entry in generator.get("files", []):
        key, _, relative = entry.rpartition("=")
        path = _inside(folder, relative)
        data[key or path.name] = path.read_text()
    options = generator.get("options", {})
    behavior = generator.get("behavior", "create")
    name = generator["name"]
    existing = [o for o in objects if o["kind"] == "ConfigMap" and o["metadata"]["name"] == name and GENERATED in o]
    if behavior == "create":
        if existing:
            raise UnsupportedError(f"configMapGenerator {name}: exists already (use behavior merge or replace)")
        obj: dict[str, Any] = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name}}
        objects.append(obj)
    elif behavior in ("merge", "replace"):
        if len(existing) != 1:
            raise UnsupportedError(f"configMapGenerator {name}: behavior {behavior} needs one generated {name}")
        obj = existing[0]
        if behavior == "merge":
            data = {**obj.get("data", {}), **data}
    else:
        raise UnsupportedError(f"configMapGenerator {name}: behavior {behavior!r}")
    obj["data"] = data
    for meta_key in ("labels", "annotations"):
        if options.get(meta_key):
            obj["metadata"].setdefault(meta_key, {}).update(options[meta_key])
    obj[GENERATED] = {"hash": not options.get("disableNameSuffixHash", False)}


def _parse_env(text: str) -> dict[str, str]:
    """kustomize's env file: KEY=VALUE lines, # comments and blank lines skipped, values taken as written."""
    data = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        if not sep:
            raise UnsupportedError(f"env line without '=': {line!r}")
        data[key] = value
    return data


def _apply_patch(folder: Path, patch: dict, objects: list[dict]) -> None:
    if set(patch) != {"path", "target"}:
        raise UnsupportedError(f"patch {patch}: only path + target (JSON 6902) is supported")
    operations = yaml.safe_load(_inside(folder, patch["path"]).read_text())
    if not isinstance(operations, list):
        raise UnsupportedError(f"{patch['path']}: only JSON 6902 patches (a list of operations) are supported")
    targets = [o for o in objects if _matches(o, patch["target"])]
    if not targets:
        raise UnsupportedError(f"patch {patch['path']}: no object matches {patch['target']}")
    for obj in targets:
        for op in operations:
            _json_patch(obj, op)


def _matches(obj: dict, target: dict) -> bool:
    group, _, version = obj["apiVersion"].rpartition("/")
    wanted = {"kind": obj["kind"], "name": obj["metadata"]["name"], "group": group, "version": version,
              "namespace": obj["metadata"].get("namespace")}
    unsupported = set(target) - set(wanted)
    if unsupported:
        raise UnsupportedError(f"patch target {target}: {sorted(unsupported)} not supported")
    return all(wanted[key] == value for key, value in target.items())


def _json_patch(obj: dict, op: dict) -> None:
    """RFC 6902 add / replace / remove on a JSON pointer (``-`` appends to a list)."""
    keys = [k.replace("~1", "/").replace("~0", "~") for k in op["path"].split("/")[1:]]
    parent: Any = obj
    for key in keys[:-1]:
        parent = parent[int(key)] if isinstance(parent, list) else parent[key]
    last = keys[-1]
    kind = op["op"]
    if isinstance(parent, list):
        index = len(parent) if last == "-" else int(last)
        if kind == "add":
            parent.insert(index, copy.deepcopy(op["value"]))
        elif kind == "replace":
            parent[index] = copy.deepcopy(op["value"])
        elif kind == "remove":
            del parent[index]
        else:
            raise UnsupportedError(f"JSON patch op {kind!r}")
    elif kind in ("add", "replace"):
        if kind == "replace" and last not in parent:
            raise KeyError(f"JSON patch replace: {op['path']} does not exist")
        parent[last] = copy.deepcopy(op["value"])
    elif kind == "remove":
        del parent[last]
    else:
        raise UnsupportedError(f"JSON patch op {kind!r}")


def _set_image(obj: Any, image: dict) -> None:
    """kustomize's images transformer: every container whose image is ``name`` (any tag)."""
    if isinstance(obj, list):
        for item in obj:
            _set_image(item, image)
        return
    if not isinstance(obj, dict):
        return
    for key, value in obj.items():
        if key in ("containers", "initContainers") and isinstance(value, list):
            for container in value:
                current = container.get("image", "")
                name = current.split("@")[0].rsplit(":", 1)[0] if ":" in current.split("/")[-1] else current
                if name == image["name"]:
                    new = image.get("newName", name)
                    if "digest" in image:
                        new += "@" + image["digest"]
                    elif "newTag" in image:
                        new += ":" + str(image["newTag"])
                    elif current != name:
                        new += current[len(name):]
                    container["image"] = new
        _set_image(value, image)


# -- name references ---------------------------------------------------------------------------------


def _name_references(config: dict) -> list[tuple[str, str, list[str]]]:
    out = []
    for ref in (config or {}).get("nameReference", []):
        for spec in ref.get("fieldSpecs", []):
            out.append((ref["kind"], spec["kind"], spec["path"].split("/")))
    return out


def _reference_paths(obj: dict, extra: list[tuple[str, str, list[str]]]) -> Iterator[tuple[str, list[str]]]:
    """Where ``obj`` names a ConfigMap: kustomize's built-in pod-spec paths, then the configured ones."""
    pod_roots = {"Pod": ["spec"], **{kind: ["spec", "template", "spec"] for kind in POD_TEMPLATE_KINDS}}
    if obj["kind"] in pod_roots:
        root = pod_roots[obj["kind"]]
        for containers in ("containers", "initContainers"):
            yield "ConfigMap", [*root, containers, "envFrom", "configMapRef", "name"]
            yield "ConfigMap", [*root, containers, "env", "valueFrom", "configMapKeyRef", "name"]
        yield "ConfigMap", [*root, "volumes", "configMap", "name"]
        yield "ConfigMap", [*root, "volumes", "projected", "sources", "configMap", "name"]
    for ref_kind, kind, path in extra:
        if kind == obj["kind"]:
            yield ref_kind, path


def _walk(node: Any, keys: list[str]) -> Iterator[Any]:
    """Every node at ``keys`` below ``node``, stepping into every item of the lists on the way (as
    kustomize's field specs do)."""
    if isinstance(node, list):
        for item in node:
            yield from _walk(item, keys)
        return
    if not keys:
        yield node
        return
    if isinstance(node, dict) and keys[0] in node:
        yield from _walk(node[keys[0]], keys[1:])


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m deploy.render KUSTOMIZATION_FOLDER", file=sys.stderr)
        return 2
    sys.stdout.write(dump(render(argv[0])))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
