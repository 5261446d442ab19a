"""Each bad input fails at once with one line that names the problem and the fix."""

import os
import re

import pytest

import storage
from storage import StorageError


def _file_in_the_way(tmp):
    (tmp / "file").write_text("x")
    return str(tmp / "file" / "out")


CASES = {
    "s3 one slash": (lambda t: storage.resolve("s3:/bucket/key"),
                     r"'s3:/bucket/key' is not a URI .*; write s3://bucket/key"),
    "gs no slash": (lambda t: storage.resolve("gs:bucket"), r"write gs://bucket"),
    "one slash as output": (lambda t: storage.require_absolute("s3:/b/results", "--output"), r"write s3://b/results"),
    "relative data root": (lambda t: storage.require_absolute("data", "--data-root"),
                           r"--data-root 'data' is a relative path, which breaks inside Ray trials .*; pass an "
                           r"absolute path, e\.g\. --data-root /"),
    "unwritable output": (lambda t: storage.check_writable(_file_in_the_way(t)),
                          r"cannot write to .*/file/out \(.*\); fix its permissions or credentials"),
    "zero ttl": (lambda t: storage.acquire_lock(str(t), "me", ttl_s=0), r"ttl_s must be > 0"),
}


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_bad_input_one_line_with_fix(tmp_path, case):
    call, pattern = CASES[case]
    with pytest.raises(StorageError) as e:
        call(tmp_path)
    msg = str(e.value)
    assert "\n" not in msg
    assert re.search(pattern, msg), msg
    assert not (tmp_path / "out").exists()  # refused before any work


def test_good_inputs_pass(tmp_path):
    assert storage.require_absolute(str(tmp_path), "--output") == str(tmp_path)
    assert storage.require_absolute("s3://b/k", "--output") == "s3://b/k"
    storage.check_writable(str(tmp_path / "new" / "dir"))  # created, probe written and removed
    assert os.listdir(tmp_path / "new" / "dir") == []
