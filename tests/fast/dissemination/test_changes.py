"""ooidx.dissemination.changes: the change summary between two versions, from
their DAS, DDS, coverage and manifests; bounded, JSON-safe, in words."""
from __future__ import annotations

import json
import shutil

from ooidx.dissemination import changes
from ooidx.dissemination.netcdf import to_netcdf
from ooidx.dissemination.saved import _summary

from tests.fast.core.support import FastCase
from tests.fast.dissemination.pydap_answers import answers_of, make_typed

DDS = "Dataset {\n    Float64 time[time = %d];\n    Float32 temp[time = %d];\n} typed;\n"


def das(body: str) -> str:
    return "Attributes {\n" + body + "}\n"


class SummaryTests(FastCase):
    def test_attributes_typed_changed_added_removed(self) -> None:
        before = changes.profile("t", "a", das('    temp {\n        Float32 valid_range -5, 40;\n'
                                               '        String units "degC";\n        Float64 gone 1;\n    }\n'),
                                 DDS % (3, 3), {}, {})
        after = changes.profile("t", "b", das('    temp {\n        Float32 valid_range -5, 45;\n'
                                              '        String units "degC";\n        Float32 new NaN;\n    }\n'),
                                DDS % (3, 3), {}, {})
        summary = changes.summarize(before, after)
        attributes = summary["attributes"]
        assert attributes["changed"] == [{"variable": "temp", "name": "valid_range",
                                          "before": {"type": "Float32", "value": [-5, 40]},
                                          "after": {"type": "Float32", "value": [-5, 45]}}]
        assert attributes["added"] == [{"variable": "temp", "name": "new", "type": "Float32", "value": "nan"}]
        assert attributes["removed"] == [{"variable": "temp", "name": "gone", "type": "Float64", "value": 1}]
        assert attributes["count"] == 3 and attributes["more"] == 0
        json.dumps(summary, allow_nan=False)  # NaN is shown as text: the answer stays JSON
        assert summary["text"] == "attributes: 1 added, 1 removed, 1 changed"
        # a type that changes is a change even when the numbers are the same
        retyped = changes.profile("t", "c", das('    temp {\n        Float64 valid_range -5, 45;\n'
                                                '        String units "degC";\n        Float32 new NaN;\n    }\n'),
                                  DDS % (3, 3), {}, {})
        assert changes.summarize(after, retyped)["attributes"]["changed"][0]["after"]["type"] == "Float64"

    def test_bounded(self) -> None:
        many = "".join(f'        String a{n:03d} "{"x" * 500}";\n' for n in range(40))
        before = changes.profile("t", "a", das("    temp {\n    }\n"), DDS % (3, 3), {}, {})
        after = changes.profile("t", "b", das("    temp {\n" + many + "    }\n"), DDS % (3, 3), {}, {})
        for limit, listed in ((20, 20), (0, 0), (100, 40)):
            attributes = changes.summarize(before, after, limit=limit)["attributes"]
            assert len(attributes["added"]) == listed and attributes["count"] == 40
            assert attributes["more"] == 40 - listed
        value = changes.summarize(before, after)["attributes"]["added"][0]["value"]
        assert len(value) == changes.MAX_TEXT and value.endswith("…")
        numbers = das("    temp {\n        Int32 list " + ", ".join(map(str, range(100))) + ";\n    }\n")
        after = changes.profile("t", "b", numbers, DDS % (3, 3), {}, {})
        shown = changes.summarize(before, after)["attributes"]["added"][0]["value"]
        assert shown[:16] == list(range(16)) and shown[16] == "… (100 values)"

    def test_nothing_but_values_changed(self) -> None:
        one = changes.profile("t", "a", das(""), DDS % (3, 3), {}, {"t.dods": {"sha256": "1"}})
        two = changes.profile("t", "b", das(""), DDS % (3, 3), {}, {"t.dods": {"sha256": "2"}})
        summary = changes.summarize(one, two)
        assert summary["text"] == "new values; same variables, shapes, attributes and coverage"
        assert summary["sha256"]["t.dods"] == {"before": "1", "after": "2"}

    def test_a_version_saved_before_manifests_kept_coverage(self) -> None:
        """Its coverage is read from its netCDF file; an unreadable one is no coverage."""
        tmp = self.tmp_path()
        upstream = tmp / "up"
        upstream.mkdir()
        make_typed(upstream / "typed.nc", times=3)
        answers = answers_of(upstream, "typed.nc")
        old = tmp / "old"
        old.mkdir()
        for suffix in ("das", "dds", "dods"):
            (old / f"typed.{suffix}").write_bytes(answers[suffix])
        to_netcdf(str(old / "typed.dods"), str(old / "typed.nc"), answers["das"].decode())
        (old / "manifest.json").write_text(json.dumps({"version": "old", "files": {}}))
        span = changes.profile_of(str(old), "typed")["coverage"]["time"]
        assert span["end"] == "2020-01-01T00:02:00" and span["count"] == 3
        (old / "typed.nc").write_bytes(b"not netcdf")
        assert changes.profile_of(str(old), "typed")["coverage"] == {}
        # a previous version that cannot be read at all: the new one's summary says so, the save goes on
        shutil.rmtree(old)
        old.write_text("a file, not a directory")
        summary = _summary("typed", "new", answers["das"].decode(), answers["dds"].decode(), {}, {},
                           str(old / "sub"))
        assert summary == {"from": "sub", "to": "new", "text": "the change summary could not be made",
                           "error": summary["error"]}
        assert "FileNotFoundError" in summary["error"] and "manifest" in summary["error"]
