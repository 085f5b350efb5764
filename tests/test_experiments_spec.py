"""Experiment specs: validation messages name the field, sample order, chunks; detectors."""

from __future__ import annotations

import pytest

from lda.experiments import Condition, Detectors, ExperimentSpec, chunks, sample_ref, samples


def body(**overrides):
    base = {
        "name": "hunt",
        "prompts": [
            "Tell me a story.",
            [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        ],
        "conditions": [0, 2.0, {"alpha": 1, "adapter": "marker"}, {"alpha": 2, "control": True}],
        "n": 3,
        "seed": 100,
        "detectors": [
            {"name": "marker", "type": "substring", "patterns": ["BANANA"]},
            {"name": "re", "type": "regex", "pattern": r"ban+a", "flags": "i"},
        ],
        "store": "all",
        "chunk_size": 5,
    }
    return base | overrides


def test_from_dict_round_trips_and_labels():
    spec = ExperimentSpec.from_dict(body())
    assert spec.total == 4 * 2 * 3
    assert [c.label for c in spec.conditions] == [
        "alpha=0",
        "alpha=2",
        "adapter=marker alpha=1",
        "control alpha=2",
    ]
    assert spec.prompts[1] == (("system", "Be brief."), ("user", "Hi"))
    assert ExperimentSpec.from_dict(spec.to_dict()) == spec
    assert Condition(1.5, amplification={"name": "x3"}).label == "amp=x3 alpha=1.5"
    assert Condition(0.0, amplification="cfg_ab12cd34").label == "amp=cfg_ab12cd34 alpha=0"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"n": 0}, "n: must be >= 1"),
        ({"prompts": ["a", "b", "c", "  "]}, "prompts[3]: empty prompt"),
        ({"prompts": [[{"role": "system", "content": "x"}]]}, "prompts[0]: empty prompt"),
        ({"prompts": [[{"role": "bot", "content": "x"}]]}, "prompts[0][0].role"),
        ({"prompts": []}, "prompts: must be a non-empty list"),
        ({"conditions": [1, {"alpha": float("inf")}]}, "conditions[1].alpha: must be a finite number"),
        ({"conditions": [1, "x"]}, "conditions[1].alpha"),
        ({"conditions": [1, 1.0]}, "conditions[1]: duplicate of conditions[0]"),
        ({"conditions": [{"alpha": 1, "control": True, "adapter": "a"}]}, "conditions[0].control"),
        (
            {
                "detectors": [
                    {"name": "a", "type": "substring", "patterns": ["x"]},
                    {"name": "b", "type": "regex", "pattern": "(unclosed"},
                ]
            },
            "detectors[1].pattern: bad regex",
        ),
        (
            {"detectors": [{"name": "a", "type": "substring", "patterns": []}]},
            "detectors[0].patterns: at least one pattern",
        ),
        (
            {"detectors": [{"name": "a", "type": "regex", "pattern": "x", "flags": "q"}]},
            "detectors[0].flags: unknown regex flag 'q'",
        ),
        (
            {"detectors": [{"name": "a", "type": "glob", "patterns": ["x"]}]},
            "detectors[0].type: must be one of",
        ),
        (
            {"detectors": [{"name": "a", "type": "substring", "patterns": ["x"]}] * 2},
            "detectors[1].name: duplicate",
        ),
        ({"store": "some"}, "store: must be one of all, hits"),
        ({"chunk_size": 0}, "chunk_size: must be >= 1"),
        ({"seed": -1}, "seed: must be in"),
        ({"n": True}, "n: must be an integer"),
        ({"detector": []}, "detector: unknown field"),
    ],
)
def test_bad_specs_name_the_field(overrides, message):
    with pytest.raises(ValueError, match=None) as info:
        ExperimentSpec.from_dict(body(**overrides))
    assert message in str(info.value)


def test_max_samples_names_the_setting():
    with pytest.raises(ValueError, match="24 samples exceeds MAX_EXPERIMENT_SAMPLES=20"):
        ExperimentSpec.from_dict(body(), max_samples=20)
    assert ExperimentSpec.from_dict(body(), max_samples=24).total == 24


def test_samples_are_condition_major_with_seed_plus_index():
    spec = ExperimentSpec.from_dict(body())
    refs = list(samples(spec))
    assert [r.index for r in refs] == list(range(spec.total))
    assert all(r.seed == 100 + r.index for r in refs)
    keys = [(r.condition_index, r.prompt_index, r.sample_index) for r in refs]
    assert keys == sorted(keys)  # rows sharing a condition and a prompt are adjacent
    assert sample_ref(spec, 7) == refs[7] and (refs[7].condition_index, refs[7].prompt_index) == (1, 0)
    with pytest.raises(ValueError, match="index: must be in"):
        sample_ref(spec, spec.total)


def test_chunks_are_contiguous_ranges():
    spec = ExperimentSpec.from_dict(body())
    parts = chunks(spec)
    assert [len(c) for c in parts] == [5, 5, 5, 5, 4]
    assert [i for c in parts for i in c] == list(range(spec.total))


def detectors(*specs):
    return Detectors(ExperimentSpec.from_dict(body(detectors=list(specs))).detectors)


def test_substring_detector_case():
    d = detectors(
        {"name": "any_case", "type": "substring", "patterns": ["banana", "STRASSE"]},
        {"name": "exact", "type": "substring", "patterns": ["Banana"], "case_sensitive": True},
    )
    assert d.detect("I like BANANA") == ["any_case"]
    assert d.detect("I like Banana") == ["any_case", "exact"]
    assert d.detect("die Straße") == ["any_case"]  # casefold, not lower
    assert d.detect("nothing here") == []


def test_regex_detector_flags():
    d = detectors(
        {"name": "plain", "type": "regex", "pattern": r"^end$"},
        {"name": "multi_i", "type": "regex", "pattern": r"^end$", "flags": "mi"},
        {"name": "dotall", "type": "regex", "pattern": r"a.b", "flags": "s"},
    )
    assert d.detect("start\nEND\nmore") == ["multi_i"]
    assert d.detect("end") == ["plain", "multi_i"]
    assert d.detect("a\nb") == ["dotall"]
