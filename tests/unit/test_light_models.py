"""perf.light_models: its candidate list parses NAME=DIR@STEPS and refuses anything else, naming the option."""

from __future__ import annotations

from pathlib import Path

import pytest

from perf.light_models import DEFAULT, parse_candidates


def test_default_candidates_parse():
    got = parse_candidates(DEFAULT)
    assert got[0] == ("heavy@50", Path("quality_models/heavy"), 50)
    assert [s for _, _, s in got] == [50, 2, 1, 2, 1, 50, 2, 2, 1, 1]
    assert got[-1] == ("student-turbo@1", Path("quality_models/student_turbo"), 1)


@pytest.mark.parametrize("bad", ["heavy=quality_models/heavy", "=x@2", "a=x@0", "a=@2", "a=x@two"])
def test_bad_candidates_are_refused(bad):
    with pytest.raises(SystemExit, match="--candidates"):
        parse_candidates(bad)
