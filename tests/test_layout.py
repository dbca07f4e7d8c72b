"""The package layout: no import cycle, no import from an earlier stage into a later one, no direct
import of a built-in plugin by the core (``tools/check_layout.py`` does the checking)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

TOOL = Path(__file__).resolve().parent.parent / "tools" / "check_layout.py"


def _tool():
    spec = importlib.util.spec_from_file_location("check_layout", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_layout_has_no_cycle_and_no_backward_import():
    graph, problems = _tool().check()
    assert problems == []
    assert "edgerazor.quant.surgery" in graph and "edgerazor.recipe" in graph["edgerazor.quant.surgery"]


def test_cycle_finder_reports_a_cycle():
    tool = _tool()
    assert tool.find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert tool.find_cycles({"a": {"b"}, "b": set()}) == []


def test_stages_order_the_pipeline():
    tool = _tool()
    order = [tool.stage_of(m) for m in ("edgerazor.recipe", "edgerazor.quant.surgery", "edgerazor.distill.trainer",
                                        "edgerazor.export.packed", "edgerazor.runtime.packed", "edgerazor.cli")]
    assert order == sorted(order) and len(set(order)) == len(order)
