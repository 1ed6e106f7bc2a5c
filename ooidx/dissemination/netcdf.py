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

__all__ = ["DATA_MARKER", "NETCDF_LOCK", "DecodeError", "decode", "to_netcdf", "write_netcdf"]

#: Held around every use of the netCDF4 library (it is not thread-safe).
NETCDF_LOCK = threading.Lock()

DATA_MARKER = dap.DATA_MARKER
#: How far into the .dods its DDS may reach.
MAX_DDS = 16 * 1024 * 1024


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
    return write_netcdf(dataset, data, nc_path)


def write_netcdf(dataset: Any, data: List[Any], nc_path: str) -> Dict[str, Any]:
    """Write a decoded dataset (L{decode}'s result) as netCDF4 at C{nc_path}."""
    import netCDF4

    arrays, skipped = _arrays(dataset, data)
    with NETCDF_LOCK:
        return _write(netCDF4, arrays, skipped, dataset.attributes, nc_path)


def _write(netCDF4: Any, arrays: List[Any], skipped: List[str], attributes: Dict[str, Any],
           nc_path: str) -> Dict[str, Any]:
    written: List[str] = []
    with netCDF4.Dataset(nc_path, "w", format="NETCDF4") as nc:
        for key, value in _global_attributes(attributes).items():
            _set_attribute(nc, key, value)
        sizes: Dict[str, int] = {}
        for name, array, dims, var_attributes in arrays:
            dims = _dimensions(nc, sizes, name, array.shape, dims)
            fill = var_attributes.get("_FillValue")
            kind = str if array.dtype.kind in "SUO" else array.dtype.newbyteorder("=")
            fill_value = _fill(fill, array) if kind is not str else None
            var = nc.createVariable(name, kind, dims, fill_value=fill_value if fill_value is not None else False)
            var.set_auto_maskandscale(False)
            for key, value in var_attributes.items():
                if key != "_FillValue":
                    _set_attribute(var, key, value)
            if kind is str:
                var[...] = _as_text(array)
            else:
                var[...] = array.astype(kind, copy=False)
            written.append(name)
    return {"variables": written, "skipped": skipped}


# --------------------------------------------------------------------------- #
# laying out the dataset


def _arrays(dataset: Any, data: List[Any]) -> Tuple[List[Tuple[str, Any, Tuple[str, ...], Dict[str, Any]]],
                                                     List[str]]:
    """(name, numpy array, dimension names, attributes) of every variable; names skipped."""
    import numpy as np
    from pydap.model import BaseType, GridType, SequenceType, StructureType

    out: List[Tuple[str, Any, Tuple[str, ...], Dict[str, Any]]] = []
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
            out.append((name, array, dims, dict(var.attributes or {})))
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
