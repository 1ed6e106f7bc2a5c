"""CSV formula injection: text cells an upstream sends that a spreadsheet
would run (C{=HYPERLINK(...)}, C{+cmd|' /C calc'!A0}) go out with a C{'} in
front; numbers stay numbers; C{components.csv.formula_escape: false} writes
cells raw. No sockets, no broker."""
from __future__ import annotations

import csv
import io
from typing import List

from twisted.trial.unittest import SynchronousTestCase

from ooidx.config import ConfigError, CsvOptions, parse
from ooidx.datapath.csv import CSV, _csv_bytes, decode_dods, escape_cell, to_rows
from tests.fast.datapath.dods_bytes import (ALL_CELLS, HOSTILE_CELLS, PLAIN_CELLS, SPLIT_CELLS, VALUES, dods,
                                          formula_fields)


def _csv_text(data: bytes, formula_escape: bool = True) -> str:
    dataset, decoded = decode_dods(io.BytesIO(data))
    header, blocks, _ = to_rows(dataset, decoded, formula_escape)
    out = _csv_bytes([header], formula_escape) + b"".join(_csv_bytes(b, formula_escape) for b in blocks)
    return out.decode("utf-8")


def _csv_of(data: bytes, formula_escape: bool = True) -> List[List[str]]:
    return list(csv.reader(io.StringIO(_csv_text(data, formula_escape), newline="")))


class EscapeCellTests(SynchronousTestCase):
    def test_formula_starts_get_a_quote(self) -> None:
        for cell in ["=1+1", "+1+1", "-1+1", "@SUM(A1)", "\t1", "\r1", "\t", "=", " =1+1", "\n=1", "  @x",
                     "-cmd|' /C calc'!A0", "+cmd|' /C calc'!A0", '=HYPERLINK("http://x","y")', "-inf", "-nan",
                     "-0x1F", "-1.5e", "+.", "-", "\uff1d1+1", "\uff0b1", "\uff0d1", "\uff20x", "-1.5 ", "-1,5"]:
            self.assertEqual(escape_cell(cell), "'" + cell, repr(cell))

    def test_numbers_and_plain_text_stay(self) -> None:
        for cell in ["-1.5", "+3", "-2e-3", "-2E+10", ".5", "-.5", "-0", "1.", "-1.", "12", "plain", "a=b", "a-b",
                     "", " ", "1e5", "'=already", "x@y"]:
            self.assertEqual(escape_cell(cell), cell, repr(cell))


class RowsTests(SynchronousTestCase):
    def test_text_cells_escaped_numbers_untouched(self) -> None:
        rows = _csv_of(dods())
        self.assertEqual(rows[0], ["label", "value"])
        labels = [r[0] for r in rows[1:]]
        self.assertEqual(labels, ["'" + c for c in HOSTILE_CELLS] + list(SPLIT_CELLS) + list(PLAIN_CELLS))
        self.assertEqual([float(r[1]) for r in rows[1:]], list(VALUES))
        self.assertTrue(all(r[1].startswith("-") for r in rows[1:]))  # negative numbers stay bare
        # no field of the file, read with , ; or tab as the separator, runs as a formula
        self.assertEqual(formula_fields(_csv_text(dods())), [])
        self.assertNotEqual(formula_fields(_csv_text(dods(), formula_escape=False)), [])

    def test_separators_of_other_locales_are_quoted(self) -> None:
        out = _csv_bytes([["x;=1+1", "a\tb", "plain", "-1.5"]], True)
        self.assertEqual(out, b'"x;=1+1","a\tb",plain,-1.5\r\n')
        self.assertEqual(_csv_bytes([[""]], True), b'""\r\n')
        self.assertEqual(_csv_bytes([['say "hi"', "a,b"]], True), b'"say ""hi""","a,b"\r\n')

    def test_the_header_is_escaped(self) -> None:
        # variable names are the upstream's too; pydap quotes = + @ in them, not -
        dataset, decoded = decode_dods(io.BytesIO(dods(label_name="-2+cmd")))
        self.assertEqual(to_rows(dataset, decoded)[0], ["'-2%2Bcmd", "value"])
        self.assertEqual(to_rows(dataset, decoded, False)[0], ["-2%2Bcmd", "value"])

    def test_raw_output_when_switched_off(self) -> None:
        rows = _csv_of(dods(), formula_escape=False)
        self.assertEqual([r[0] for r in rows[1:]], list(ALL_CELLS))


class SwitchTests(SynchronousTestCase):
    def test_config_default_and_off(self) -> None:
        cfg = parse("components: {csv: {}}\n", "x.yaml", environ={})
        self.assertEqual(cfg.components["csv"].options, CsvOptions(formula_escape=True))
        cfg = parse("components: {csv: {formula_escape: false}}\n", "x.yaml", environ={})
        self.assertFalse(cfg.components["csv"].options.formula_escape)

    def test_config_refuses_a_non_boolean_in_one_line(self) -> None:
        for value in ("'no'", "0", "[]", "yes please"):
            with self.assertRaises(ConfigError) as raised:
                parse(f"components: {{csv: {{formula_escape: {value}}}}}\n", "x.yaml", environ={})
            message = str(raised.exception)
            self.assertIn("components.csv.formula_escape: expected true or false", message)
            self.assertNotIn("\n", message)
        with self.assertRaises(ConfigError):
            parse("components: {csv: {formula_escapes: true}}\n", "x.yaml", environ={})

    def test_the_component_follows_the_config(self) -> None:
        from twisted.internet.task import Clock
        on = parse("components: {csv: {}}\n", "x.yaml", environ={})
        off = parse("components: {csv: {formula_escape: false}}\n", "x.yaml", environ={})
        self.assertTrue(CSV.from_config("csv", None, on, node="n", clock=Clock()).formula_escape)
        self.assertFalse(CSV.from_config("csv", None, off, node="n", clock=Clock()).formula_escape)
        self.assertTrue(CSV("csv", None, node="n", clock=Clock()).formula_escape)
        self.assertFalse(CSV.from_config("csv", None, on, node="n", clock=Clock(), formula_escape=False).formula_escape)
