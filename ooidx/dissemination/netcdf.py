"""A DAP 2 dataset (.das + .dods) as a netCDF4 file, decoded with pydap's parsers.

No bus and no reactor here: blocking work for a thread (the persister runs it
in its disk threads). The DDS is the one at the head of the C{.dods} (it
describes exactly the data that follows; the separate C{.dds} answer is the
same text for an unconstrained request), parsed by
C{pydap.parsers.dds.dds_to_dataset}; the data is unpacked by
C{pydap.handlers.dap.unpack_dap2_data}; the attributes come from the C{.das}
(C{pydap.parsers.das.parse_das} / C{add_attributes}).

What is written:

- every array (C{BaseType}) as a variable with its DDS dimensions (a
  dimension name met again with another size gets a suffix, C{time_1});
- a Grid as its array and its maps (maps once, as coordinate variables);
- a Structure's members as C{STRUCT.MEMBER} variables;
- Sequences cannot be laid out as netCDF arrays: they are left out and
  named in the result's C{skipped};
- attributes: the DAS's top-level scalars and C{NC_GLOBAL} as global
  attributes, each variable's scalars and lists as its attributes
  (C{_FillValue} at creation); nested containers are left out.
- attribute types: the type the DAS declares (L{das_attributes}):
  C{Float32 valid_range -5, 40} is written as two 32-bit floats, C{Int16
  flag_values} as 16-bit integers, C{Byte} as an unsigned byte (a signed one
  when a value is negative, as servers write netCDF's signed bytes), so the
  file has the upstream's types (CF wants C{valid_range} and C{_FillValue}
  in the variable's type). Without a type (a DAS that does not parse) the
  value is written as pydap read it;
- coordinates (L{coverage}): each coordinate variable's count, first, last,
  smallest and largest value, and for a time (CF C{units} "UNIT since DATE")
  the first and last as dates, decoded with C{cftime} and its C{calendar}:
  the persister keeps it in the manifest, what a version's change summary
  (L{ooidx.dissemination.changes}) compares.

pydap loads the whole data into memory (its unpacker takes it all at once),
so the caller bounds the size it converts.

netCDF-C / HDF5 are not thread-safe: two threads writing files at once crash
the process. Every netCDF4 call here holds L{NETCDF_LOCK}, one lock for the
whole process (several persisters in one process, each with its threads,
share it); other code of the process that opens netCDF files in a thread
should hold it too.
"""
from __future__ import annotations

import threading
from typing import Any, Dict, List, Optional, Tuple
from urllib.parse import unquote

from ooidx import dap

__all__ = ["DATA_MARKER", "NETCDF_LOCK", "DecodeError", "decode", "to_netcdf", "write_netcdf", "das_attributes",
           "typed_value", "coverage", "netcdf_coverage", "MAX_COORDINATES"]

#: Held around every use of the netCDF4 library (it is not thread-safe).
NETCDF_LOCK = threading.Lock()

DATA_MARKER = dap.DATA_MARKER
#: How far into the .dods its DDS may reach.
MAX_DDS = 16 * 1024 * 1024
#: The most coordinate variables whose coverage is kept (a version's manifest stays small).
MAX_COORDINATES = 32

#: DAS attribute type (lower case) -> numpy type. DAP 2 has Byte (unsigned) to
#: Float64; the DAP 4 names are taken too, for servers that write them.
DAS_NUMPY_TYPES = {"byte": "u1", "int8": "i1", "uint8": "u1", "int16": "i2", "uint16": "u2", "int32": "i4",
                   "uint32": "u4", "int64": "i8", "uint64": "u8", "float32": "f4", "float64": "f8", "int": "i4",
                   "uint": "u4"}

#: A container of a DAS: its path (() for the top level, ("temp",), ("NC_GLOBAL",), ("s", "member")).
Path = Tuple[str, ...]
#: A typed attribute: (DAP type as the DAS writes it, its values).
Typed = Tuple[str, List[Any]]


class DecodeError(ValueError):
    """The DAP responses cannot be decoded (not a DAP 2 data response, a DDS
    pydap cannot parse, data that does not match it)."""


def decode(dods: Any, das: Optional[str] = None) -> Tuple[Any, List[Any]]:
    """(pydap dataset with the DAS's attributes, unpacked data) of a C{.dods}
    response in a binary file object."""
    try:
        return dap.decode_dods(dods, das, MAX_DDS)
    except dap.DodsError as e:
        raise DecodeError({
            "marker": "the .dods has no 'Data:' marker (not a DAP 2 data response)",
            "dds": f"the .dods's DDS does not parse: {e.detail}",
        }.get(e.part, f"the .dods's data does not decode: {e.detail}")) from None


def to_netcdf(dods_path: str, nc_path: str, das: Optional[str] = None) -> Dict[str, Any]:
    """Decode the C{.dods} file at C{dods_path} and write C{nc_path}.

    L{DecodeError} if the responses do not decode (nothing is written then);
    any other exception is a failure to write (the caller removes the file).
    Returns C{{"variables": [...], "skipped": [...]}}."""
    with open(dods_path, "rb") as f:
        dataset, data = decode(f, das)
    return write_netcdf(dataset, data, nc_path, das_attributes(das) if das else None)


def write_netcdf(dataset: Any, data: List[Any], nc_path: str,
                 types: Optional[Dict[Path, Dict[str, Typed]]] = None) -> Dict[str, Any]:
    """Write a decoded dataset (L{decode}'s result) as netCDF4 at C{nc_path};
    C{types}, L{das_attributes} of its DAS, gives the attributes their types.
    The result: C{{"variables", "skipped", "coverage"}} (L{coverage})."""
    import netCDF4

    arrays, skipped = _arrays(dataset, data)
    with NETCDF_LOCK:
        result = _write(netCDF4, arrays, skipped, dataset.attributes, nc_path, types or {})
    result["coverage"] = coverage((name, array, dims, attrs) for name, array, dims, attrs, _ in arrays)
    return result


def _write(netCDF4: Any, arrays: List[Any], skipped: List[str], attributes: Dict[str, Any],
           nc_path: str, types: Dict[Path, Dict[str, Typed]]) -> Dict[str, Any]:
    written: List[str] = []
    with netCDF4.Dataset(nc_path, "w", format="NETCDF4") as nc:
        global_types = _types_at(types, [(), ("NC_GLOBAL",), ("DODS_EXTRA",)])
        for key, value in _global_attributes(attributes).items():
            _set_attribute(nc, key, _with_type(value, global_types.get(key)))
        sizes: Dict[str, int] = {}
        for name, array, dims, var_attributes, paths in arrays:
            var_types = _types_at(types, paths)
            dims = _dimensions(nc, sizes, name, array.shape, dims)
            fill = var_attributes.get("_FillValue")
            kind = str if array.dtype.kind in "SUO" else array.dtype.newbyteorder("=")
            fill_value = _fill(fill, array) if kind is not str else None
            var = nc.createVariable(name, kind, dims, fill_value=fill_value if fill_value is not None else False)
            var.set_auto_maskandscale(False)
            for key, value in var_attributes.items():
                if key != "_FillValue":
                    _set_attribute(var, key, _with_type(value, var_types.get(key)))
            if kind is str:
                var[...] = _as_text(array)
            else:
                var[...] = array.astype(kind, copy=False)
            written.append(name)
    return {"variables": written, "skipped": skipped}


# --------------------------------------------------------------------------- #
# laying out the dataset


def _arrays(dataset: Any, data: List[Any]) -> Tuple[List[Tuple[str, Any, Tuple[str, ...], Dict[str, Any],
                                                                List[Path]]], List[str]]:
    """(name, numpy array, dimension names, attributes, the DAS containers that may
    hold its attributes) of every variable; names skipped."""
    import numpy as np
    from pydap.model import BaseType, GridType, SequenceType, StructureType

    out: List[Tuple[str, Any, Tuple[str, ...], Dict[str, Any], List[Path]]] = []
    seen: set = set()
    skipped: List[str] = []

    def add(var: Any, value: Any, prefix: str = "") -> None:
        name = prefix + unquote(var.name)
        if isinstance(var, SequenceType):
            skipped.append(name)
        elif isinstance(var, GridType):
            for part, part_value in zip(var.children(), value):
                part_name = unquote(part.name)
                if part_name in seen:
                    continue
                add(part, part_value, prefix)
        elif isinstance(var, StructureType):
            for child, child_value in zip(var.children(), value):
                add(child, child_value, name + ".")
        elif isinstance(var, BaseType):
            if name in seen:
                return
            seen.add(name)
            array = np.asarray(value)
            dims = tuple(unquote(d) for d in (var.dims or ()))
            if len(dims) != array.ndim:
                dims = tuple(f"{name}_dim{i}" for i in range(array.ndim))
            ident = tuple(unquote(part) for part in str(var.id or name).split("."))
            paths = [ident, (".".join(ident),), tuple(name.split(".")), (name,)]
            out.append((name, array, dims, dict(var.attributes or {}), paths))
        else:
            skipped.append(name)

    for var, value in zip(dataset.children(), data):
        add(var, value)
    return out, skipped


def _dimensions(nc: Any, sizes: Dict[str, int], name: str, shape: Tuple[int, ...],
                dims: Tuple[str, ...]) -> Tuple[str, ...]:
    """The netCDF dimensions for an array, created as needed; a name already
    used with another size gets a suffix."""
    out = []
    for dim, size in zip(dims, shape):
        candidate, n = dim, 0
        while candidate in sizes and sizes[candidate] != size:
            n += 1
            candidate = f"{dim}_{n}"
        if candidate not in sizes:
            nc.createDimension(candidate, size)
            sizes[candidate] = size
        out.append(candidate)
    return tuple(out)


def _global_attributes(attributes: Dict[str, Any]) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for key, value in (attributes or {}).items():
        if key in ("NC_GLOBAL", "DODS_EXTRA") and isinstance(value, dict):
            out.update({k: v for k, v in value.items() if not isinstance(v, dict)})
        elif not isinstance(value, dict):
            out[key] = value
    return out


def _set_attribute(target: Any, key: str, value: Any) -> None:
    import numpy as np

    if isinstance(value, dict) or value is None or not key:
        return
    if isinstance(value, (list, tuple)):
        if not value:
            return
        if all(isinstance(v, str) for v in value):
            value = "\n".join(value)
        else:
            try:
                value = np.asarray(value)
            except (TypeError, ValueError):
                return
            if value.dtype.kind not in "iufb":
                return
    try:
        target.setncattr(key, value)
    except (TypeError, ValueError, AttributeError, RuntimeError):
        # an attribute netCDF cannot hold (or a reserved name): keep it as text
        try:
            target.setncattr(key, str(value))
        except Exception:  # noqa: BLE001 - an attribute is not worth failing the file for
            pass


def _fill(value: Any, array: Any) -> Any:
    import numpy as np

    if value is None or isinstance(value, (dict, str)):
        return None
    if isinstance(value, (list, tuple)):
        value = value[0] if value else None
    try:
        return np.asarray(value).astype(array.dtype.newbyteorder("=")).item()
    except (TypeError, ValueError, OverflowError):
        return None


def _as_text(array: Any) -> Any:
    import numpy as np

    flat = [v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v) for v in array.reshape(-1)]
    return np.array(flat, dtype=object).reshape(array.shape)


# --------------------------------------------------------------------------- #
# attribute types, as the DAS declares them


def das_attributes(das: str) -> Dict[Path, Dict[str, Typed]]:
    """Every attribute of a DAS with its declared type: container path ->
    name -> (type, values). C{{}} when the DAS does not parse (the values
    are then pydap's, untyped)."""
    from pydap.parsers.das import DASParser

    class TypedParser(DASParser):  # pydap's parser, keeping each attribute's type
        def attribute(self) -> Tuple[str, Any]:
            dap_type = self.peek(r"[^\s]+")
            name, values = DASParser.attribute(self)
            return name, _TypedValues(dap_type, values if isinstance(values, list) else [values])

    try:
        tree = TypedParser(das).parse()
    except Exception:  # noqa: BLE001 - pydap raises what it raises; a bad DAS leaves the values untyped
        return {}
    out: Dict[Path, Dict[str, Typed]] = {}

    def walk(container: Dict[str, Any], path: Path) -> None:
        for key, value in container.items():
            if isinstance(value, dict):
                walk(value, path + (key,))
            elif isinstance(value, _TypedValues):
                out.setdefault(path, {})[key] = (value.type, value.values)

    walk(tree, ())
    return out


class _TypedValues:
    __slots__ = ("type", "values")

    def __init__(self, dap_type: str, values: List[Any]) -> None:
        self.type = dap_type
        self.values = values


def typed_value(dap_type: str, values: List[Any]) -> Any:
    """The numpy array of a numeric attribute in its declared type, or None
    (text, an unknown type, values the type cannot hold)."""
    import numpy as np

    kind = DAS_NUMPY_TYPES.get(dap_type.lower())
    if kind is None or not values or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                              for v in values):
        return None
    if kind[0] in "iu":
        if not all(isinstance(v, int) or float(v).is_integer() for v in values):
            return None
        if kind == "u1" and dap_type.lower() == "byte" and any(v < 0 for v in values):
            kind = "i1"  # netCDF's signed bytes, as THREDDS and others write them
    try:
        return np.array(values, dtype=kind)
    except (TypeError, ValueError, OverflowError):
        return None


def _types_at(types: Dict[Path, Dict[str, Typed]], paths: List[Path]) -> Dict[str, Typed]:
    out: Dict[str, Typed] = {}
    for path in reversed(paths):  # the first path named wins
        out.update(types.get(path, {}))
    return out


def _with_type(value: Any, typed: Optional[Typed]) -> Any:
    if typed is None:
        return value
    cast = typed_value(*typed)
    return value if cast is None else cast


# --------------------------------------------------------------------------- #
# coordinates


def coverage(arrays: Any) -> Dict[str, Dict[str, Any]]:
    """What each coordinate variable (1-D, named as its dimension) spans:
    C{{"count", "first", "last", "min", "max"}} (numbers; None when there
    are no values), and for a CF time (C{units} "UNIT since DATE") also
    C{"units"}, C{"calendar"}, C{"start"} and C{"end"} as ISO dates.
    C{arrays}: (name, numpy array, dimension names, attributes). At most
    L{MAX_COORDINATES}."""
    out: Dict[str, Dict[str, Any]] = {}
    for name, array, dims, attributes in arrays:
        if len(out) >= MAX_COORDINATES:
            break
        if len(dims) != 1 or dims[0] != name or getattr(array, "ndim", 0) != 1 or array.dtype.kind not in "iuf":
            continue
        out[name] = _span(array, attributes)
    return out


def netcdf_coverage(nc_path: str) -> Dict[str, Dict[str, Any]]:
    """L{coverage} of a netCDF file's coordinate variables (a version saved
    before manifests kept it)."""
    import netCDF4

    with NETCDF_LOCK, netCDF4.Dataset(nc_path) as nc:
        arrays = []
        for name, var in nc.variables.items():
            if var.dimensions == (name,) and var.dtype != str and len(arrays) < MAX_COORDINATES:
                var.set_auto_maskandscale(False)
                arrays.append((name, var[...], var.dimensions, {k: var.getncattr(k) for k in var.ncattrs()}))
        return coverage(arrays)


def _span(array: Any, attributes: Dict[str, Any]) -> Dict[str, Any]:
    import numpy as np

    values = np.asarray(array).astype("f8")
    finite = values[np.isfinite(values)]
    span: Dict[str, Any] = {"count": int(values.size), "first": None, "last": None, "min": None, "max": None}
    if finite.size:
        span.update(first=float(finite[0]), last=float(finite[-1]), min=float(finite.min()),
                    max=float(finite.max()))
    units = attributes.get("units")
    if isinstance(units, str) and " since " in units:
        calendar = attributes.get("calendar")
        calendar = calendar if isinstance(calendar, str) and calendar else "standard"
        span.update(units=units, calendar=calendar, start=None, end=None)
        if finite.size:
            span["start"], span["end"] = _dates([span["min"], span["max"]], units, calendar)
    return span


def _dates(values: List[float], units: str, calendar: str) -> List[Optional[str]]:
    try:
        import cftime

        return [d.isoformat() for d in cftime.num2date(values, units, calendar=calendar)]
    except Exception:  # noqa: BLE001 - units cftime cannot read: the numbers stand alone
        return [None for _ in values]
