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


class LayoutTests(FastCase):
    """write_netcdf on pydap models made by hand: grids, structures,
    sequences, strings, fill values, dimension clashes, odd attributes."""

    def write(self, dataset: Any, data: list) -> Any:
        from ooidx.dissemination.netcdf import write_netcdf

        path = str(self.tmp_path() / "out.nc")
        result = write_netcdf(dataset, data, path)
        return result, netCDF4.Dataset(path)

    def test_grids_structures_sequences_and_strings(self) -> None:
        from pydap.model import BaseType, DatasetType, GridType, SequenceType, StructureType

        dataset = DatasetType("made", attributes={
            "NC_GLOBAL": {"title": "made by hand", "nested": {"x": 1}}, "history": "one", "DODS_EXTRA": {
                "Unlimited_Dimension": "time"}, "ignored": {"a": 1}})
        grid = GridType("sst")
        grid["sst"] = BaseType("sst", dims=("time", "lat"), attributes={
            "units": "degC", "_FillValue": [-999.0], "valid_range": [0, 40], "flags": ["a", "b"],
            "empty": [], "none": None, "mixed": [1, "x"], "": "no name", "nested": {"x": 1}})
        grid["time"] = BaseType("time", dims=("time",))
        grid["lat"] = BaseType("lat", dims=("lat",))
        station = StructureType("station")
        station["id"] = BaseType("id", dims=())
        station["name"] = BaseType("name", dims=())
        casts = SequenceType("casts")
        dataset["sst"] = grid
        dataset["lat"] = BaseType("lat", dims=("lat",))  # the grid's map again: written once
        dataset["station"] = station
        dataset["casts"] = casts
        dataset["depth"] = BaseType("depth", dims=("time",))  # time with another size: time_1
        dataset["odd"] = BaseType("odd", dims=("a", "b"))  # a 1-D array with 2 dimension names
        dataset["labels"] = BaseType("labels", dims=("n",), attributes={"_FillValue": "none"})
        sst = np.arange(6, dtype="f4").reshape(2, 3)
        data = [[sst, np.array([0.0, 1.0]), np.array([-1.0, 0.0, 1.0], dtype="f4")],
                np.array([-1.0, 0.0, 1.0], dtype="f4"),
                [np.array(7, dtype="i4"), np.array(b"CE02")],
                [],
                np.arange(4, dtype="i2"),
                np.arange(3, dtype="u1"),
                np.array([b"one", "two"], dtype=object)]
        result, nc = self.write(dataset, data)
        with nc:
            coordinates = result.pop("coverage")
            assert result == {"variables": ["sst", "time", "lat", "station.id", "station.name", "depth", "odd",
                                            "labels"], "skipped": ["casts"]}
            assert sorted(coordinates) == ["lat", "time"] and coordinates["time"]["count"] == 2
            assert nc.title == "made by hand" and nc.history == "one" and nc.Unlimited_Dimension == "time"
            assert "ignored" not in nc.ncattrs() and "nested" not in nc.ncattrs()
            var = nc["sst"]
            assert var.dimensions == ("time", "lat") and var.units == "degC"
            assert var._FillValue == -999.0
            assert list(var.valid_range) == [0, 40] and var.flags == "a\nb"
            assert {"empty", "none", "mixed", "nested"}.isdisjoint(var.ncattrs())
            np.testing.assert_array_equal(var[:], sst)
            assert nc["depth"].dimensions == ("time_1",) and len(nc.dimensions["time_1"]) == 4
            assert nc["odd"].dimensions == ("odd_dim0",)
            assert nc["station.name"][...] == "CE02"
            assert list(nc["labels"][:]) == ["one", "two"]

    def test_helpers(self) -> None:
        from ooidx.dissemination import netcdf

        i4 = np.zeros(1, dtype=">i4")
        assert netcdf._fill([5], i4) == 5 and netcdf._fill([], i4) is None
        assert netcdf._fill("x", i4) is None and netcdf._fill({"a": 1}, i4) is None
        assert netcdf._fill("nan", np.zeros(1, dtype="f4")) is None
        assert netcdf._fill(object(), i4) is None
        assert netcdf._global_attributes(None) == {}

        class Refusing:
            def __init__(self, refuse_text: bool) -> None:
                self.refuse_text = refuse_text
                self.set: dict = {}

            def setncattr(self, key: str, value: Any) -> None:
                if not isinstance(value, str) or self.refuse_text:
                    raise ValueError("no")
                self.set[key] = value

        kind = Refusing(False)
        netcdf._set_attribute(kind, "when", 5)
        assert kind.set == {"when": "5"}  # kept as text
        netcdf._set_attribute(Refusing(True), "when", 5)  # not even as text: left out, no error
        netcdf._set_attribute(kind, "objects", [object(), 1])
        assert "objects" not in kind.set


class TypedAttributeTests(FastCase):
    """The persisted netCDF is the upstream's dataset, types included: each
    attribute in the type its DAS declares (pydap's server serving a file
    written with netCDF4), not pydap's Python ints and floats (64-bit)."""

    def test_every_variable_and_attribute_equals_the_upstream_file(self) -> None:
        from tests.fast.dissemination.pydap_answers import answers_of, described, make_typed

        tmp_path = self.tmp_path()
        upstream = tmp_path / "upstream"
        upstream.mkdir()
        source = make_typed(upstream / "typed.nc", extra=True)
        answers = answers_of(upstream, "typed.nc")
        assert b"Float32 valid_range -5, 40;" in answers["das"] and b"Int32 version 3;" in answers["das"]
        dods = tmp_path / "typed.dods"
        dods.write_bytes(answers["dods"])
        nc = tmp_path / "typed.nc"
        to_netcdf(str(dods), str(nc), answers["das"].decode())
        got, want = described(nc), described(source)
        assert got[""]["version"] == ("<i4", [3])
        assert got["temp"]["attributes"]["valid_range"] == ("<f4", [-5.0, 40.0])
        assert got["temp"]["attributes"]["accuracy"] == want["temp"]["attributes"]["accuracy"]
        assert got["qc"]["attributes"]["flag_values"] == ("<i2", [0, 1, 4])
        assert got == want

    def test_das_types(self) -> None:
        from ooidx.dissemination.netcdf import das_attributes, typed_value

        das = ('Attributes {\n  NC_GLOBAL {\n    Int32 version 3;\n    String title "a, b";\n  }\n'
               '  temp {\n    Float32 valid_range -5, 40;\n    Byte signed -1, 2;\n    Byte plain 1, 200;\n'
               '    UInt16 big 70000;\n    Int16 half 1.5;\n  }\n}\n')
        types = das_attributes(das)
        assert types[("NC_GLOBAL",)]["version"] == ("Int32", [3])
        assert types[("temp",)]["valid_range"] == ("Float32", [-5, 40])
        assert typed_value(*types[("temp",)]["valid_range"]).dtype == np.dtype("f4")
        assert typed_value(*types[("temp",)]["signed"]).dtype == np.dtype("i1")
        assert typed_value(*types[("temp",)]["plain"]).dtype == np.dtype("u1")
        # what the type cannot hold is left to pydap's value, not wrapped or truncated
        assert typed_value(*types[("temp",)]["big"]) is None
        assert typed_value(*types[("temp",)]["half"]) is None
        assert typed_value(*types[("NC_GLOBAL",)]["title"]) is None
        assert das_attributes("Attributes { not { a das") == {}

    def test_coverage_of_time_decoded_with_its_units(self) -> None:
        from ooidx.dissemination.netcdf import coverage, netcdf_coverage
        from tests.fast.dissemination.pydap_answers import make_typed

        path = make_typed(self.tmp_path() / "typed.nc", times=4)
        span = netcdf_coverage(str(path))
        assert span == {"time": {"count": 4, "first": 0.0, "last": 180.0, "min": 0.0, "max": 180.0,
                                 "units": "seconds since 2020-01-01", "calendar": "standard",
                                 "start": "2020-01-01T00:00:00", "end": "2020-01-01T00:03:00"}}
        noleap = coverage([("t", np.array([0.0, 59.0]), ("t",), {"units": "days since 2001-01-01",
                                                                 "calendar": "noleap"})])
        assert noleap["t"]["end"] == "2001-03-01T00:00:00"
        assert coverage([("x", np.array([[1.0]]), ("x", "y"), {})]) == {}
