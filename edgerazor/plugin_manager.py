"""The plugin manager: built-ins, third-party entry points, and the named registries they fill.

Built-in plugins (``DEFAULT_PLUGINS``) are plain modules registered by import; third-party
plugins are distributions with an entry point in the ``edgerazor`` group. Set
``EDGERAZOR_PLUGINS`` to a comma-separated list of entry-point or distribution names to load
only those (an empty value loads none).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import inspect
import os
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import pluggy

from edgerazor import hookspecs
from edgerazor.errors import PluginError

ENTRY_POINT_GROUP = "edgerazor"
PLUGINS_ENV = "EDGERAZOR_PLUGINS"

DEFAULT_PLUGINS = (
    "edgerazor.plugins.quantizers",
    "edgerazor.plugins.allocations",
    "edgerazor.plugins.selectors",
    "edgerazor.plugins.kl_mixers",
    "edgerazor.plugins.exporters",
    "edgerazor.model_adapters.qwen3",
    "edgerazor.model_adapters.mobilellm",
    "edgerazor.model_adapters.qwen2_5_omni",
    "edgerazor.model_adapters.generic",
)


def _positional_arity_ok(fn: Callable, n: int, needs_var_kw: bool = False) -> bool:
    """True when ``fn`` can be called with ``n`` positional arguments (and ``**kw`` if asked)."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return True  # builtins without signatures: trust them
    try:
        sig.bind(*range(n))
    except TypeError:
        return False
    if needs_var_kw:
        return any(p.kind is inspect.Parameter.VAR_KEYWORD for p in sig.parameters.values())
    return True


def _check_quantizer(obj: Any) -> str | None:
    qmax = getattr(obj, "qmax", None)
    if not callable(getattr(obj, "scale", None)):
        return "a quantizer needs a scale(groups) -> Tensor method"
    if not isinstance(qmax, int) or qmax < 1:
        return "a quantizer needs an integer qmax >= 1"
    if qmax > 127:
        return "a quantizer needs qmax <= 127 (codes are stored as int8)"
    bits = getattr(obj, "bits", None)
    if not isinstance(bits, (int, float)) or isinstance(bits, bool) or not bits > 0:
        return "a quantizer needs a numeric bits attribute > 0"
    codec = getattr(obj, "codec", None)
    if codec is not None and not (isinstance(codec, str) and codec):
        return "a quantizer's codec must be a codec name (str) or None"
    return None


def _check_callable(n: int, var_kw: bool, signature: str) -> Callable[[Any], str | None]:
    def check(obj: Any) -> str | None:
        if not callable(obj) or not _positional_arity_ok(obj, n, var_kw):
            return f"expected a callable {signature}"
        return None

    return check


def _check_adapter(obj: Any) -> str | None:
    # by qualified name: edgerazor.adapters imports this module, so importing it here would be a cycle
    bases = {f"{c.__module__}.{c.__qualname__}" for c in type(obj).__mro__}
    return None if "edgerazor.adapters.ModelAdapter" in bases else "expected an edgerazor.adapters.ModelAdapter instance"


def _check_exporter(obj: Any) -> str | None:
    problem = _check_callable(2, True, "(model, out_dir, **options) -> Path")(obj)
    if problem is None and getattr(obj, "size_report", None) is not None and not callable(obj.size_report):
        return "an exporter's size_report must be a callable (path) -> dict"
    return problem


#: registry name -> (hook name, validator). The validators define what "the wrong shape" means.
REGISTRY_SPECS: dict[str, tuple[str, Callable[[Any], str | None]]] = {
    "quantizers": ("register_quantizers", _check_quantizer),
    "allocations": (
        "register_allocations",
        _check_callable(2, True, "(d_out: int, rho: float, **context) -> torch.BoolTensor"),
    ),
    "selectors": (
        "register_selectors",
        _check_callable(2, True, "(teacher_hidden_states, mask, **options) -> list[int]"),
    ),
    "kl_mixers": ("register_kl_mixers", _check_callable(1, True, "(stats, **options) -> Tensor")),
    "losses": ("register_losses", _check_callable(3, False, "(student_out, teacher_out, batch) -> Tensor")),
    "adapters": ("register_adapters", _check_adapter),
    "exporters": ("register_exporters", _check_exporter),
}

REGISTRY_HOOKS = {hook: kind for kind, (hook, _) in REGISTRY_SPECS.items()}


@dataclass
class Registry:
    """Named objects of one kind, remembering which plugin registered each."""

    kind: str
    validate: Callable[[Any], str | None]
    items: dict[str, Any] = field(default_factory=dict)
    owners: dict[str, str] = field(default_factory=dict)

    def add(self, name: str, obj: Any, owner: str) -> None:
        if not isinstance(name, str) or not name:
            raise PluginError(f"plugin {owner!r} registered a {self.kind} entry with an invalid name {name!r}")
        if name in self.items:
            raise PluginError(
                f"duplicate name {name!r} in registry {self.kind!r}: registered by {owner!r}, "
                f"already registered by {self.owners[name]!r}; available: {', '.join(sorted(self.items))}"
            )
        problem = self.validate(obj)
        if problem:
            raise PluginError(
                f"plugin {owner!r} registered {name!r} in registry {self.kind!r} with the wrong shape: "
                f"{problem}, got {obj!r}; available: {', '.join(sorted(self.items)) or '(none)'}"
            )
        self.items[name] = obj
        self.owners[name] = owner

    def get(self, name: str) -> Any:
        try:
            return self.items[name]
        except KeyError:
            raise PluginError(
                f"unknown {self.kind} entry {name!r}; available: {', '.join(sorted(self.items)) or '(none)'}"
            ) from None

    def names(self) -> list[str]:
        return sorted(self.items)


@dataclass
class PluginInfo:
    name: str
    distribution: str
    version: str
    hooks: list[str]
    registers: dict[str, list[str]]


class PluginSystem:
    """A pluggy ``PluginManager`` plus the registries its hooks fill."""

    def __init__(self, load_entry_points: bool = True) -> None:
        self.pm = pluggy.PluginManager(ENTRY_POINT_GROUP)
        self.pm.add_hookspecs(hookspecs)
        self.dists: dict[str, tuple[str, str]] = {}
        for module_name in DEFAULT_PLUGINS:
            module = importlib.import_module(module_name)
            self._register(module, module_name, "edgerazor")
            self.dists[module_name] = ("edgerazor", _own_version())
        if load_entry_points:
            self._load_entry_points()
        self._check_pending()
        self.registries = self._collect()

    def register(self, plugin: Any, name: str | None = None, distribution: str = "?", version: str = "?") -> str:
        """Register ``plugin`` (a module or object with ``@hookimpl`` functions) and rebuild the registries.

        On any error (a misspelled hook, a duplicate or malformed entry) the plugin is unregistered again,
        the registries are left as they were, and a ``PluginError`` says what went wrong.
        """
        name = self._register(plugin, name, distribution)
        try:
            self._check_pending()
            registries = self._collect()
        except BaseException:
            self.pm.unregister(name=name)
            raise
        self.dists[name] = (distribution, version)
        self.registries = registries
        return name

    def _register(self, plugin: Any, name: str | None, dist_name: str) -> str:
        try:
            registered = self.pm.register(plugin, name=name)
        except (pluggy.PluginValidationError, ValueError) as exc:
            raise PluginError(f"could not register plugin {name or plugin!r} from {dist_name!r}: {exc}") from exc
        if registered is None:  # blocked via pm.set_blocked
            raise PluginError(f"plugin {name or plugin!r} from {dist_name!r} is blocked")
        return registered

    def _check_pending(self) -> None:
        """A hook implementation whose name is no hookspec (a typo) fails here, naming the plugin."""
        try:
            self.pm.check_pending()
        except pluggy.PluginValidationError as exc:
            owner = self.pm.get_name(exc.plugin) or repr(exc.plugin)
            known = sorted(REGISTRY_HOOKS)
            raise PluginError(f"plugin {owner!r}: {exc}; edgerazor hooks are: {', '.join(known)}") from exc

    def _load_entry_points(self) -> None:
        allowed = os.environ.get(PLUGINS_ENV)
        allow = None if allowed is None else {s.strip() for s in allowed.split(",") if s.strip()}
        allow_dists = None if allow is None else {_normalize_dist(s) for s in allow}
        for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
            dist_name = ep.dist.name if ep.dist else "?"
            if allow is not None and ep.name not in allow and _normalize_dist(dist_name) not in allow_dists:
                continue
            if self.pm.get_plugin(ep.name) is not None:
                continue
            try:
                plugin = ep.load()
            except Exception as exc:  # a broken plugin must name itself
                raise PluginError(f"could not load plugin {ep.name!r} from {dist_name!r} ({ep.value}): {exc}") from exc
            self._register(plugin, ep.name, dist_name)
            self.dists[ep.name] = (dist_name, ep.dist.version if ep.dist else "?")

    def _collect(self) -> dict[str, Registry]:
        registries = {}
        for kind, (hook_name, validate) in REGISTRY_SPECS.items():
            registry = Registry(kind, validate)
            # Call each implementation separately so every name is attributed to its plugin, in
            # registration order (built-ins first), so a clash is blamed on the later plugin.
            for impl in getattr(self.pm.hook, hook_name).get_hookimpls():
                owner = impl.plugin_name
                impl.function(register=lambda name, obj, _o=owner, _r=registry: _r.add(name, obj, _o))
            registries[kind] = registry
        return registries

    def registry(self, kind: str) -> Registry:
        try:
            return self.registries[kind]
        except KeyError:
            raise PluginError(f"unknown registry {kind!r}; available: {', '.join(sorted(self.registries))}") from None

    def get(self, kind: str, name: str) -> Any:
        return self.registry(kind).get(name)

    def describe(self) -> list[PluginInfo]:
        out = []
        for name, plugin in self.pm.list_name_plugin():
            hooks = sorted(caller.name for caller in (self.pm.get_hookcallers(plugin) or []))
            registers = {
                kind: sorted(n for n, owner in reg.owners.items() if owner == name)
                for kind, reg in self.registries.items()
            }
            dist, version = self.dists.get(name, ("?", "?"))
            out.append(PluginInfo(name, dist, version, hooks, {k: v for k, v in registers.items() if v}))
        return out


def _normalize_dist(name: str) -> str:
    """PEP 503 form, so ``my_plugin``, ``My.Plugin`` and ``my-plugin`` name one distribution."""
    return re.sub(r"[-_.]+", "-", name).lower()


def _own_version() -> str:
    try:
        return importlib.metadata.version("edgerazor")
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown"


_lock = threading.Lock()
_system: PluginSystem | None = None


def get_plugins() -> PluginSystem:
    """The process-wide plugin system, built on first use."""
    global _system
    with _lock:
        if _system is None:
            _system = PluginSystem()
        return _system


def reload_plugins() -> PluginSystem:
    """Rebuild the plugin system, e.g. after installing a plugin distribution at run time."""
    global _system
    importlib.invalidate_caches()
    with _lock:
        _system = None
    return get_plugins()


def get(kind: str, name: str) -> Any:
    """Look up ``name`` in registry ``kind`` ("quantizers", "allocations", ...)."""
    return get_plugins().get(kind, name)


def exporter_options(exporter: Callable) -> list[str] | None:
    """The options an exporter accepts: its keyword parameters after ``model, out_dir, tokenizer``.

    None when its signature cannot be read (then every option is passed on unchecked).
    """
    try:
        params = list(inspect.signature(exporter).parameters.values())
    except (TypeError, ValueError):
        return None
    named = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return [p.name for p in params[2:] if p.kind in named and p.name != "tokenizer"]


def run_exporter(name: str, model: Any, out_dir: Any, tokenizer: Any = None, **options: Any) -> Path:
    """Call exporter ``name`` as ``fn(model, out_dir, tokenizer=tokenizer, **options)``; returns its Path.

    An option the exporter does not name as a keyword parameter is an error, never silently swallowed
    by its ``**options``.
    """
    exporter = get("exporters", name)
    accepted = exporter_options(exporter)
    if accepted is not None:
        for key in options:
            if key not in accepted:
                raise PluginError(
                    f"exporter {name!r} does not accept the option {key!r}; its options: {', '.join(accepted) or '(none)'}"
                )
    path = exporter(model, out_dir, tokenizer=tokenizer, **options)
    if not isinstance(path, (str, os.PathLike)):
        raise PluginError(f"exporter {name!r} returned {type(path).__name__}; expected the pathlib.Path it wrote")
    return Path(path)

