"""``results.json`` is strict JSON: no NaN or Infinity, and an undefined gap closure is null with its reason."""

from __future__ import annotations

import json
import math

import pytest

from edgerazor.run import gap_closure_fields, write_json_atomically


def _strict_load(path):
    """json.loads accepts NaN and Infinity by default; a strict reader refuses them."""
    def refuse(token):
        raise ValueError(f"not JSON: {token}")

    return json.loads(path.read_text(), parse_constant=refuse)


def test_writer_turns_non_finite_floats_into_null_and_lists_them(tmp_path):
    path = tmp_path / "results.json"
    write_json_atomically(path, {"student_ppl": math.inf, "rtn_ppl": 12.5,
                                 "eval_perplexity": [{"step": 10, "perplexity": math.nan}], "note": "kept"})
    data = _strict_load(path)
    assert data == {"student_ppl": None, "rtn_ppl": 12.5, "eval_perplexity": [{"step": 10, "perplexity": None}],
                    "note": "kept", "non_finite_as_null": ["student_ppl", "eval_perplexity[0].perplexity"]}
    assert not path.with_name("results.json.tmp").exists()


def test_writer_refuses_what_json_cannot_hold(tmp_path):
    path = tmp_path / "results.json"
    path.write_text('{"previous": 1}')
    with pytest.raises(TypeError):
        write_json_atomically(path, {"x": {1, 2}})
    assert json.loads(path.read_text()) == {"previous": 1}  # the previous results are intact


def test_gap_closure_is_null_with_a_reason_when_there_is_no_gap(tmp_path):
    # round-to-nearest no worse than the teacher: there is no gap, the closure is undefined
    fields = gap_closure_fields(teacher_ppl=20.0, rtn_ppl=19.0, student_ppl=18.0)
    assert fields["gap_closure"] is None
    assert fields["gap_closure_note"] == ("undefined: round-to-nearest perplexity (19) is not above the teacher's "
                                          "(20), so there is no gap to close")
    path = tmp_path / "results.json"
    write_json_atomically(path, {"teacher_ppl": 20.0, **fields})
    assert _strict_load(path)["gap_closure"] is None
    assert "non_finite_as_null" not in _strict_load(path)  # nothing left for the writer to replace
    # a real gap: half of it closed in log-perplexity
    assert gap_closure_fields(10.0, 40.0, 20.0) == {"gap_closure": pytest.approx(0.5)}
    assert "not finite" in gap_closure_fields(10.0, math.inf, 20.0)["gap_closure_note"]
