"""Recipe schema: defaults, W-A-KV shorthand, overrides and the documented errors."""

from __future__ import annotations

import pytest

from edgerazor import quantize
from edgerazor.errors import PluginError, RecipeError
from edgerazor.recipe import dump_recipe, load_recipe, parse_overrides, recipe_from_dict, rho_for_bits
from tests.helpers import REPO


def write(tmp_path, text: str):
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path


def test_defaults_are_the_papers_headline_setting():
    recipe = load_recipe(None)
    assert recipe.quant.w_a_kv == "1.88-8-8"
    assert recipe.quant.weight.allocation == "super_group"
    assert recipe.quant.embedding.quantizer == recipe.quant.lm_head.quantizer == "int4"


@pytest.mark.parametrize(
    "bits, rho", [("4", 1.0), ("2.79", 0.5), ("2.19", 0.25), ("1.88", 0.125), ("1.58", 0.0)]
)
def test_scheme_expands_to_rho_and_activation_kv_bits(bits, rho):
    recipe = recipe_from_dict({"quant": {"scheme": f"{bits}-8-16"}})
    assert recipe.quant.weight.rho == pytest.approx(rho)
    assert (recipe.quant.activation.bits, recipe.quant.kv_cache.bits) == (8, 16)
    assert recipe.quant.w_a_kv == f"{float(bits):g}-8-16"


def test_scheme_conflicting_with_explicit_value_is_an_error():
    with pytest.raises(RecipeError, match=r"implies weight.rho=0.125, but the recipe sets 0.5"):
        recipe_from_dict({"quant": {"scheme": "1.88-8-8", "weight": {"rho": 0.5}}})


@pytest.mark.parametrize("scheme", ["1.88-8", "abc-8-8", "3.1-8-8", "1.88-4-8"])
def test_bad_scheme(scheme):
    with pytest.raises(RecipeError, match="quant"):
        recipe_from_dict({"quant": {"scheme": scheme}})


def test_rho_for_bits_rejects_unreachable_widths():
    assert rho_for_bits(1.98, 4.0, 1.58) == pytest.approx(1 / 6)
    with pytest.raises(ValueError, match="not reachable"):
        rho_for_bits(3.5, 4.0, 1.58)
    # other quantizers' bits: one 3-bit row in every 2 over 1.58-bit rows is 2.29 bits
    assert rho_for_bits(2.29, 3.0, 1.58) == 0.5
    with pytest.raises(ValueError, match=r"reachable: 3, 2.29, 2.05, "):
        rho_for_bits(2.5, 3.0, 1.58)


@pytest.mark.parametrize(("bits", "rho"), [("1.88", 1 / 8), ("2.79", 1 / 2), ("4", 1.0), ("1.58", 0.0)])
def test_scheme_uses_the_bits_the_recipes_quantizers_declare(bits, rho):
    """The paper's widths come from int4's and ternary's declared bits, not from constants."""
    quant = recipe_from_dict({"quant": {"scheme": f"{bits}-8-8", "weight": {"high": "int4", "low": "ternary"}}}).quant
    assert quant.weight.rho == rho and quant.w_a_kv == f"{bits}-8-8"
    # int8 over ternary: one 8-bit row in every 2 is (8 + 1.58) / 2 = 4.79 bits
    quant = recipe_from_dict({"quant": {"scheme": "4.79-8-8", "weight": {"high": "int8"}}}).quant
    assert quant.weight.rho == 0.5 and quant.w_a_kv == "4.79-8-8"
    with pytest.raises(RecipeError, match=r"quant.weight.high: unknown quantizers entry 'int5'; available: int4, int8"):
        recipe_from_dict({"quant": {"scheme": "1.88-8-8", "weight": {"high": "int5"}}})


def test_yaml_file_and_overrides(tmp_path):
    path = write(tmp_path, "name: mine\nquant:\n  weight:\n    rho: 0.5\n    group_size: 64\n")
    recipe = load_recipe(path, ["quant.weight.allocation=stacked", "quant.activation.bits=16",
                                "quant.lm_head.quantizer=null", "quant.exclude=['*.mlp.*']"])
    assert recipe.name == "mine"
    assert recipe.quant.weight.rho == 0.5 and recipe.quant.weight.group_size == 64
    assert recipe.quant.weight.allocation == "stacked"
    assert recipe.quant.activation.bits == 16
    assert recipe.quant.lm_head.quantizer is None
    assert recipe.quant.exclude == ["*.mlp.*"]
    # round trip through YAML
    again = load_recipe(write(tmp_path, dump_recipe(recipe)))
    assert again == recipe


def test_rho_outside_unit_interval_names_file_key_and_bound(tmp_path):
    path = write(tmp_path, "quant:\n  weight:\n    rho: 1.5\n")
    with pytest.raises(RecipeError) as err:
        load_recipe(path)
    message = str(err.value)
    assert str(path) in message and "quant.weight.rho" in message and "less than or equal to 1" in message
    with pytest.raises(RecipeError, match=r"quant.weight.rho: .*greater than or equal to 0"):
        load_recipe(None, ["quant.weight.rho=-0.1"])


def test_unknown_key_lists_the_allowed_keys(tmp_path):
    path = write(tmp_path, "quant:\n  weight:\n    rhoo: 0.5\n")
    with pytest.raises(RecipeError) as err:
        load_recipe(path)
    message = str(err.value)
    assert "quant.weight.rhoo: unknown key" in message
    assert "allowed here: allocation, allocation_options, group_size, high, low, pad, rho" in message
    with pytest.raises(RecipeError, match=r"qaunt: unknown key; allowed here: data, demo, demo_video, description, distill, eval, export, model, name, quant, train"):
        load_recipe(None, ["qaunt.weight.rho=0.5"])


def test_wrong_type_and_bad_group_size(tmp_path):
    with pytest.raises(RecipeError, match=r"quant.weight.group_size: .*greater than 0"):
        load_recipe(write(tmp_path, "quant:\n  weight:\n    group_size: 0\n"))
    with pytest.raises(RecipeError, match=r"quant.weight.group_size: .*valid integer.*'big'"):
        load_recipe(None, ["quant.weight.group_size=big"])
    with pytest.raises(RecipeError, match=r"quant.activation.bits: Input should be 8 or 16"):
        load_recipe(None, ["quant.activation.bits=4"])


def test_malformed_yaml_and_missing_file(tmp_path):
    path = write(tmp_path, "quant:\n  weight: [rho: 0.5\n")
    with pytest.raises(RecipeError, match=rf"recipe file {path} is not valid YAML"):
        load_recipe(path)
    with pytest.raises(RecipeError, match="does not exist"):
        load_recipe(tmp_path / "nope.yaml")
    with pytest.raises(RecipeError, match="top level must be a mapping"):
        load_recipe(write(tmp_path, "- a\n- b\n"))


def test_malformed_override():
    with pytest.raises(RecipeError, match="must look like key.path=value"):
        parse_overrides(["quant.weight.rho"])
    assert parse_overrides(["a.b=1", "a.c=x"]) == {"a": {"b": 1, "c": "x"}}


def test_unknown_plugin_names_in_a_recipe_fail_when_used(tiny_qwen3):
    with pytest.raises(PluginError, match=r"unknown allocations entry 'zigzag'; available: per_tensor, random, stacked, super_group"):
        quantize(tiny_qwen3, {"quant": {"weight": {"allocation": "zigzag", "group_size": 64}}})
    with pytest.raises(PluginError, match=r"unknown quantizers entry 'int3'; available: int4, int8, ternary"):
        quantize(tiny_qwen3, {"quant": {"weight": {"high": "int3", "group_size": 64}}})


def test_every_shipped_recipe_validates():
    files = sorted((REPO / "configs").rglob("*.yaml"))
    assert files, "configs/ ships recipes"
    for path in files:
        load_recipe(path)


# ------------------------------------------------------------------------------------------------
# bad input: every field's range, duplicate keys, non-finite numbers, nesting, --set list items
# ------------------------------------------------------------------------------------------------

#: Integer fields for which 0 means something (a seed, no workers, no pretraining, no warmup).
ZERO_IS_MEANINGFUL = {"data.seed", "train.seed", "train.dataloader_num_workers", "demo.seed", "demo.pretrain.steps",
                      "demo.pretrain.warmup_steps", "demo_video.seed", "demo_video.pretrain.steps",
                      "demo_video.pretrain.warmup_steps", "eval.seed", "eval.num_fewshot"}
#: A source for the ``data.sources.0.*`` fields to live in.
WITH_SOURCE = {"data": {"sources": [{"path": "a.jsonl"}]}}


def _number_fields(model=None, prefix=()):
    """(dotted key, int or float) for every numeric field of the schema, list items as ``.0``."""
    from typing import get_args, get_origin

    from pydantic import BaseModel

    from edgerazor.recipe import Recipe

    for name, field in (model or Recipe).model_fields.items():
        ann = field.annotation
        key = (*prefix, name)
        if get_origin(ann) is list:
            key, ann = (*key, "0"), get_args(ann)[0]
        options = get_args(ann) if get_origin(ann) is not None and get_origin(ann) is not list else (ann,)
        for option in options:
            if isinstance(option, type) and issubclass(option, BaseModel):
                yield from _number_fields(option, key)
            elif option in (int, float):
                yield ".".join(key), option


NUMBER_FIELDS = sorted(_number_fields())


def test_the_schema_walk_finds_the_fields():
    keys = dict(NUMBER_FIELDS)
    assert keys["train.max_steps"] is int and keys["data.sources.0.max_samples"] is int
    assert keys["train.learning_rate"] is float and keys["demo.teacher.num_layers"] is int
    assert len(NUMBER_FIELDS) > 40


@pytest.mark.parametrize(("key", "kind"), NUMBER_FIELDS, ids=[k for k, _ in NUMBER_FIELDS])
def test_every_number_field_refuses_nonsense(key, kind):
    """No count is negative (max_steps' -1 aside), no count but a few is 0, no float is infinite or NaN."""
    bad = ["-2", ".inf", "-.inf", ".nan"] if kind is float else ["-2"]
    if kind is int and key not in ZERO_IS_MEANINGFUL:
        bad.append("0")
    for value in bad:
        with pytest.raises(RecipeError, match=rf"invalid recipe <dict>: {key}: .*\(from override '{key}="):
            recipe_from_dict(WITH_SOURCE, overrides=[f"{key}={value}"])


@pytest.mark.parametrize(("key", "value"), [
    ("quant.weight.rho", "1.01"), ("train.warmup_ratio", "1.5"), ("data.eval_fraction", "1.0"),
    ("data.sources.0.ratio", "0"), ("demo.pretrain.min_lr_ratio", "1.1"), ("train.seed", "4294967296"),
    ("data.max_length", "1"), ("distill.extra_losses.mse", "-1"),
])
def test_ratios_and_bounds(key, value):
    with pytest.raises(RecipeError, match=rf": {key}: .*\(got {value}\)"):
        recipe_from_dict(WITH_SOURCE, overrides=[f"{key}={value}"])


def test_max_steps_is_minus_one_or_positive():
    assert recipe_from_dict({"train": {"max_steps": -1}}).train.max_steps == -1
    assert recipe_from_dict({"train": {"max_steps": 3}}).train.max_steps == 3
    with pytest.raises(RecipeError, match=r"train.max_steps: must be -1 \(train for num_epochs\) or a positive"):
        recipe_from_dict({"train": {"max_steps": -3}})


def test_non_finite_numbers_are_refused_anywhere(tmp_path):
    with pytest.raises(RecipeError, match=r"distill.kl_mixer_options.K: must be a finite number, got inf"):
        load_recipe(write(tmp_path, "distill:\n  kl_mixer_options: {K: .inf}\n"))
    with pytest.raises(RecipeError, match=r"train.learning_rate: Input should be a finite number \(got 'nan'\)"):
        load_recipe(None, ["train.learning_rate=nan"])  # a string pydantic would otherwise read as NaN


def test_duplicate_keys_name_key_and_lines(tmp_path):
    with pytest.raises(RecipeError, match=r"duplicate key 'rho' at line 4 \(first at line 3\)"):
        load_recipe(write(tmp_path, "quant:\n  weight:\n    rho: 0.5\n    rho: 1.0\n"))
    with pytest.raises(RecipeError, match=r"duplicate key 'train' at line 3 \(first at line 1\)"):
        load_recipe(write(tmp_path, "train: {seed: 1}\nname: x\ntrain: {seed: 2}\n"))
    with pytest.raises(RecipeError, match=r"override 'quant.weight=\{rho: 0.5, rho: 1\}': the value: duplicate key 'rho'"):
        load_recipe(None, ["quant.weight={rho: 0.5, rho: 1}"])
    # a merge key is not a duplicate: explicit keys override the merged ones, as YAML says
    recipe = load_recipe(write(tmp_path, "train: &t {seed: 1, max_steps: 5}\ndistill: {alpha_task: 0.5}\n"
                                         "description: x\nquant: {weight: {<<: {rho: 0.5, pad: true}, rho: 1.0}}\n"))
    assert recipe.quant.weight.rho == 1.0 and recipe.quant.weight.pad is True


def test_nesting_is_refused_before_any_recursion(tmp_path):
    deep_block = "".join("  " * i + f"k{i}:\n" for i in range(2000))
    for text in ("a: " + "[" * 5000 + "]" * 5000 + "\n", deep_block):
        with pytest.raises(RecipeError, match=r"nested deeper than 32 levels at line"):
            load_recipe(write(tmp_path, text))
    with pytest.raises(RecipeError, match=r"nested deeper than 32 levels \(or a YAML alias refers to itself\)"):
        load_recipe(write(tmp_path, "distill:\n  selector_options: &x {k: *x}\n"))
    with pytest.raises(RecipeError, match=r"the key path is deeper than 32 levels"):
        load_recipe(None, [".".join(["k"] * 40) + "=1"])
    with pytest.raises(RecipeError, match=r"the value: nested deeper than 32 levels"):
        load_recipe(None, ["distill.selector_options=" + "[" * 2000 + "]" * 2000])
    laughs = "a: &a [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]\n" + "".join(
        f"{b}: &{b} [{', '.join([f'*{a}'] * 10)}]\n" for a, b in zip("abcde", "bcdef"))
    with pytest.raises(RecipeError, match=r"more than 100000 values"):
        recipe_from_dict({"distill": {"selector_options": __import__("yaml").safe_load(laughs)}})


def test_set_addresses_list_items():
    base = {"data": {"sources": [{"path": "a.jsonl"}, {"path": "b.jsonl", "format": "chat"}]}}
    recipe = recipe_from_dict(base, overrides=["data.sources.1.messages_field=conversation",
                                               "data.sources.0={format: prompt_response, prompt_field: q}"])
    first, second = recipe.data.sources
    assert (first.path, first.format, first.prompt_field) == ("a.jsonl", "prompt_response", "q")  # merged
    assert (second.path, second.messages_field) == ("b.jsonl", "conversation")
    assert base["data"]["sources"][1] == {"path": "b.jsonl", "format": "chat"}  # the caller's dict is untouched
    for override, message in [
        ("data.sources.2.path=c", r"data.sources has 2 item\(s\), so index 2 is out of range"),
        ("data.sources.first.path=c", r"data.sources is a list; index it with a number, not 'first'"),
        ("data.max_length.0=1", r"data.max_length is 1024, not a mapping or a list, so it has no '0'"),
    ]:
        with pytest.raises(RecipeError, match=rf"override '{override}': {message}"):
            recipe_from_dict({"data": {**base["data"], "max_length": 1024}}, overrides=[override])
    with pytest.raises(RecipeError, match=r"override 'data.sources.0.path=x': data.sources is not set, so it has no item 0"):
        load_recipe(None, ["data.sources.0.path=x"])


def test_errors_are_one_line_naming_every_key():
    with pytest.raises(RecipeError) as err:
        recipe_from_dict({"train": {"max_steps": 0, "learning_rate": -1}}, "r.yaml")
    message = str(err.value)
    assert "\n" not in message and message.startswith("invalid recipe r.yaml: ")
    assert message.endswith("train.learning_rate: Input should be greater than 0 (got -1); "
                            "train.max_steps: must be -1 (train for num_epochs) or a positive number of optimizer "
                            "steps (got 0)")


def test_name_must_be_one_folder():
    for name in ("../elsewhere", "a/b", "..", ""):
        with pytest.raises(RecipeError, match=r"invalid recipe <dict>: name: "):
            recipe_from_dict({"name": name})


def test_scheme_with_malformed_sections_is_a_recipe_error():
    with pytest.raises(RecipeError, match=r"quant.weight.rho must be a number, got None"):
        recipe_from_dict({"quant": {"scheme": "1.88-8-8", "weight": {"rho": None}}})
    with pytest.raises(RecipeError, match=r"quant.weight.high: must be a quantizer plugin name, got \[4\]"):
        recipe_from_dict({"quant": {"scheme": "1.88-8-8", "weight": {"high": [4]}}})
    with pytest.raises(RecipeError, match=r"quant.activation: Input should be a valid dictionary"):
        recipe_from_dict({"quant": {"scheme": "1.88-8-8", "activation": [8]}})
