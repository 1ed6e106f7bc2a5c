"""What changed between two versions of a dataset: the change summary.

A scientist told "a new version of sst" wants to know what is new. Each
version the persister saves carries a summary (in its manifest and its
C{saved} event, under C{changes}) computed from what DAP says of the
dataset and from its coordinate values, never from the data's bulk:

    {"from": VERSION or null, "to": VERSION, "first": bool,
     "text": "time 2020-01-01T00:00:00 → 2020-01-01T00:04:00 (was → 2020-01-01T00:02:00); variable added: salt",
     "coverage": {"time": {"units", "calendar", "before": SPAN or null, "after": SPAN or null}},
     "variables": {"added": [NAME...], "removed": [NAME...], "more": N},
     "dimensions": {"time": {"before": 3, "after": 5}},
     "shapes": [{"variable", "before": [3], "after": [5]}], "types": [{"variable", "before", "after"}],
     "more_shapes": N, "more_types": N,
     "attributes": {"added": [{"variable", "name", "type", "value"}], "removed": [...],
                    "changed": [{"variable", "name", "before": {"type", "value"}, "after": {...}}],
                    "count": N, "more": N},
     "sha256": {"NAME.das": {"before": HEX or null, "after": HEX or null}, ... .dds, .dods, .nc}}

- C{coverage}: each coordinate variable's span (L{ooidx.dissemination.netcdf.coverage}:
  count, first, last, min, max, and for a CF time its start and end as
  dates decoded with its C{units} and C{calendar}); a time always, any
  other coordinate when its span changed;
- C{variables}, C{dimensions}, C{shapes}, C{types}: from the two DDSs;
- C{attributes}: from the two DASs, with their declared types; the
  attributes of variables added or removed are not listed again, nor
  pydap's C{dimensions} container (the sizes C{dimensions} already gives).
  Bounded: at most C{limit} (L{LIMIT}) entries in all, C{count} says how
  many there are and C{more} how many are not listed; values are shortened
  (L{MAX_TEXT} characters, L{MAX_VALUES} numbers);
- C{sha256}: of each response of both versions, from their manifests.

Pure functions and blocking file reads (the persister runs them in its disk
threads); L{summarize} compares two L{profile}s.
"""
from __future__ import annotations

import json
import math
import os
from typing import Any, Dict, List, Optional, Tuple
from urllib.parse import unquote

from ooidx.dissemination.netcdf import das_attributes, netcdf_coverage

__all__ = ["LIMIT", "MAX_LIMIT", "profile", "profile_of", "summarize", "describe", "MAX_TEXT", "MAX_VALUES",
           "MAX_NAMES"]

#: Attribute changes listed by default (the rest are counted).
LIMIT = 20
#: The most a caller may ask to be listed.
MAX_LIMIT = 1000
#: Names listed per list of variables, shapes and types (the rest are counted).
MAX_NAMES = 50
#: Characters of an attribute's text shown.
MAX_TEXT = 200
#: Numbers of an attribute shown.
MAX_VALUES = 16
#: The responses whose sha256 the summary gives (NAME + each).
RESPONSES = (".das", ".dds", ".dods", ".nc")

Profile = Dict[str, Any]


# --------------------------------------------------------------------------- #
# what a version is, for comparing


def profile(name: str, version: Optional[str], das: Optional[str], dds: Optional[str],
            coverage: Optional[Dict[str, Any]], files: Optional[Dict[str, Any]]) -> Profile:
    """What L{summarize} compares of one version: its variables (DDS), typed
    attributes (DAS), coordinate coverage and the sha256 of its responses."""
    variables, dimensions = _variables(dds) if dds else ({}, {})
    attributes = _attributes(das, dimensions) if das else {}
    shas = {name + suffix: ((files or {}).get(name + suffix) or {}).get("sha256") for suffix in RESPONSES}
    return {"version": version, "variables": variables, "dimensions": dimensions, "attributes": attributes,
            "coverage": dict(coverage or {}), "sha256": shas}


def profile_of(version_dir: str, name: str) -> Profile:
    """L{profile} of a saved version's directory. Its coverage is the
    manifest's, or (a version saved before manifests kept it) read from its
    netCDF file. FileNotFoundError without a readable manifest."""
    manifest = _read_json(os.path.join(version_dir, "manifest.json"))
    if manifest is None:
        raise FileNotFoundError(f"no readable manifest in {version_dir}")
    coverage = manifest.get("coverage")
    if not isinstance(coverage, dict):
        coverage = {}
        nc = os.path.join(version_dir, name + ".nc")
        if os.path.exists(nc):
            try:
                coverage = netcdf_coverage(nc)
            except Exception:  # noqa: BLE001 - a file netCDF4 cannot read: no coverage to compare
                coverage = {}
    return profile(name, manifest.get("version") or os.path.basename(version_dir),
                   _read_text(os.path.join(version_dir, name + ".das")),
                   _read_text(os.path.join(version_dir, name + ".dds")), coverage, manifest.get("files"))


def _variables(dds: str) -> Tuple[Dict[str, Dict[str, Any]], Dict[str, int]]:
    """name -> {"type", "dimensions", "shape"} of every array of a DDS, and the dimensions' sizes."""
    from pydap.lib import walk
    from pydap.model import BaseType
    from pydap.parsers.dds import dds_to_dataset

    try:
        dataset = dds_to_dataset(dds)
    except Exception:  # noqa: BLE001 - pydap raises what it raises: nothing to compare
        return {}, {}
    variables: Dict[str, Dict[str, Any]] = {}
    dimensions: Dict[str, int] = {}
    for var in walk(dataset, BaseType):
        name = unquote(str(var.id))
        shape = [int(n) for n in (var.shape or ())]
        dims = [unquote(str(d)) for d in (var.dims or ())]
        if len(dims) != len(shape):
            dims = []
        for dim, size in zip(dims, shape):
            dimensions.setdefault(dim, size)
        variables[name] = {"type": _dap_type(var), "dimensions": dims, "shape": shape}
    return variables, dimensions


def _dap_type(var: Any) -> str:
    from pydap.lib import NUMPY_TO_DAP2_TYPEMAP

    dtype = getattr(var, "dtype", None)
    if dtype is None:
        return "?"
    return NUMPY_TO_DAP2_TYPEMAP.get(dtype.char, dtype.str)


def _attributes(das: str, dimensions: Dict[str, int]) -> Dict[str, Dict[str, Any]]:
    """"CONTAINER" -> name -> (type, values) ("" for the top level)."""
    out: Dict[str, Dict[str, Any]] = {}
    for path, attributes in das_attributes(das).items():
        if path == ("dimensions",) and set(attributes) <= set(dimensions):
            continue  # pydap's dimension sizes: the DDS's, compared as such
        out[".".join(path)] = {k: [t, list(v)] for k, (t, v) in attributes.items()}
    return out


# --------------------------------------------------------------------------- #
# comparing


def summarize(before: Optional[Profile], after: Profile, limit: int = LIMIT) -> Dict[str, Any]:
    """The change summary from C{before} (None for a first version) to C{after}."""
    limit = max(0, min(int(limit), MAX_LIMIT))
    first = before is None
    old: Profile = before if before is not None else profile("", None, None, None, None, None)
    out: Dict[str, Any] = {"from": old.get("version"), "to": after.get("version"), "first": first}
    out["coverage"] = _coverage(old["coverage"], after["coverage"], first)
    added = sorted(set(after["variables"]) - set(old["variables"]))
    removed = sorted(set(old["variables"]) - set(after["variables"]))
    out["variables"] = {"added": added[:MAX_NAMES], "removed": removed[:MAX_NAMES],
                        "more": max(0, len(added) - MAX_NAMES) + max(0, len(removed) - MAX_NAMES)}
    if first:
        out["dimensions"], out["shapes"], out["types"], out["more_shapes"], out["more_types"] = {}, [], [], 0, 0
        out["attributes"] = {"added": [], "removed": [], "changed": [], "count": 0, "more": 0}
    else:
        out["dimensions"] = {dim: {"before": old["dimensions"].get(dim), "after": after["dimensions"].get(dim)}
                             for dim in sorted(set(old["dimensions"]) | set(after["dimensions"]))
                             if old["dimensions"].get(dim) != after["dimensions"].get(dim)}
        common = sorted(set(old["variables"]) & set(after["variables"]))
        shapes = [{"variable": v, "before": old["variables"][v]["shape"], "after": after["variables"][v]["shape"]}
                  for v in common if old["variables"][v]["shape"] != after["variables"][v]["shape"]]
        types = [{"variable": v, "before": old["variables"][v]["type"], "after": after["variables"][v]["type"]}
                 for v in common if old["variables"][v]["type"] != after["variables"][v]["type"]]
        out["shapes"], out["types"] = shapes[:MAX_NAMES], types[:MAX_NAMES]
        out["more_shapes"] = max(0, len(shapes) - MAX_NAMES)
        out["more_types"] = max(0, len(types) - MAX_NAMES)
        out["attributes"] = _attribute_diff(old["attributes"], after["attributes"], set(added) | set(removed),
                                            limit)
    out["sha256"] = {f: {"before": old["sha256"].get(f), "after": sha} for f, sha in after["sha256"].items()}
    out["text"] = describe(out)
    return out


def _coverage(before: Dict[str, Any], after: Dict[str, Any], first: bool) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for name in sorted(set(before) | set(after)):
        old, new = before.get(name), after.get(name)
        timelike = any(isinstance(s, dict) and "units" in s for s in (old, new))
        if not (timelike or (old != new and not first)):
            continue
        entry: Dict[str, Any] = {"before": _span(old), "after": _span(new)}
        for key in ("units", "calendar"):
            value = (new or {}).get(key) or (old or {}).get(key)
            if value is not None:
                entry[key] = value
        out[name] = entry
    return out


def _span(span: Any) -> Optional[Dict[str, Any]]:
    if not isinstance(span, dict):
        return None
    return {k: v for k, v in span.items() if k not in ("units", "calendar")}


def _attribute_diff(before: Dict[str, Dict[str, Any]], after: Dict[str, Dict[str, Any]], skip: set,
                    limit: int) -> Dict[str, Any]:
    added: List[Dict[str, Any]] = []
    removed: List[Dict[str, Any]] = []
    changed: List[Dict[str, Any]] = []
    for container in sorted(set(before) | set(after)):
        if container in skip:
            continue
        old, new = before.get(container, {}), after.get(container, {})
        for key in sorted(set(old) | set(new)):
            if key not in old:
                added.append(dict(variable=container, name=key, **_shown(new[key])))
            elif key not in new:
                removed.append(dict(variable=container, name=key, **_shown(old[key])))
            elif _same(old[key], new[key]) is False:
                changed.append({"variable": container, "name": key, "before": _shown(old[key]),
                                "after": _shown(new[key])})
    count = len(added) + len(removed) + len(changed)
    room = limit
    listed = {}
    for kind, entries in (("changed", changed), ("added", added), ("removed", removed)):
        listed[kind] = entries[:room]
        room -= len(listed[kind])
    return {"added": listed["added"], "removed": listed["removed"], "changed": listed["changed"],
            "count": count, "more": count - sum(len(v) for v in listed.values())}


def _same(a: List[Any], b: List[Any]) -> bool:
    return json.dumps(a, default=repr) == json.dumps(b, default=repr)


def _shown(typed: List[Any]) -> Dict[str, Any]:
    """{"type", "value"} of an attribute, JSON-safe and short."""
    dap_type, values = typed[0], list(typed[1])
    if str(dap_type).lower() in ("string", "url"):
        text = "\n".join(str(v) for v in values)
        value: Any = text if len(text) <= MAX_TEXT else text[:MAX_TEXT - 1] + "…"
    else:
        numbers = [_number(v) for v in values[:MAX_VALUES]]
        if len(values) > MAX_VALUES:
            numbers.append(f"… ({len(values)} values)")
        value = numbers[0] if len(numbers) == 1 else numbers
    return {"type": dap_type, "value": value}


def _number(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # NaN and infinities are not JSON
    return value if isinstance(value, (int, float)) else str(value)[:MAX_TEXT]


# --------------------------------------------------------------------------- #
# in words


def describe(changes: Dict[str, Any]) -> str:
    """One line a person reads (a notice, a feed entry) for a summary."""
    parts: List[str] = []
    for name, entry in (changes.get("coverage") or {}).items():
        before, after = entry.get("before"), entry.get("after")
        if "units" in entry:
            if after is None:
                parts.append(f"{name} removed")
            elif changes.get("first") or before is None:
                parts.append(f"{name} {_when(after, 'start')} → {_when(after, 'end')} ({after.get('count')} values)")
            elif before != after:
                was = f"{_when(before, 'start')} → {_when(before, 'end')}"
                parts.append(f"{name} {_when(after, 'start')} → {_when(after, 'end')} (was {was}; "
                             f"{before.get('count')} → {after.get('count')} values)")
        elif before != after and before is not None and after is not None:
            parts.append(f"{name} {_num(before, 'min')}..{_num(before, 'max')} → {_num(after, 'min')}.."
                         f"{_num(after, 'max')}")
    variables = changes.get("variables") or {}
    if changes.get("first"):
        parts.insert(0, f"first version: {len(variables.get('added') or []) + (variables.get('more') or 0)} "
                        "variable(s)")
    else:
        for kind in ("added", "removed"):
            names = variables.get(kind) or []
            if names:
                parts.append(f"variable{'s' if len(names) > 1 else ''} {kind}: {', '.join(names)}")
        for dim, sizes in (changes.get("dimensions") or {}).items():
            parts.append(f"dimension {dim} {sizes.get('before')} → {sizes.get('after')}")
        if changes.get("types"):
            parts.append(f"{len(changes['types']) + changes.get('more_types', 0)} type(s) changed")
        attributes = changes.get("attributes") or {}
        if attributes.get("count"):
            counts = {k: len(attributes.get(k) or []) for k in ("added", "removed", "changed")}
            listed = ", ".join(f"{n} {k}" for k, n in counts.items() if n)
            more = f", {attributes['more']} more" if attributes.get("more") else ""
            parts.append(f"attributes: {listed}{more}" if listed else f"attributes: {attributes['count']} changed")
    if not parts:
        parts.append("new values; same variables, shapes, attributes and coverage")
    return "; ".join(parts)


def _when(span: Dict[str, Any], key: str) -> str:
    value = span.get(key)
    if value is None:
        value = span.get("first" if key == "start" else "last")
    return str(value)


def _num(span: Dict[str, Any], key: str) -> str:
    value = span.get(key)
    return f"{value:g}" if isinstance(value, (int, float)) else str(value)


# --------------------------------------------------------------------------- #
# files


def _read_text(path: str) -> Optional[str]:
    try:
        with open(path, "rb") as f:
            return f.read().decode("utf-8", "replace")
    except OSError:
        return None


def _read_json(path: str) -> Optional[Dict[str, Any]]:
    try:
        with open(path, "rb") as f:
            value = json.loads(f.read())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None
