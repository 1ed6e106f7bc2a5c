"""The demo's sample datasets: a time series, a profile and a grid, with CF attributes.

L{write_all} writes the three netCDF files for step C{k}; step 0 is what the
package ships (C{ooidx/demo/data/}, made by C{scripts/make-demo-data}), and
the demo writes step 1, 2, ... every minute, so that each refresh of the
exchange finds new values: the time series and the grid move one hour on,
the profile is measured again. Values are made from the step alone (a seeded
generator), so a step always gives the same bytes.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Dict

__all__ = ["NAMES", "DATA_DIR", "write_all", "write_one", "shipped"]

#: The datasets, by name: each is the file NAME.nc.
NAMES = ("timeseries", "profile", "grid")
#: Where the package keeps the step-0 files.
DATA_DIR = Path(__file__).resolve().parent / "data"

#: The first sample's time: 2026-01-01T00:00:00Z, in seconds since 1970.
EPOCH = 1767225600
HOUR = 3600
SERIES_LENGTH = 48  # hours in the time series
GRID_TIMES = 6
STATION = {"lat": 44.64, "lon": -124.30}  # off Newport, Oregon (OOI's Endurance array)


def shipped() -> Dict[str, Path]:
    """The files the package ships, by dataset name."""
    return {name: DATA_DIR / f"{name}.nc" for name in NAMES}


def write_all(directory: Path, step: int = 0) -> Dict[str, Path]:
    """Write the three datasets of C{step} into C{directory}; name -> path.
    Each file is written beside its place and renamed over it, so a reader
    sees the old file or the new one, never half of one."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    return {name: write_one(directory, name, step) for name in NAMES}


def write_one(directory: Path, name: str, step: int) -> Path:
    if name not in NAMES:
        raise ValueError(f"no sample dataset named {name!r} (there are {', '.join(NAMES)})")
    final = Path(directory) / f"{name}.nc"
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{name}.", suffix=".nc")
    os.close(fd)
    try:
        _WRITERS[name](tmp, step)
        os.replace(tmp, final)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return final


def _common(ds, title: str, feature: str, step: int) -> None:
    ds.Conventions = "CF-1.8"
    ds.title = title
    ds.featureType = feature
    ds.institution = "ooidx demo (synthetic data)"
    ds.source = "ooidx.demo.sample"
    ds.comment = f"synthetic values, step {step}; the demo writes a new step every minute"


def _time(ds, dim: str, values) -> None:
    t = ds.createVariable("time", "f8", (dim,))
    t.standard_name = "time"
    t.long_name = "time"
    t.units = "seconds since 1970-01-01T00:00:00Z"
    t.calendar = "standard"
    t.axis = "T"
    t[...] = values


def _station(ds, dim: str) -> None:
    """lat(dim) and lon(dim) of the one station (CF's orthogonal multidimensional
    representation: no scalar variables, which pydap's netCDF handler cannot send in a .dods)."""
    for key, units, axis in (("lat", "degrees_north", "Y"), ("lon", "degrees_east", "X")):
        v = ds.createVariable(key, "f8", (dim,))
        v.standard_name = "latitude" if key == "lat" else "longitude"
        v.units = units
        v.axis = axis
        v[...] = STATION[key]


def _timeseries(path: str, step: int) -> None:
    import netCDF4
    import numpy as np

    hours = np.arange(step, step + SERIES_LENGTH, dtype="f8")
    rng = np.random.default_rng(1000 + step)
    with netCDF4.Dataset(path, "w", format="NETCDF3_64BIT_OFFSET") as ds:
        _common(ds, "Sea water temperature and salinity at a mooring (synthetic)", "timeSeries", step)
        ds.createDimension("station", 1)
        ds.createDimension("time", SERIES_LENGTH)
        _time(ds, "time", EPOCH + hours * HOUR)
        _station(ds, "station")
        temp = ds.createVariable("sea_water_temperature", "f4", ("station", "time"))
        temp.standard_name = "sea_water_temperature"
        temp.units = "degree_Celsius"
        temp.coordinates = "time lat lon"
        temp[0, :] = (11.0 + 1.5 * np.sin(2 * np.pi * hours / 24.0) + rng.normal(0, 0.1, hours.size)).astype("f4")
        sal = ds.createVariable("sea_water_practical_salinity", "f4", ("station", "time"))
        sal.standard_name = "sea_water_practical_salinity"
        sal.units = "1"
        sal.coordinates = "time lat lon"
        sal[0, :] = (33.2 + 0.2 * np.cos(2 * np.pi * hours / 12.4) + rng.normal(0, 0.02, hours.size)).astype("f4")


def _profile(path: str, step: int) -> None:
    import netCDF4
    import numpy as np

    depth_values = np.arange(0.0, 200.0, 5.0)
    rng = np.random.default_rng(2000 + step)
    with netCDF4.Dataset(path, "w", format="NETCDF3_64BIT_OFFSET") as ds:
        _common(ds, "A temperature and oxygen profile from a profiler (synthetic)", "profile", step)
        ds.createDimension("profile", 1)
        ds.createDimension("depth", depth_values.size)
        _time(ds, "profile", [EPOCH + step * HOUR])
        _station(ds, "profile")
        depth = ds.createVariable("depth", "f4", ("depth",))
        depth.standard_name = "depth"
        depth.units = "m"
        depth.positive = "down"
        depth.axis = "Z"
        depth[:] = depth_values
        surface = 12.0 + 0.5 * np.sin(2 * np.pi * step / 24.0)
        temp = ds.createVariable("sea_water_temperature", "f4", ("profile", "depth"))
        temp.standard_name = "sea_water_temperature"
        temp.units = "degree_Celsius"
        temp.coordinates = "time lat lon depth"
        temp[0, :] = (7.0 + (surface - 7.0) * np.exp(-depth_values / 40.0) + rng.normal(0, 0.05, depth_values.size)
                   ).astype("f4")
        oxy = ds.createVariable("mole_concentration_of_dissolved_molecular_oxygen_in_sea_water", "f4",
                                ("profile", "depth"))
        oxy.standard_name = "mole_concentration_of_dissolved_molecular_oxygen_in_sea_water"
        oxy.units = "umol kg-1"
        oxy.coordinates = "time lat lon depth"
        oxy[0, :] = (60.0 + 200.0 * np.exp(-depth_values / 60.0) + rng.normal(0, 2.0, depth_values.size)).astype("f4")


def _grid(path: str, step: int) -> None:
    import netCDF4
    import numpy as np

    lat_values = np.arange(40.0, 50.0, 0.25)   # 40
    lon_values = np.arange(-130.0, -120.0, 0.25)  # 40
    hours = np.arange(step, step + GRID_TIMES, dtype="f8")
    rng = np.random.default_rng(3000 + step)
    with netCDF4.Dataset(path, "w", format="NETCDF3_64BIT_OFFSET") as ds:
        _common(ds, "Sea surface temperature off Oregon (synthetic)", "grid", step)
        ds.createDimension("time", GRID_TIMES)
        ds.createDimension("lat", lat_values.size)
        ds.createDimension("lon", lon_values.size)
        _time(ds, "time", EPOCH + hours * HOUR)
        lat = ds.createVariable("lat", "f4", ("lat",))
        lat.standard_name = "latitude"
        lat.units = "degrees_north"
        lat.axis = "Y"
        lat[:] = lat_values
        lon = ds.createVariable("lon", "f4", ("lon",))
        lon.standard_name = "longitude"
        lon.units = "degrees_east"
        lon.axis = "X"
        lon[:] = lon_values
        sst = ds.createVariable("sst", "f4", ("time", "lat", "lon"), fill_value=np.float32(-999.0))
        sst.standard_name = "sea_surface_temperature"
        sst.long_name = "sea surface temperature"
        sst.units = "degree_Celsius"
        la, lo = np.meshgrid(lat_values, lon_values, indexing="ij")
        base = 16.0 - 0.6 * (la - 40.0) + 0.15 * (lo + 130.0)
        values = np.stack([base + 0.8 * np.sin(2 * np.pi * h / 24.0) for h in hours])
        sst[:] = (values + rng.normal(0, 0.05, values.shape)).astype("f4")


_WRITERS = {"timeseries": _timeseries, "profile": _profile, "grid": _grid}
