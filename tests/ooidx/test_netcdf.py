"""ooidx.dissemination.netcdf: DAP responses from pydap's real server -> a netCDF4 file with
the same values, dimensions and attributes as the file the server read."""
from __future__ import annotations

import io
import urllib.request
from pathlib import Path
from typing import Any, Dict

import netCDF4
import numpy as np
import pytest

from ooidx.dissemination.netcdf import DecodeError, decode, to_netcdf

from tests.ooidx.dap_upstream import Upstream, make_files


@pytest.fixture(scope="module")
def responses(tmp_path_factory: Any) -> Dict[str, Any]:
    """name -> {"das", "dds", "dods", "source"} as pydap's server answers them."""
    directory = tmp_path_factory.mktemp("netcdf-data")
    files = make_files(directory)
    out: Dict[str, Any] = {}
    with Upstream(directory) as up:
        for name in ("sst", "series"):
            parts = {s: urllib.request.urlopen(up.url(f"{name}.nc.{s}"), timeout=30).read()
                     for s in ("das", "dds", "dods")}
            out[name] = dict(parts, source=files[name])
    return out


def _write(tmp_path: Path, answer: Dict[str, Any], name: str) -> Path:
    dods = tmp_path / f"{name}.dods"
    dods.write_bytes(answer["dods"])
    nc = tmp_path / f"{name}.nc"
    result = to_netcdf(str(dods), str(nc), answer["das"].decode())
    assert result["skipped"] == []
    return nc


def test_sst_same_values_as_upstream(tmp_path: Path, responses: Dict[str, Any]) -> None:
    """1-D coordinate variables and an unconstrained 2-D variable, with dimensions and units."""
    nc = _write(tmp_path, responses["sst"], "sst")
    with netCDF4.Dataset(nc) as got, netCDF4.Dataset(responses["sst"]["source"]) as want:
        assert dict(got.dimensions.items()).keys() == {"time", "lat"}
        assert {d: len(v) for d, v in got.dimensions.items()} == {"time": 5, "lat": 4}
        assert got.title == want.title
        for var in ("time", "lat", "sst"):
            assert got[var].dimensions == want[var].dimensions
            assert got[var].dtype == want[var].dtype
            np.testing.assert_array_equal(got[var][:], want[var][:])
            assert got[var].units == want[var].units


def test_integer_variable(tmp_path: Path, responses: Dict[str, Any]) -> None:
    nc = _write(tmp_path, responses["series"], "series")
    with netCDF4.Dataset(nc) as got, netCDF4.Dataset(responses["series"]["source"]) as want:
        assert got["depth"].dtype == np.dtype("int32")
        np.testing.assert_array_equal(got["depth"][:], want["depth"][:])
        np.testing.assert_array_equal(got["time"][:], want["time"][:])


def test_decode_gives_pydap_dataset(responses: Dict[str, Any]) -> None:
    dataset, data = decode(io.BytesIO(responses["sst"]["dods"]), responses["sst"]["das"].decode())
    assert [v.name for v in dataset.children()] == ["sst", "time", "lat"]
    assert dataset["sst"].attributes["units"] == "degC"
    assert np.asarray(data[0]).shape == (5, 4)


@pytest.mark.parametrize("body", [b"", b"not a dap response", b"Dataset {\n  Float64 x[x = 3];\n} d;\nData:\n\x00"])
def test_undecodable(tmp_path: Path, body: bytes) -> None:
    dods = tmp_path / "bad.dods"
    dods.write_bytes(body)
    with pytest.raises(DecodeError):
        to_netcdf(str(dods), str(tmp_path / "bad.nc"))
    assert not (tmp_path / "bad.nc").exists()


def test_bad_das_is_not_fatal(tmp_path: Path, responses: Dict[str, Any]) -> None:
    dods = tmp_path / "sst.dods"
    dods.write_bytes(responses["sst"]["dods"])
    to_netcdf(str(dods), str(tmp_path / "sst.nc"), "Attributes { this is not { a das")
    with netCDF4.Dataset(tmp_path / "sst.nc") as got:
        np.testing.assert_array_equal(got["lat"][:], np.linspace(-30, 30, 4, dtype="f4"))
