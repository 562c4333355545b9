"""Runs on Python 3.9 through 3.13, and says so in one line on an older one.

Fast checks that police every change to the module on whichever interpreter
runs the suite: it compiles on each supported Python found, uses no 3.10+
library argument that only a run on 3.9 would reveal, and an interpreter too
old gets one line. The full suite on each interpreter is `.ci/run`'s job;
the import on each with only the bundled dependencies, and the bundle on an
older Python, are in test_bundle.py.
"""

from __future__ import annotations

import ast
import re
import sqlite3
import subprocess

import pytest

import noyo_listener
from conftest import MODULE
from interpreters import SUPPORTED, find_interpreters, one_line_refusal


def _ids(versions: list[tuple[int, int]]) -> list[str]:
    return [f"{major}.{minor}" for major, minor in versions]


@pytest.mark.parametrize("version", SUPPORTED, ids=_ids(SUPPORTED))
def test_module_compiles_on_every_supported_python(version):
    python = find_interpreters().get(version)
    if not python:
        pytest.skip(f"no Python {version[0]}.{version[1]} on this machine")
    done = subprocess.run([python, "-I", "-c", "import sys; compile(open(sys.argv[1], 'rb').read(), sys.argv[1], "
                           "'exec')", str(MODULE)], capture_output=True, text=True, timeout=60,
                          stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr


# Library arguments and names newer than 3.9 that compile everywhere and fail
# only when the line runs there. Not every one of them, but the usual ones.
NEWER_KEYWORDS = {"dataclass": {"slots", "kw_only", "match_args"}, "zip": {"strict"}, "bisect": {"key"},
                  "bisect_left": {"key"}, "bisect_right": {"key"}, "insort": {"key"}, "insort_left": {"key"},
                  "insort_right": {"key"}, "connect": {"autocommit"}}
NEWER_ATTRIBUTES = {"pairwise", "bit_count", "UTC", "StrEnum", "file_digest", "getLevelNamesMapping",
                    "hardlink_to", "TaskGroup", "ExceptionGroup", "add_note", "batched", "setlimit", "blobopen"}


def _name_of(func: ast.expr) -> str:
    return func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""


def newer_python_uses(source: str) -> list[str]:
    """Lines that use a 3.10+ library argument, attribute or runtime ``X | Y`` type."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call):
            name = _name_of(node.func)
            for keyword in node.keywords:
                if keyword.arg in NEWER_KEYWORDS.get(name, ()):
                    found.append(f"line {node.lineno}: {name}({keyword.arg}=...) needs Python 3.10+")
            if name in ("isinstance", "issubclass") and len(node.args) == 2 and isinstance(node.args[1], ast.BinOp):
                found.append(f"line {node.lineno}: {name}(x, A | B) needs Python 3.10+; use a tuple")
        elif isinstance(node, ast.Attribute) and node.attr in NEWER_ATTRIBUTES:
            found.append(f"line {node.lineno}: .{node.attr} needs Python 3.10+")
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            modules = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            found.extend(f"line {node.lineno}: {m} needs Python 3.11+" for m in modules if m == "tomllib")
    return found


def test_module_uses_no_newer_library_arguments():
    assert newer_python_uses(MODULE.read_text()) == []


def test_the_newer_use_check_can_see_each_kind():
    source = ("import tomllib\nimport dataclasses\n@dataclasses.dataclass(slots=True)\nclass A: pass\n"
              "zip(a, b, strict=True)\nisinstance(x, int | str)\nnow = dt.UTC\n")
    assert [line.split(":")[0] for line in newer_python_uses(source)] == [
        "line 1", "line 3", "line 5", "line 6", "line 7"]


# The system python3 of RHEL 9 links SQLite 3.34.1 (Ubuntu 22.04: 3.37.2), while
# the Pythons here link a newer one: SQL that needs more than 3.34 would pass
# every test and fail on those VMs. Not every feature, but the usual ones.
NEWER_SQL = {
    r"\bRETURNING\b": "RETURNING (3.35)", r"\bDROP\s+COLUMN\b": "ALTER TABLE DROP COLUMN (3.35)",
    r"\)\s*STRICT\b": "STRICT tables (3.37)", r"->": "the -> and ->> operators (3.38)",
    r"\bunixepoch\s*\(": "unixepoch() (3.38)", r"\b(RIGHT|FULL)\s+(OUTER\s+)?JOIN\b": "RIGHT/FULL JOIN (3.39)",
    r"\bIS\s+(NOT\s+)?DISTINCT\s+FROM\b": "IS DISTINCT FROM (3.39)",
    r"\b(ceil|ceiling|floor|sqrt|pow|power|ln|log2|log10|exp|pi|trunc|mod)\s*\(": "math functions (3.35)",
    r"\b(concat|concat_ws|string_agg|timediff|octet_length|format)\s*\(": "a function from 3.38-3.44",
}
_SQL_START = re.compile(r"^\s*(--[^\n]*\n\s*)*(SELECT|INSERT|UPDATE|DELETE|CREATE|WITH|ALTER|DROP|REPLACE)\b",
                        re.IGNORECASE)


def newer_sqlite_uses(source: str) -> list[str]:
    """SQL in the module's string constants that RHEL 9's SQLite 3.34 would refuse."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and _SQL_START.match(node.value):
            for pattern, what in NEWER_SQL.items():
                if re.search(pattern, node.value, re.IGNORECASE):
                    found.append(f"line {node.lineno}: {what}")
    return found


def test_sql_needs_no_sqlite_newer_than_rhel_9s():
    assert newer_sqlite_uses(MODULE.read_text()) == []


def test_the_newer_sqlite_check_can_see_each_kind():
    source = ('A = "INSERT INTO t VALUES (1) RETURNING id"\nB = "CREATE TABLE t (a) STRICT"\n'
              'C = "SELECT payload ->> \'$.id\' FROM events"\nD = f"SELECT unixepoch() FROM {x}"\n'
              'E = "log line with -> in it"\n')
    assert [line.split(":")[0] for line in newer_sqlite_uses(source)] == ["line 1", "line 2", "line 3", "line 4"]
    assert sqlite3.sqlite_version_info >= (3, 34)  # the suite itself runs on at least what RHEL 9 has


@pytest.mark.parametrize("version", [(3, 7), (3, 8)], ids=_ids([(3, 7), (3, 8)]))
def test_the_module_on_an_older_python_that_parses_it_says_so_in_one_line(version):
    """3.7 and 3.8 parse the module (``from __future__ import annotations``); 3.6 and older cannot."""
    python = find_interpreters().get(version)
    if not python:
        pytest.skip(f"no Python {version[0]}.{version[1]} on this machine")
    one_line_refusal(python, str(MODULE))


@pytest.mark.parametrize("text, expected", [
    ("2024-05-08T21:27:45Z", 1715203665.0),
    ("2024-05-08T21:27:45.1Z", 1715203665.1),
    ("2024-05-08T21:27:45.039Z", 1715203665.039),
    ("2024-05-08T21:27:45.12345+00:00", 1715203665.12345),
    ("2024-05-08T21:27:45.0395871+00:00", 1715203665.039587),
    ("2024-05-08T23:27:45.5+02:00", 1715203665.5),
    ("2024-05-08 21:27:45", 1715203665.0),
])
def test_iso_timestamps_with_any_fraction_parse_alike_on_every_python(text, expected):
    """Before 3.11, fromisoformat reads only 3 or 6 fraction digits (or none)."""
    assert noyo_listener.parse_utc_iso(text) == pytest.approx(expected, abs=1e-6)
