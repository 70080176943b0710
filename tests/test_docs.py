"""The docs' tables say what the code does: the API endpoints, the bundle's files, the export's
gates, splits.csv's columns and every CLI option. Each check reads the code (the Flask app's
URL map, a real bundle, the parsers), so a new endpoint, option, gate or file that is not
documented fails here, naming the page to update."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"


def table_after(doc: str, heading: str) -> list[list[str]]:
    """The rows (cells, stripped) of the first table after ``heading`` in ``docs/doc``."""
    text = (DOCS / doc).read_text()
    assert heading in text, f"docs/{doc} has no {heading!r}"
    lines = text[text.index(heading):].split("\n|", 1)[1].split("\n\n")[0]
    rows = []
    for line in ("|" + lines).splitlines()[2:]:  # skip the header and the |---| line
        cells = re.split(r"(?<!\\)\|", line.strip())[1:-1]
        rows.append([c.strip() for c in cells])
    return rows


def ticked(cell: str) -> list[str]:
    return re.findall(r"`([^`]+)`", cell)


def _route(rule: str) -> str:
    """``GET /runtime/<path:name>`` and ``GET /runtime/<name>?v=...`` alike: the shape only."""
    return re.sub(r"<[^>]*>", "<>", rule.split("?")[0])


# ------------------------------------------------------------------------- API endpoints
def test_every_endpoint_is_in_the_demo_api_table():
    from demo_fixtures import tiny_bundles

    from edge_demo.app import create_app

    app = create_app({"DEVICE_BUNDLE": str(tiny_bundles()["int8"]), "LOG_JSON": False,
                      "INTERPRETERS": 1})
    served = {f"{method} {_route(rule.rule)}" for rule in app.url_map.iter_rules()
              for method in sorted(rule.methods - {"HEAD", "OPTIONS"})}
    documented = {_route(e) for heading in ("## API", "## The site's case log")
                  for row in table_after("DEMO.md", heading) for e in ticked(row[0])}
    assert served - documented == set(), (
        f"endpoints missing from docs/DEMO.md's API table (or the case log's, for a"
        f" token-protected one): {sorted(served - documented)}")
    assert documented - served == set(), (
        f"docs/DEMO.md's API table lists endpoints the app does not serve: "
        f"{sorted(documented - served)}")


# ------------------------------------------------------------------------- the bundle
def test_a_real_bundle_holds_the_files_the_bundle_table_lists(chain_bundle):
    from export.bundle import BUNDLE_FILES
    from export.refused import REFUSED_NOTICE

    documented = [n for row in table_after("ARTIFACTS.md", "## The export bundle")
                  for n in ticked(row[0])]
    written = sorted(p.name for p in chain_bundle.iterdir())
    assert set(written) <= set(documented), (
        f"files in a bundle missing from docs/ARTIFACTS.md's bundle table: "
        f"{sorted(set(written) - set(documented))}")
    assert set(documented) == {*BUNDLE_FILES, REFUSED_NOTICE}, (
        "docs/ARTIFACTS.md's bundle table and export.bundle.BUNDLE_FILES (+ the refused "
        "notice) differ")


# ------------------------------------------------------------------------- the gates
def test_the_gate_table_is_every_gate_with_its_default_per_mode():
    from export.config import MODES, Tolerances

    rows = table_after("EXPORT.md", "The gates and their defaults")
    header = (DOCS / "EXPORT.md").read_text().split("| gate | passes when |", 1)[1]
    modes = [c.strip() for c in header.splitlines()[0].split("|")[:-1]]
    assert modes == list(MODES), f"docs/EXPORT.md's gate table has columns {modes}"
    documented = {ticked(row[0])[0]: row[2:] for row in rows}
    assert list(documented) == list(Tolerances.names()), (
        f"docs/EXPORT.md's gate table lists {list(documented)}; export.config.Tolerances has "
        f"{list(Tolerances.names())}")
    for i, mode in enumerate(MODES):
        defaults = Tolerances.for_mode(mode).to_dict()
        for gate, cells in documented.items():
            want = "off" if defaults[gate] is None else f"{defaults[gate]:g}"
            assert cells[i] == want, f"docs/EXPORT.md: {gate} in {mode} is {cells[i]}, not {want}"


# ------------------------------------------------------------------------- splits.csv
def test_the_splits_row_names_every_column_in_order():
    from dermedge.splits import EXTRA_COLUMNS, SPLIT_COLUMNS, SPLITS

    row = next(r for r in table_after("ARTIFACTS.md", "## The run directory")
               if ticked(r[0]) == ["splits.csv"])
    cells = ticked(row[1])
    assert cells[:2] == [",".join(SPLIT_COLUMNS), ",".join(EXTRA_COLUMNS)], (
        f"docs/ARTIFACTS.md's splits.csv row says {cells[:2]}; dermedge.splits writes "
        f"{SPLIT_COLUMNS} then {EXTRA_COLUMNS}")
    assert [c for c in cells if c in SPLITS] == list(SPLITS)


# ------------------------------------------------------------------------- CLI options
def _parser(prog: str) -> argparse.ArgumentParser:
    if prog == "trainer":
        from trainer.cli import _parser as build
    elif prog == "python -m export":
        from export.cli import build_parser as build
    else:
        from edge_demo.cli import build_parser as build
    return build()


def _commands(prefix: str, parser: argparse.ArgumentParser) -> dict[str, list[str]]:
    """``{"PROG COMMAND [SUBCOMMAND]": its --options}``, nested subcommands included."""
    sub = next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)
    if sub is None:
        return {prefix: [next(o for o in a.option_strings if o.startswith("--"))
                         for a in parser._actions
                         if any(o.startswith("--") for o in a.option_strings)
                         and "--help" not in a.option_strings]}
    return {k: v for cmd, p in sub.choices.items() for k, v in _commands(f"{prefix} {cmd}",
                                                                          p).items()}


@pytest.mark.parametrize("prog, doc", [("trainer", "TRAINING.md"),
                                       ("python -m export", "EXPORT.md"),
                                       ("edge-demo", "DEMO.md")])
def test_every_cli_option_is_in_its_pages_option_table(prog, doc):
    parsed = _commands(prog, _parser(prog))
    documented = {ticked(row[0])[0]: ticked(row[1]) for row in table_after(doc, "## Options")}
    assert set(documented) == set(parsed), (
        f"docs/{doc}'s option table lists commands {sorted(documented)}; the parser has "
        f"{sorted(parsed)}")
    for cmd, options in parsed.items():
        missing = sorted(set(options) - set(documented[cmd]))
        extra = sorted(set(documented[cmd]) - set(options))
        assert not missing, f"`{cmd}` options missing from docs/{doc}'s option table: {missing}"
        assert not extra, f"docs/{doc}'s option table lists `{cmd}` options it lacks: {extra}"
