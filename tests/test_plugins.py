"""The plugin system: built-ins through the public hooks, actionable errors, docs in step with the
hookspecs, and a real third-party distribution installed with pip and discovered by entry point."""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import inspect
import json
import re
import subprocess
import sys
import types
from pathlib import Path
from types import SimpleNamespace

import pluggy
import pytest
import torch

import edgerazor
from edgerazor import PluginError, hookimpl, hookspecs, plugin_manager
from edgerazor.adapters import ModelAdapter
from edgerazor.cli import main as cli_main
from edgerazor.plugin_manager import DEFAULT_PLUGINS, PLUGINS_ENV, REGISTRY_SPECS, PluginSystem, reload_plugins
from tests.helpers import (
    PLUGIN_DIST, PLUGIN_EP, PLUGIN_MODULE, PLUGIN_VERSION, REPO, console_script as _console_script,
    env_with as _env_with,
)

DOCS = REPO / "docs" / "plugins.md"

BUILTINS = {  # (registry, name) -> the DEFAULT_PLUGINS module that registers it (a subset of them)
    ("quantizers", "ternary"): "edgerazor.plugins.quantizers",
    ("quantizers", "int4"): "edgerazor.plugins.quantizers",
    ("quantizers", "int8"): "edgerazor.plugins.quantizers",
    ("allocations", "super_group"): "edgerazor.plugins.allocations",
    ("allocations", "stacked"): "edgerazor.plugins.allocations",
    ("allocations", "random"): "edgerazor.plugins.allocations",
    ("adapters", "qwen3"): "edgerazor.model_adapters.qwen3",
    ("adapters", "mobilellm"): "edgerazor.model_adapters.mobilellm",
    ("adapters", "qwen2_5_omni"): "edgerazor.model_adapters.qwen2_5_omni",
}


def _hookspecs() -> dict[str, types.FunctionType]:
    return {
        name: fn
        for name, fn in inspect.getmembers(hookspecs, inspect.isfunction)
        if hasattr(fn, "edgerazor_spec")
    }


def _plugin(**hooks) -> types.SimpleNamespace:
    """A plugin object whose hooks are ``hook_name=lambda register: ...`` bodies."""
    return types.SimpleNamespace(**{name: hookimpl(fn) for name, fn in hooks.items()})


def _ok_allocation(d_out, rho, **context):
    return torch.ones(d_out, dtype=torch.bool)


# ---------------------------------------------------------------- built-ins use the public hooks


def test_builtins_are_registered_through_the_hooks():
    system = PluginSystem(load_entry_points=False)
    for (kind, name), module_name in BUILTINS.items():
        assert module_name in DEFAULT_PLUGINS
        registry = system.registry(kind)
        assert name in registry.names()
        assert registry.owners[name] == module_name, (kind, name)
        hook_name = REGISTRY_SPECS[kind][0]
        impl_owners = [impl.plugin_name for impl in getattr(system.pm.hook, hook_name).get_hookimpls()]
        assert module_name in impl_owners, (kind, name)
        assert system.pm.get_plugin(module_name) is importlib.import_module(module_name)
    # with entry points off, every registered name comes from a built-in module
    for kind, registry in system.registries.items():
        assert set(registry.owners.values()) <= set(DEFAULT_PLUGINS), kind
    infos = {i.name: i for i in system.describe()}
    assert list(infos) == list(DEFAULT_PLUGINS)
    for module_name, info in infos.items():
        assert (info.distribution, info.version) == ("edgerazor", importlib.metadata.version("edgerazor"))
        assert info.registers, f"{module_name} registers nothing"
        assert info.hooks == sorted(REGISTRY_SPECS[k][0] for k in info.registers)
        for kind, names in info.registers.items():
            assert all(system.registry(kind).owners[n] == module_name for n in names)
    for (kind, name), owner in BUILTINS.items():
        assert name in infos[owner].registers[kind]


def test_builtin_objects_have_the_documented_shape():
    system = PluginSystem(load_entry_points=False)
    q = system.get("quantizers", "int4")
    assert (q.qmax, q.bits) == (7, 4.0)
    assert q.scale(torch.ones(2, 3, 8)).shape == (2, 3)
    mask = system.get("allocations", "super_group")(16, 0.25, layer_name="x")
    assert mask.dtype == torch.bool and mask.tolist() == [i % 4 == 0 for i in range(16)]
    assert isinstance(system.get("adapters", "qwen3"), ModelAdapter)


# ---------------------------------------------------------------- errors


def test_duplicate_name_names_registry_both_plugins_and_choices():
    system = PluginSystem(load_entry_points=False)
    dup = _plugin(register_allocations=lambda register: register("stacked", _ok_allocation))
    with pytest.raises(PluginError) as exc:
        system.register(dup, name="my_plugin")
    msg = str(exc.value)
    assert "duplicate name 'stacked' in registry 'allocations'" in msg
    assert "registered by 'my_plugin', already registered by 'edgerazor.plugins.allocations'" in msg
    assert msg.endswith("available: per_tensor, random, stacked, super_group")
    # the failed plugin is gone again and the registries are intact
    assert system.pm.get_plugin("my_plugin") is None
    assert system.registry("allocations").names() == ["per_tensor", "random", "stacked", "super_group"]


def test_duplicate_between_two_thirdparty_plugins_blames_the_later_one():
    system = PluginSystem(load_entry_points=False)
    system.register(_plugin(register_losses=lambda register: register("l2", lambda s, t, b: 0)), name="first")
    with pytest.raises(PluginError, match="registered by 'second', already registered by 'first'; available: l2"):
        system.register(_plugin(register_losses=lambda register: register("l2", lambda s, t, b: 0)), name="second")
    assert system.registry("losses").owners == {"l2": "first"}


def test_raw_pluggy_registration_and_recollect():
    """The low-level way: ``pm.register`` an object, then rebuild the registries."""
    system = PluginSystem(load_entry_points=False)
    system.pm.register(_plugin(register_allocations=lambda register: register("mine", _ok_allocation)), name="raw")
    system.registries = system._collect()
    assert system.registry("allocations").owners["mine"] == "raw"
    system.pm.register(_plugin(register_allocations=lambda register: register("super_group", _ok_allocation)),
                       name="raw2")
    with pytest.raises(PluginError, match=r"duplicate name 'super_group' in registry 'allocations'.*available: mine"):
        system._collect()


def test_unknown_name_lists_available_choices(tiny_qwen3):
    system = PluginSystem(load_entry_points=False)
    with pytest.raises(PluginError) as exc:
        system.get("allocations", "super_grup")
    assert str(exc.value) == "unknown allocations entry 'super_grup'; available: per_tensor, random, stacked, super_group"
    with pytest.raises(PluginError, match=r"unknown quantizers entry 'int3'; available: int4, int8, ternary"):
        system.get("quantizers", "int3")
    with pytest.raises(PluginError, match=r"unknown losses entry 'kl'; available: \(none\)"):
        system.get("losses", "kl")
    with pytest.raises(PluginError, match=r"unknown registry 'registers'; available: adapters, allocations, exporters"):
        system.get("registers", "x")
    # and through the public API, from a recipe
    with pytest.raises(PluginError, match=r"unknown allocations entry 'nope'; available: .*super_group"):
        edgerazor.quantize(tiny_qwen3, {"quant": {"weight": {"allocation": "nope", "group_size": 64}}})
    with pytest.raises(PluginError, match=r"unknown adapters entry 'phi9'; available: generic, mobilellm, qwen2_5_omni, qwen3"):
        edgerazor.quantize(tiny_qwen3, {"model": {"adapter": "phi9"}})


class _NoScale:
    qmax, bits = 7, 4.0


class _ZeroQmax:
    qmax, bits = 0, 4.0

    def scale(self, groups):
        return groups.abs().amax(-1)


WRONG_SHAPES = [
    ("allocations", lambda d_out: None, "expected a callable (d_out: int, rho: float, **context) -> torch.BoolTensor"),
    ("allocations", lambda d_out, rho: None, "expected a callable (d_out: int, rho: float, **context)"),
    ("allocations", "super_group", "expected a callable"),
    ("quantizers", _NoScale(), "a quantizer needs a scale(groups) -> Tensor method"),
    ("quantizers", _ZeroQmax(), "a quantizer needs an integer qmax >= 1"),
    ("selectors", lambda hidden: [1], "expected a callable (teacher_hidden_states, mask, **options) -> list[int]"),
    ("kl_mixers", lambda: 0.5, "expected a callable (stats, **options) -> Tensor"),
    ("losses", lambda student_out, teacher_out: 0, "expected a callable (student_out, teacher_out, batch) -> Tensor"),
    ("adapters", {"name": "phi3"}, "expected an edgerazor.adapters.ModelAdapter"),
    ("exporters", lambda model: None, "expected a callable (model, out_dir, **options) -> Path"),
]


@pytest.mark.parametrize(("kind", "obj", "problem"), WRONG_SHAPES, ids=[f"{k}-{i}" for i, (k, _, _) in enumerate(WRONG_SHAPES)])
def test_wrong_shape_names_registry_problem_and_choices(kind, obj, problem):
    system = PluginSystem(load_entry_points=False)
    before = system.registry(kind).names()
    hook_name = REGISTRY_SPECS[kind][0]
    with pytest.raises(PluginError) as exc:
        system.register(_plugin(**{hook_name: lambda register: register("bad", obj)}), name="my_plugin")
    msg = str(exc.value)
    assert f"plugin 'my_plugin' registered 'bad' in registry '{kind}' with the wrong shape: " in msg
    assert problem in msg
    assert msg.endswith(f"available: {', '.join(before) or '(none)'}")
    assert system.registry(kind).names() == before


def test_allocation_returning_the_wrong_shape_fails_in_quantize(tiny_qwen3, restore_plugins):
    system = reload_plugins()
    system.register(_plugin(register_allocations=lambda register: register(
        "floaty", lambda d_out, rho, **context: torch.ones(d_out))), name="my_plugin")
    with pytest.raises(PluginError, match=re.escape(
            "allocation 'floaty' returned torch.float32 (128,) for layer 'model.layers.0.self_attn.q_proj'; "
            "expected a torch.bool tensor of shape (128,)")):
        edgerazor.quantize(tiny_qwen3, {"quant": {"weight": {"allocation": "floaty", "group_size": 64}}})


def test_misspelled_hook_fails_check_pending():
    class Typo:
        @hookimpl
        def register_alocations(self, register):
            register("x", _ok_allocation)

    system = PluginSystem(load_entry_points=False)
    system.pm.register(Typo(), name="typo")
    with pytest.raises(pluggy.PluginValidationError, match="unknown hook 'register_alocations'"):
        system.pm.check_pending()

    system = PluginSystem(load_entry_points=False)
    with pytest.raises(PluginError) as exc:
        system.register(Typo(), name="typo")
    msg = str(exc.value)
    assert msg.startswith("plugin 'typo': unknown hook 'register_alocations'")
    assert "edgerazor hooks are: " + ", ".join(sorted(_hookspecs())) in msg
    assert system.pm.get_plugin("typo") is None
    system.pm.check_pending()  # the system is usable again


def test_hookimpl_with_wrong_argument_name_fails_at_registration():
    class WrongArg:
        @hookimpl
        def register_allocations(self, reg):
            reg("x", _ok_allocation)

    with pytest.raises(PluginError, match=r"could not register plugin 'wrong'.*register_allocations"):
        PluginSystem(load_entry_points=False).register(WrongArg(), name="wrong")


def test_misspelled_hook_fails_at_start(tmp_path, monkeypatch):
    (tmp_path / "typo_plugin_mod.py").write_text(
        "from edgerazor import hookimpl\n\n@hookimpl\ndef register_quantizer(register):\n    pass\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(plugin_manager, "DEFAULT_PLUGINS", DEFAULT_PLUGINS + ("typo_plugin_mod",))
    try:
        with pytest.raises(PluginError, match=r"plugin 'typo_plugin_mod': unknown hook 'register_quantizer'"):
            PluginSystem(load_entry_points=False)
    finally:
        sys.modules.pop("typo_plugin_mod", None)


def _fake_distribution(site: Path, dist: str, version: str, ep_line: str, modules: dict[str, str]) -> None:
    """A minimal installed distribution (dist-info with an entry point), as pip would leave it."""
    info = site / f"{dist.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    (info / "entry_points.txt").write_text(f"[edgerazor]\n{ep_line}\n")
    for name, source in modules.items():
        (site / f"{name}.py").write_text(source)


def test_entry_point_errors_name_the_plugin_and_distribution(tmp_path, restore_plugins):
    monkeypatch = restore_plugins
    _fake_distribution(tmp_path, "edgerazor-broken", "1.0", "broken = edgerazor_missing_module", {})
    _fake_distribution(tmp_path, "edgerazor-typo", "1.0", "typo = edgerazor_typo_mod", {
        "edgerazor_typo_mod": "from edgerazor import hookimpl\n\n@hookimpl\ndef register_lossess(register):\n    pass\n"
    })
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        monkeypatch.setenv(PLUGINS_ENV, "broken")
        with pytest.raises(PluginError, match=re.escape(
                "could not load plugin 'broken' from 'edgerazor-broken' (edgerazor_missing_module): "
                "No module named 'edgerazor_missing_module'")):
            reload_plugins()
        monkeypatch.setenv(PLUGINS_ENV, "edgerazor_typo")  # by distribution name, any spelling
        with pytest.raises(PluginError, match=r"plugin 'typo': unknown hook 'register_lossess'"):
            reload_plugins()
        # the CLI reports it without a traceback, exit status 2
        assert cli_main(["plugins"]) == 2
    finally:
        sys.modules.pop("edgerazor_typo_mod", None)


# ---------------------------------------------------------------- docs/plugins.md vs hookspecs.py

HOOK_HEADING = re.compile(r"^### `(\w+)\((.*)\)`[ \t]*$", re.M)


def _doc_sections() -> dict[str, tuple[str, str]]:
    """hook name -> (documented argument list, section text up to the next heading of level <= 3)."""
    text = DOCS.read_text()
    headings = list(HOOK_HEADING.finditer(text))
    sections = {}
    for m in headings:
        rest = text[m.end():]
        end = re.search(r"^#{1,3} ", rest, re.M)
        sections[m.group(1)] = (m.group(2), rest[: end.start()] if end else rest)
    return sections


def test_docs_document_every_hook_with_its_exact_signature():
    text = DOCS.read_text()
    specs = _hookspecs()
    assert set(specs) == {hook for hook, _ in REGISTRY_SPECS.values()}, "every hookspec fills one registry"
    sections = _doc_sections()
    for name, fn in specs.items():
        args = str(inspect.signature(fn))[1:-1]
        assert f"### `{name}({args})`" in text.splitlines(), f"docs/plugins.md lacks the heading for {name}({args})"
        assert sections[name][0] == args
    level3 = [line for line in text.splitlines() if line.startswith("### ")]
    assert len(level3) == len(HOOK_HEADING.findall(text)), "every level-3 heading documents a hook"
    unknown = set(sections) - set(specs)
    assert not unknown, f"docs/plugins.md documents hooks that do not exist: {sorted(unknown)}"
    assert len(HOOK_HEADING.findall(text)) == len(specs), "a hook is documented twice"


def test_docs_sections_name_their_registry_and_cover_entry_points_env_and_errors():
    text = DOCS.read_text()
    sections = _doc_sections()
    for kind, (hook, _) in REGISTRY_SPECS.items():
        assert f"Registry `{kind}`" in sections[hook][1], hook
    assert "[project.entry-points.edgerazor]" in text
    assert PLUGINS_ENV in text
    for fragment in ("duplicate name", "unknown allocations entry", "with the wrong shape", "unknown hook"):
        assert fragment in text


def test_docs_examples_are_valid_plugins():
    """Every hook section's example plugin registers cleanly (right shape) into a fresh system."""
    system = PluginSystem(load_entry_points=False)
    for hook, (_, body) in _doc_sections().items():
        blocks = [b for b in re.findall(r"```python\n(.*?)```", body, re.S) if "@hookimpl" in b]
        assert blocks, f"the {hook} section has no example plugin"
        module = types.ModuleType(f"doc_example_{hook}")
        sys.modules[module.__name__] = module  # dataclasses look their module up
        try:
            for block in blocks:
                exec(compile(block, f"{DOCS}:{hook}", "exec"), module.__dict__)
        finally:
            del sys.modules[module.__name__]
        kind = plugin_manager.REGISTRY_HOOKS[hook]
        before = set(system.registry(kind).names())
        system.register(module, name=module.__name__)
        assert set(system.registry(kind).names()) > before, hook


# ---------------------------------------------------------------- a real third-party distribution


def _expected_mask(d_out: int, rho: float, parity: int = 1) -> list[bool]:
    """The plugin's documented pattern, written independently: rows of one parity from the end."""
    order = [i for i in reversed(range(d_out)) if i % 2 == parity] + [
        i for i in reversed(range(d_out)) if i % 2 != parity
    ]
    chosen = set(order[: round(rho * d_out)])
    return [i in chosen for i in range(d_out)]


def test_thirdparty_plugin_is_discovered_and_used(example_plugin, plugin_site, tiny_qwen3):
    system = example_plugin
    module = sys.modules[PLUGIN_MODULE]
    assert Path(module.__file__).resolve().is_relative_to(plugin_site.resolve()), "loaded from the pip install"

    infos = {i.name: i for i in system.describe()}
    info = infos[PLUGIN_EP]
    assert (info.distribution, info.version) == (PLUGIN_DIST, PLUGIN_VERSION)
    assert info.hooks == ["register_allocations", "register_losses"]
    assert info.registers == {"allocations": ["every_other"], "losses": ["logit_l2"]}
    assert system.registry("allocations").names() == ["every_other", "per_tensor", "random", "stacked", "super_group"]
    assert system.get("allocations", "every_other") is module.every_other
    assert system.get("losses", "logit_l2") is module.logit_l2
    assert system.registry("allocations").owners["every_other"] == PLUGIN_EP
    # the built-ins are still attributed to themselves
    assert all(system.registry(k).owners[n] == owner for (k, n), owner in BUILTINS.items())

    # the allocation honours rho and its option
    every_other = system.get("allocations", "every_other")
    for d_out, rho, parity in [(8, 0.25, 1), (8, 0.5, 1), (8, 0.75, 1), (10, 0.3, 0), (7, 0.5, 1), (6, 0.0, 1)]:
        assert every_other(d_out, rho, parity=parity, layer_name="x").tolist() == _expected_mask(d_out, rho, parity)

    # quantize() looks the allocation up by the recipe's name and stores the plugin's masks
    report = edgerazor.quantize(
        tiny_qwen3, {"quant": {"weight": {"allocation": "every_other", "rho": 0.5, "group_size": 64}}}
    )
    linear = [layer for layer in report.layers if layer.kind == "linear"]
    assert len(linear) == 2 * 7
    for layer in linear:
        mask = tiny_qwen3.get_submodule(layer.name).weight_quant.precision_mask
        assert mask.tolist() == _expected_mask(layer.d_out, 0.5), layer.name
        assert mask.tolist() != system.get("allocations", "super_group")(layer.d_out, 0.5).tolist()
        assert layer.high_fraction == 0.5
    out = tiny_qwen3(torch.randint(0, 512, (1, 8)))
    assert torch.isfinite(out.logits).all()

    # the loss term: mean squared logit difference, a scalar
    logit_l2 = system.get("losses", "logit_l2")
    student = SimpleNamespace(logits=torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
    teacher = SimpleNamespace(logits=torch.tensor([[1.0, 0.0], [3.0, 8.0]]))
    loss = logit_l2(student, teacher, {"input_ids": None})
    assert loss.ndim == 0 and loss.item() == pytest.approx((4 + 16) / 4)


def test_thirdparty_allocation_options_reach_the_plugin(example_plugin, tiny_qwen3):
    edgerazor.quantize(tiny_qwen3, {"quant": {"weight": {
        "allocation": "every_other", "rho": 0.25, "group_size": 64, "allocation_options": {"parity": 0}}}})
    mask = tiny_qwen3.get_submodule("model.layers.1.mlp.down_proj").weight_quant.precision_mask
    assert mask.tolist() == _expected_mask(128, 0.25, parity=0)


@pytest.mark.parametrize(
    ("value", "loaded"),
    [("", False), ("example", True), (PLUGIN_DIST, True), ("edgerazor_example_plugin", True),
     ("other-plugin", False), ("other, example ", True)],
)
def test_edgerazor_plugins_env_selects_entry_points(example_plugin, restore_plugins, tiny_qwen3, value, loaded):
    restore_plugins.setenv(PLUGINS_ENV, value)
    system = reload_plugins()
    assert (PLUGIN_EP in dict(system.pm.list_name_plugin())) is loaded
    assert ("every_other" in system.registry("allocations").names()) is loaded
    assert ("logit_l2" in system.registry("losses").names()) is loaded
    if not loaded:
        with pytest.raises(PluginError, match=r"unknown allocations entry 'every_other'; available: per_tensor, random, stacked"):
            edgerazor.quantize(tiny_qwen3, {"quant": {"weight": {"allocation": "every_other", "group_size": 64}}})
    # the built-ins never depend on the variable
    assert all(system.registry(k).owners[n] == owner for (k, n), owner in BUILTINS.items())


# ---------------------------------------------------------------- the CLI


def test_cli_plugins_json_lists_every_plugin(example_plugin, capsys):
    assert cli_main(["plugins", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    by_name = {p["name"]: p for p in data}
    assert list(by_name)[: len(DEFAULT_PLUGINS)] == list(DEFAULT_PLUGINS)
    for entry in data:
        assert set(entry) == {"name", "distribution", "version", "hooks", "registers"}
    own = importlib.metadata.version("edgerazor")
    for (kind, name), owner in BUILTINS.items():
        entry = by_name[owner]
        assert (entry["distribution"], entry["version"]) == ("edgerazor", own)
        assert REGISTRY_SPECS[kind][0] in entry["hooks"]
        assert name in entry["registers"][kind]
    assert by_name[PLUGIN_EP] == {
        "name": PLUGIN_EP, "distribution": PLUGIN_DIST, "version": PLUGIN_VERSION,
        "hooks": ["register_allocations", "register_losses"],
        "registers": {"allocations": ["every_other"], "losses": ["logit_l2"]},
    }


def test_console_script_plugins(plugin_site):
    """A fresh process finds the pip-installed plugin by its entry point (one run: importing torch is slow)."""
    script = _console_script()
    proc = subprocess.run([script, "plugins"], capture_output=True, text=True, env=_env_with(plugin_site), timeout=120)
    assert proc.returncode == 0, proc.stderr
    for text in ("EdgeRazor plugins", "edgerazor.plugins.allocations", "super_group", PLUGIN_DIST, "every_other"):
        assert text in proc.stdout, proc.stdout
