"""The demo replaces only a work folder it made: `--work` pointed at real data is refused."""

import pytest

from sara_megatron.demo import DEMO_MARKER, _fresh_work_folder


def test_demo_replaces_only_its_own_folder(tmp_path):
    data = tmp_path / "thesis"
    data.mkdir()
    (data / "thesis.tex").write_text("years of work")
    with pytest.raises(SystemExit, match="did not make"):
        _fresh_work_folder(data)
    assert (data / "thesis.tex").read_text() == "years of work"
    with pytest.raises(SystemExit, match="is a file"):
        _fresh_work_folder(data / "thesis.tex")

    work = tmp_path / "new" / "demo"  # a new folder, parents made
    _fresh_work_folder(work)
    assert (work / DEMO_MARKER).is_file()
    (work / "old_run.log").write_text("from the last run")
    _fresh_work_folder(work)  # an earlier demo's folder is replaced
    assert sorted(p.name for p in work.iterdir()) == [DEMO_MARKER]

    empty = tmp_path / "empty"
    empty.mkdir()
    _fresh_work_folder(empty)
    assert (empty / DEMO_MARKER).is_file()
