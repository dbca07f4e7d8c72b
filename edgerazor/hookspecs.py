"""The public plugin API: one hookspec per extension point.

Every hook is called with a single ``register(name, obj)`` callback. Built-in plugins use exactly
these hooks too. ``docs/plugins.md`` documents the object each registry expects; a test keeps
that page and these signatures in step.
"""

import pluggy

hookspec = pluggy.HookspecMarker("edgerazor")
hookimpl = pluggy.HookimplMarker("edgerazor")


@hookspec
def register_quantizers(register):
    """Register weight/activation quantizers: ``register(name, GroupQuantizer)``.

    A quantizer maps a tensor of groups ``[..., J, G]`` to per-group scales ``[..., J]``
    (``scale(groups)``) and declares its integer range ``qmax`` (codes in ``[-qmax, qmax]``,
    ``1 <= qmax <= 127``), its storage ``bits`` (size accounting and a scheme's W) and, optionally,
    the ``codec`` the packed format stores its codes with (default: the generic ``sym{qmax}``).
    """


@hookspec
def register_allocations(register):
    """Register SQMP row allocations: ``register(name, fn)``.

    ``fn(d_out: int, rho: float, **context) -> torch.BoolTensor`` of shape ``[d_out]``,
    True marking a high-precision (4-bit) output row.
    """


@hookspec
def register_selectors(register):
    """Register feature-layer selectors for feature distillation: ``register(name, fn)``.

    ``fn(teacher_hidden_states: Sequence[Tensor], mask: BoolTensor, **options) -> list[int]``
    returns the decoder-layer indices (1..L) whose features are distilled this batch.
    """


@hookspec
def register_kl_mixers(register):
    """Register logit-distillation mixers: ``register(name, fn)``.

    ``fn(stats, **options) -> Tensor``: the weight of the forward KL (scalar or per token);
    the reverse KL gets ``1 - weight``. ``stats`` carries per-token teacher statistics.
    """


@hookspec
def register_losses(register):
    """Register extra loss terms: ``register(name, fn)``.

    ``fn(student_out, teacher_out, batch) -> Tensor`` (a scalar), weighted by the recipe.
    """


@hookspec
def register_adapters(register):
    """Register model adapters: ``register(name, ModelAdapter)``.

    A ``edgerazor.adapters.ModelAdapter`` instance (or subclass) knows one model family: loading,
    components and their default quantization, the decoder layer list (LAFD), attention modules
    (KV cache), training rows, chat template and ``<think>`` handling, and the GGUF architecture.
    """


@hookspec
def register_exporters(register):
    """Register exporters: ``register(name, fn)``.

    ``fn(model, out_dir, tokenizer=None, **options) -> pathlib.Path`` writes a deployable artefact
    and returns its path. The options it accepts are the keyword parameters it names; any other
    option is refused by ``run_exporter`` (and ``edgerazor export``). An optional attribute
    ``fn.size_report(path) -> dict`` describes what was written. An exporter that takes an
    ``overwrite`` option (``edgerazor export --overwrite``) must refuse an existing target unless it
    is set and the target is its own earlier output (``edgerazor.export.files.staged`` does this);
    for an exporter without it, ``edgerazor export`` refuses an existing ``--out`` itself.
    """
