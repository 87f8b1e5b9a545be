"""Results files: only ever appended to; torn lines stay, retries append, foreign files are refused."""

import json

import pytest

from jaxlayouts import sweep
from jaxlayouts.results import Results


def test_results_are_only_appended_torn_lines_stay_and_retries_append(tmp_path):
    path = tmp_path / "r.jsonl"
    results = Results(path)
    results.append({"key": "a", "status": "ok"})
    results.append({"key": "b", "status": "oom"})
    with open(path, "a") as f:
        f.write('{"key": "c", "sta')  # killed in the middle of a write
    written = path.read_text()
    reloaded = Results(path)
    assert set(reloaded.rows) == {"a", "b"} and path.read_text() == written  # loading changes nothing
    reloaded.append({"key": "b", "status": "ok"})  # a retry appends; the last row of a key counts
    lines = path.read_text().splitlines()
    assert path.read_text().startswith(written) and lines[2] == '{"key": "c", "sta'
    assert Results(path).rows["b"]["status"] == "ok" and len(lines) == 4


def test_a_complete_last_row_without_newline_is_kept(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text('{"key": "a", "status": "ok"}\n{"key": "b", "status": "ok"}')
    results = Results(path)
    assert set(results.rows) == {"a", "b"}
    results.append({"key": "c", "status": "ok"})
    assert [json.loads(line)["key"] for line in path.read_text().splitlines()] == ["a", "b", "c"]


@pytest.mark.parametrize("text", ["# my notes\nkeep me\n", '{"foo": 1}\n', "[1, 2]\n"])
def test_a_file_that_is_not_a_results_file_is_refused_untouched(tmp_path, text):
    notes = tmp_path / "notes.md"
    notes.write_text(text)
    (tmp_path / "s.yaml").write_text("devices: 1\nbase: {model: tiny}\ngrid: {micro_batch: [1]}\n")
    for extra in ([], ["--dry-run"]):
        assert sweep.main([str(tmp_path / "s.yaml"), "--out", str(notes), *extra]) == 2
    assert notes.read_text() == text
