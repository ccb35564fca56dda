"""The demo replaces only a work folder it made (`--work` pointed at real data is refused), and
the whole demo runs end to end with few steps, printing its table and writing its report."""


import launch
import pytest

from sara_megatron.demo import DEMO_MARKER, _fresh_work_folder
from sara_megatron.tool_errors import InputError


def test_demo_replaces_only_its_own_folder(tmp_path):
    data = tmp_path / "thesis"
    data.mkdir()
    (data / "thesis.tex").write_text("years of work")
    with pytest.raises(InputError, match="did not make"):
        _fresh_work_folder(data)
    assert (data / "thesis.tex").read_text() == "years of work"
    with pytest.raises(InputError, match="is a file"):
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


@launch.early_launch("short_demo")
def short_demo_command(folder):
    """The short demo starts with the session (about 2 minutes, mostly one core busy)."""
    return {"cmd": launch.tool("demo", "--work", folder / "demo", "--samples", "32", "--steps",
                               "3"), "cwd": folder, "timeout": 900}


@pytest.fixture
def short_demo(early_launches):
    """The finished short demo: (its process, its work folder)."""
    background = early_launches["short_demo"]
    return background.wait(), background.folder / "demo"


@pytest.mark.multiprocess
@pytest.mark.slow
def test_demo_runs_end_to_end_with_few_steps(short_demo):
    """`make demo` in small (tools/demo.py, every step as a real subprocess: shard, convert,
    priors at EP=2, SARA and FFT training, divergence, export and verify): it prints the same
    table shape as the full demo and writes the report with that table."""
    import re

    proc, work = short_demo
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    lines = proc.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.split()[:2] == ["layer", "lang"])
    assert lines[header].split() == ["layer", "lang", "before", "after", "SARA", "after", "FFT"]
    rows = [line.split() for line in lines[header + 1:]
            if re.match(r"^\s*(\d+|mean)\s+\w+\s+\S+e[-+]\d+", line)]
    # 4 layers × 2 target languages, then the mean of each language; three finite columns
    assert [(r[0], r[1]) for r in rows] == [
        *((str(layer), lang) for layer in range(4) for lang in ("hi", "sw")),
        ("mean", "hi"), ("mean", "sw")]
    for row in rows:
        assert len(row) == 5 and all(0 <= float(v) < 1 for v in row[2:]), row
    for name in ("sara", "fft"):  # the first and last logged steps of each run
        assert re.search(rf"^{name}: step \d -> 3: CE \d+\.\d+ -> \d+\.\d+, training-batch JS",
                         proc.stdout, re.M), proc.stdout[-3000:]
    report = (work / "report" / "report.md").read_text()
    table = report[report.index("## Routing divergence"):].splitlines()
    start = next(i for i, line in enumerate(table) if line.startswith("| layer | lang |"))
    report_rows = []
    for line in table[start + 2:]:
        if not line.startswith("|"):
            break
        report_rows.append([c.strip() for c in line.strip("|").split("|")])
    assert report_rows == rows
    assert (work / "sara_hf" / "config.json").is_file()  # exported, and verified by the demo
