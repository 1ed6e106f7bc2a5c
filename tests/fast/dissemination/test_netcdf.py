"""ooidx.dissemination.netcdf: DAP responses from pydap's real server -> a netCDF4 file with
the same values, dimensions and attributes as the file the server read."""
from __future__ import annotations

import io
from pathlib import Path
from typing import Any, Dict

import netCDF4
import numpy as np

from ooidx.dissemination.netcdf import DecodeError, decode, to_netcdf

from tests.fast.core.support import FastCase, cases, expand
from tests.fast.dissemination.pydap_answers import pydap_responses


def _write(tmp_path: Path, answer: Dict[str, Any], name: str) -> Path:
    dods = tmp_path / f"{name}.dods"
    dods.write_bytes(answer["dods"])
    nc = tmp_path / f"{name}.nc"
    result = to_netcdf(str(dods), str(nc), answer["das"].decode())
    assert result["skipped"] == []
    return nc


@expand
class NetCDFTests(FastCase):
    def test_sst_same_values_as_upstream(self) -> None:
        """1-D coordinate variables and an unconstrained 2-D variable, with dimensions and units."""
        responses = pydap_responses()
        tmp_path = self.tmp_path()
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

    def test_integer_variable(self) -> None:
        responses = pydap_responses()
        tmp_path = self.tmp_path()
        nc = _write(tmp_path, responses["series"], "series")
        with netCDF4.Dataset(nc) as got, netCDF4.Dataset(responses["series"]["source"]) as want:
            assert got["depth"].dtype == np.dtype("int32")
            np.testing.assert_array_equal(got["depth"][:], want["depth"][:])
            np.testing.assert_array_equal(got["time"][:], want["time"][:])

    def test_decode_gives_pydap_dataset(self) -> None:
        responses = pydap_responses()
        dataset, data = decode(io.BytesIO(responses["sst"]["dods"]), responses["sst"]["das"].decode())
        assert [v.name for v in dataset.children()] == ["sst", "time", "lat"]
        assert dataset["sst"].attributes["units"] == "degC"
        assert np.asarray(data[0]).shape == (5, 4)

    @cases("body", [b"", b"not a dap response", b"Dataset {\n  Float64 x[x = 3];\n} d;\nData:\n\x00"])
    def test_undecodable(self, body) -> None:
        tmp_path = self.tmp_path()
        dods = tmp_path / "bad.dods"
        dods.write_bytes(body)
        with self.assertRaises(DecodeError):
            to_netcdf(str(dods), str(tmp_path / "bad.nc"))
        assert not (tmp_path / "bad.nc").exists()

    def test_bad_das_is_not_fatal(self) -> None:
        responses = pydap_responses()
        tmp_path = self.tmp_path()
        dods = tmp_path / "sst.dods"
        dods.write_bytes(responses["sst"]["dods"])
        to_netcdf(str(dods), str(tmp_path / "sst.nc"), "Attributes { this is not { a das")
        with netCDF4.Dataset(tmp_path / "sst.nc") as got:
            np.testing.assert_array_equal(got["lat"][:], np.linspace(-30, 30, 4, dtype="f4"))
