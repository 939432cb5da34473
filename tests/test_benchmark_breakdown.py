"""The two-object failure breakdown of benchmarks/shapesworld.py on hand-made oracle judgements."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "shapesworld.py"


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(BENCH.parent))
    spec = importlib.util.spec_from_file_location("bench_shapesworld", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def objs(*pairs):
    return [SimpleNamespace(color=c, shape=s) for c, s in pairs]


def test_two_object_breakdown_counts_each_failure(bench):
    spec = ("red", "circle", "blue", "square")
    cases = [
        objs(("red", "circle"), ("blue", "square")),  # right
        objs(("blue", "circle"), ("red", "square")),  # right sets, swapped: a binding failure
        objs(("red", "circle"), ("red", "square")),  # the first colour twice
        objs(("blue", "square"), ("red", "square")),  # the second shape twice
        objs(("red", "circle")),  # one object missing
    ]
    out = bench.two_object_breakdown([spec] * len(cases), cases)
    assert out["both_right"] == pytest.approx(1 / 5)
    assert out["colors_right"] == pytest.approx(3 / 5)
    assert out["shapes_right"] == pytest.approx(3 / 5)
    assert out["first_color_twice"] == pytest.approx(1 / 5) and out["second_color_twice"] == 0
    assert out["second_shape_twice"] == pytest.approx(1 / 5) and out["first_shape_twice"] == 0
    assert out["binding_n"] == 2 and out["binding"] == pytest.approx(0.5)
    # the same shape twice in the prompt: no binding question, and a repeated shape is no failure
    same = bench.two_object_breakdown([("red", "cross", "blue", "cross")], [objs(("blue", "cross"), ("red", "cross"))])
    assert same["both_right"] == 1 and same["binding_n"] == 0 and same["first_shape_twice"] == 0
