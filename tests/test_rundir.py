"""RunDir, the one answer to "does this output directory hold the same run?": its states and claim rules on real
directories."""

import json

import pytest

from lowbit.io import DamagedFileError
from lowbit.rundir import DAMAGED, DONE, NEW, OTHER, PARTIAL, STAMP, UNSTAMPED, RunDir, RunDirError

SETTINGS = {"model": "tiny", "bits": 2, "targets": ("q_proj", "v_proj")}


def _started(tmp_path, complete=False, settings=SETTINGS) -> RunDir:
    rd = RunDir(tmp_path / "run", "experiment-run")
    rd.claim(settings)
    (rd.path / "result.txt").write_text("mine")
    if complete:
        rd.finish(settings)
    return rd


def test_new_missing_or_empty(tmp_path):
    assert RunDir(tmp_path / "missing", "experiment-run").state(SETTINGS) == NEW
    (tmp_path / "empty").mkdir()
    rd = RunDir(tmp_path / "empty", "experiment-run")
    assert rd.state(SETTINGS) == NEW
    assert rd.claim(SETTINGS) == NEW
    stamp = json.loads(rd.stamp_path.read_text())
    assert stamp["command"] == "experiment-run" and stamp["complete"] is False
    assert rd.state(SETTINGS) == PARTIAL  # tuples are read back as lists: still the same settings


def test_same_settings_finished_or_not_are_kept(tmp_path):
    rd = _started(tmp_path)
    assert rd.state(SETTINGS) == PARTIAL
    assert rd.claim(SETTINGS) == PARTIAL and (rd.path / "result.txt").read_text() == "mine"
    rd.finish(SETTINGS)
    assert rd.state(SETTINGS) == DONE
    assert rd.claim(SETTINGS) == DONE and (rd.path / "result.txt").exists()


def test_same_run_without_resume_is_refused_unless_overwrite(tmp_path):
    rd = _started(tmp_path, complete=True)
    with pytest.raises(RunDirError, match=r"already holds this experiment-run run, finished.*--overwrite") as e:
        rd.claim(SETTINGS, resume=False)
    assert e.value.state == DONE and (rd.path / "result.txt").exists()
    assert rd.claim(SETTINGS, resume=False, overwrite=True) == DONE
    assert not (rd.path / "result.txt").exists() and rd.state(SETTINGS) == PARTIAL


def test_other_settings_are_refused_naming_the_difference(tmp_path):
    rd = _started(tmp_path, complete=True)
    other = {**SETTINGS, "bits": 3}
    assert rd.state(other) == OTHER
    with pytest.raises(RunDirError, match=r"--out .*run already holds a different .*\(bits 2 there, 3 now\)") as e:
        rd.check(other)
    assert e.value.state == OTHER and e.value.path == rd.path
    assert (rd.path / "result.txt").exists()
    assert rd.claim(other, overwrite=True) == OTHER
    assert not (rd.path / "result.txt").exists() and rd.state(other) == PARTIAL


def test_another_command_is_other(tmp_path):
    _started(tmp_path, complete=True)
    assert RunDir(tmp_path / "run", "export").state(SETTINGS) == OTHER


def test_a_custom_comparison_decides_sameness(tmp_path):
    _started(tmp_path)
    ignore_bits = RunDir(tmp_path / "run", "experiment-run", lambda a, b: a["model"] == b["model"])
    assert ignore_bits.state({**SETTINGS, "bits": 4}) == PARTIAL


def test_unstamped_directory_is_refused_and_kept(tmp_path):
    d = tmp_path / "theirs"
    d.mkdir()
    (d / "notes.txt").write_text("keep")
    rd = RunDir(d, "experiment-run")
    assert rd.state(SETTINGS) == UNSTAMPED
    with pytest.raises(RunDirError, match="non-empty directory that is not a lowbit"):
        rd.claim(SETTINGS)
    assert (d / "notes.txt").read_text() == "keep"


def test_a_record_of_an_earlier_version_stands_in_for_the_stamp(tmp_path):
    d = tmp_path / "old"
    d.mkdir()
    (d / "settings.json").write_text(json.dumps({"bits": 2}))

    def recorded(path):
        f = path / "settings.json"
        return {"settings": json.loads(f.read_text()), "complete": True} if f.is_file() else None

    rd = RunDir(d, "evaluate", stamp=None, recorded=recorded, record="settings.json")
    assert rd.state({"bits": 2}) == DONE
    assert rd.state({"bits": 3}) == OTHER
    (d / "settings.json").unlink()
    (d / "rows.jsonl").write_text("{}\n")
    assert rd.state({"bits": 2}) == UNSTAMPED
    with pytest.raises(RunDirError, match=r"not a lowbit evaluate run \(no settings.json\)"):
        rd.check({"bits": 2})


def test_a_directory_holding_none_of_the_commands_files_is_new(tmp_path):
    d = tmp_path / "finetune-run"
    d.mkdir()
    (d / "run.json").write_text("{}")
    rd = RunDir(d, "evaluate", stamp=None, mine=lambda p: (p / "settings.json").is_file())
    assert rd.state({}) == NEW and rd.check({}) == NEW


@pytest.mark.parametrize("damage", [lambda t: t[: len(t) // 2], lambda t: t.replace('"bits": 2', '"bits": 3'),
                                    lambda t: "[]"])
def test_damaged_stamp(tmp_path, damage):
    """Truncated, changed under its seal, or not a stamp: ``damaged``, the typed error names the file and the fix,
    and the directory is refused (kept) unless --overwrite."""
    rd = _started(tmp_path)
    rd.stamp_path.write_text(damage(rd.stamp_path.read_text()))
    with pytest.raises(DamagedFileError) as e:
        rd.read_stamp()
    assert e.value.path == rd.stamp_path and str(rd.path) in e.value.fix
    assert rd.state(SETTINGS) == DAMAGED and isinstance(rd.damage, DamagedFileError)
    with pytest.raises(RunDirError, match=rf"holds a damaged .*{STAMP}.*--overwrite") as refused:
        rd.claim(SETTINGS)
    assert refused.value.state == DAMAGED and (rd.path / "result.txt").exists()
    assert rd.claim(SETTINGS, overwrite=True) == DAMAGED and rd.state(SETTINGS) == PARTIAL


def test_a_file_at_the_path_is_other(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    rd = RunDir(f, "experiment-run")
    assert rd.state(SETTINGS) == OTHER
    with pytest.raises(RunDirError, match="is a file, not a directory"):
        rd.check(SETTINGS)
    assert rd.claim(SETTINGS, overwrite=True) == OTHER and rd.path.is_dir()


def test_check_writes_nothing(tmp_path):
    rd = RunDir(tmp_path / "out", "quantize")
    assert rd.check(SETTINGS) == NEW and not rd.path.exists()
