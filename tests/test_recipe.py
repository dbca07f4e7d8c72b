"""Recipe schema: defaults, W-A-KV shorthand, overrides and the documented errors."""

from __future__ import annotations

import pytest

from edgerazor import quantize
from edgerazor.errors import PluginError, RecipeError
from edgerazor.recipe import dump_recipe, load_recipe, parse_overrides, recipe_from_dict, rho_for_bits
from tests.conftest import REPO


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
    assert rho_for_bits(1.98) == pytest.approx(1 / 6)
    with pytest.raises(ValueError, match="not reachable"):
        rho_for_bits(3.5)


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
    with pytest.raises(RecipeError, match=r"qaunt: unknown key; allowed here: data, description, distill, model, name, quant, train"):
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
