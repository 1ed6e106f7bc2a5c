"""pydap's own answers (.das, .dds, .dods) for the test datasets of
tests/ooidx/dap_upstream.make_files, from pydap's WSGI app called in this
process: no port, no subprocess. Made once per test run, in a directory
removed at exit."""
from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
from pathlib import Path
from typing import Any, Dict

from webob import Request

from tests.ooidx.dap_upstream import make_files

#: The upstream URL the answers are said to come from (nothing listens there).
UPSTREAM = "http://upstream.test"


@functools.lru_cache(maxsize=None)
def pydap_responses() -> Dict[str, Any]:
    """name -> {"das", "dds", "dods", "source", "url"} for sst and series."""
    from pydap.wsgi.app import DapServer

    directory = Path(tempfile.mkdtemp(prefix="ooidx-fast-pydap-"))
    atexit.register(shutil.rmtree, str(directory), True)
    files = make_files(directory)
    app = DapServer(str(directory))
    out: Dict[str, Any] = {}
    for name in ("sst", "series"):
        parts = {}
        for suffix in ("das", "dds", "dods"):
            answer = Request.blank(f"/{name}.nc.{suffix}").get_response(app)
            assert answer.status_int == 200, answer.status
            parts[suffix] = answer.body
        out[name] = dict(parts, source=files[name], url=f"{UPSTREAM}/{name}.nc")
    return out


def make_typed(path: Path, *, times: int = 3, extra: bool = False) -> Path:
    """A netCDF file whose attributes have the types a DAS can declare and
    pydap's JSON-less parse used to lose: Float32 valid_range and accuracy,
    Int16 flag_values and _FillValue, a global Int32 version, UInt16,
    UInt32, Byte, Float64 and text. C{times} time steps (CF units, one a
    minute from 2020-01-01); C{extra} adds a variable C{salt}."""
    import netCDF4
    import numpy as np

    with netCDF4.Dataset(path, "w") as ds:
        ds.title = "typed attributes"
        ds.setncattr("version", np.int32(3))
        ds.setncattr("scale", np.float32(0.5))
        ds.setncattr("levels", np.array([1, 2], dtype="u1"))
        ds.setncattr("count16", np.uint16(7))
        ds.setncattr("count32", np.uint32(9))
        ds.createDimension("time", times)
        t = ds.createVariable("time", "f8", ("time",))
        t.units = "seconds since 2020-01-01"
        t.calendar = "standard"
        t[:] = np.arange(times, dtype="f8") * 60
        temp = ds.createVariable("temp", "f4", ("time",), fill_value=np.float32(-999))
        temp.valid_range = np.array([-5, 40], dtype="f4")
        temp.accuracy = np.float32(0.01)
        temp.units = "degC"
        temp[:] = np.arange(times, dtype="f4") + 10
        qc = ds.createVariable("qc", "i2", ("time",), fill_value=np.int16(-1))
        qc.flag_values = np.array([0, 1, 4], dtype="i2")
        qc.flag_meanings = "good bad missing"
        qc[:] = np.arange(times, dtype="i2") % 2
        level = ds.createVariable("level", "u1", ("time",))
        level.valid_max = np.uint8(200)
        level[:] = np.arange(times, dtype="u1")
        if extra:
            salt = ds.createVariable("salt", "f8", ("time",))
            salt.missing_value = np.float64(-9e9)
            salt.units = "psu"
            salt[:] = np.full(times, 35.0)
    return path


def answers_of(directory: Path, name: str) -> Dict[str, bytes]:
    """pydap's .das, .dds and .dods of DIRECTORY/NAME, in process."""
    from pydap.wsgi.app import DapServer

    app = DapServer(str(directory))
    parts = {}
    for suffix in ("das", "dds", "dods"):
        answer = Request.blank(f"/{name}.{suffix}").get_response(app)
        assert answer.status_int == 200, answer.status
        parts[suffix] = answer.body
    return parts


def described(path: Path) -> Dict[str, Any]:
    """Everything netCDF4 reads of a file, types included: global attributes,
    and each variable's type, dimensions, raw values and attributes
    (attribute values as (numpy type, list) or text). Two files with equal
    descriptions are the same dataset (the order of variables and attributes
    aside: DAP does not keep it)."""
    import netCDF4
    import numpy as np

    def attribute(value: Any) -> Any:
        if isinstance(value, str):
            return value
        array = np.asarray(value)
        return (array.dtype.str, array.reshape(-1).tolist())

    with netCDF4.Dataset(path) as ds:
        out: Dict[str, Any] = {"": {k: attribute(ds.getncattr(k)) for k in ds.ncattrs()}}
        for name, var in ds.variables.items():
            var.set_auto_maskandscale(False)
            out[name] = {"dtype": var.dtype.str if var.dtype != str else "str", "dimensions": var.dimensions,
                         "shape": var.shape, "values": np.asarray(var[...]).tolist(),
                         "attributes": {k: attribute(var.getncattr(k)) for k in var.ncattrs()}}
    return out
