"""training/run/folder.py: which output folders a run may use; an --overwrite sets the old run aside.
(A stale lock taken over, and runs killed mid-overwrite: test_faults.py.)"""

from __future__ import annotations

import json

import pytest

from training.run.folder import RunFolderError, check_run_folder, record_run, replace_run

FINGERPRINT = {"model": {"n_layers": 2}, "data": {"train_file": "a.txt"}}


def test_a_missing_or_empty_folder_is_usable_and_claiming_it_records_the_run(tmp_path):
    check_run_folder(tmp_path / "new", FINGERPRINT, resume=False, overwrite=False)
    (tmp_path / "empty").mkdir()
    check_run_folder(tmp_path / "empty", FINGERPRINT, resume=False, overwrite=False)
    (tmp_path / "new").mkdir()
    record_run(tmp_path / "new", FINGERPRINT, {"loop": {"seed": 1}})
    assert json.loads((tmp_path / "new" / "run_config.json").read_text()) == {
        "fingerprint": FINGERPRINT,
        "config": {"loop": {"seed": 1}},
    }


def test_a_folder_holding_a_run_needs_resume_with_the_same_fingerprint_or_overwrite(tmp_path):
    record_run(tmp_path, FINGERPRINT, {})
    (tmp_path / "metrics.jsonl").write_text("{}\n")
    with pytest.raises(RunFolderError, match="already holds a run. Pass --resume"):
        check_run_folder(tmp_path, FINGERPRINT, resume=False, overwrite=False)
    check_run_folder(tmp_path, FINGERPRINT, resume=True, overwrite=False)
    changed = {"model": {"n_layers": 3}, "data": {}}
    with pytest.raises(RunFolderError) as refused:
        check_run_folder(tmp_path, changed, resume=True, overwrite=False)
    assert "model.n_layers: saved run has 2, this run has 3" in str(refused.value)
    assert "data.train_file: saved run has 'a.txt', this run has '<missing>'" in str(refused.value)
    check_run_folder(tmp_path, changed, resume=False, overwrite=True)
    replace_run(tmp_path)
    record_run(tmp_path, changed, {})
    # The old run is set aside, not deleted, until the new one has a complete checkpoint.
    assert sorted(p.name for p in tmp_path.iterdir()) == [".old-run", "run_config.json"]
    assert sorted(p.name for p in (tmp_path / ".old-run").iterdir()) == ["metrics.jsonl", "run_config.json"]


def test_a_folder_of_other_files_is_never_used(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    for resume, overwrite in ((False, False), (True, False), (False, True)):
        with pytest.raises(RunFolderError, match="not a run folder"):
            check_run_folder(tmp_path, FINGERPRINT, resume=resume, overwrite=overwrite)
