"""``edgerazor plan``'s per-step memory against the measured peak of a real distillation step on CPU.

    python tools/bench_plan.py                      # hidden 512, 4 layers, vocab 4096, 2 x 512 tokens
    python tools/bench_plan.py --quick              # a tiny shape (seconds)

A Qwen3-shaped teacher and student (a real transformers ``Qwen3Config``, random weights, float32)
run the step ``edgerazor run`` trains with, in this process: the student quantized by
``edgerazor.quant.quantize`` (the default recipe at the family's default rho: W1.88-A8-KV8), a
``DistillationTrainer`` built by ``training_arguments``, and its own pieces of ``compute_loss``: the
teacher's forward under ``no_grad``, the student's forward (both recording the residual stream for
LAFD, the lm_head fused into the logit loss), ``distillation_loss`` and the backward. Once without
and once with gradient checkpointing (``activation_checkpointing_enable``, as the Trainer calls it).

Measure: ``torch.profiler`` with ``profile_memory=True`` records every allocation and free of
torch's CPU allocator (``[memory]`` events, signed bytes, timestamped). Their running sum from the
start of the step is the bytes the step holds beyond what was live before it, so the resident
model states (teacher, student, masks; no optimizer step is taken) are subtracted by construction.
Not RSS: the process's resident set also moves with glibc's heap caching, other libraries' buffers
and page reuse, which at these sizes is as large as the activations themselves. The step's phases
are ``record_function`` ranges; measured per phase:

* ``activations``: held when the student's forward returns (saved tensors for backward, the
  fake-quantized weights autograd keeps, both models' recorded residual stream) or, if more, the
  backward's peak less the gradients completed by then (under checkpointing the recomputed layer
  peaks there; a ``post_accumulate_grad`` hook marks each finished gradient in the profile), against
  plan's activation term;
* ``fake_quant_workspace``: the student forward's peak above that (its largest transient), against
  plan's fake-quant workspace;
* ``logit_loss``: the loss's peak above what was held when it began, against plan's logit-loss chunk
  (the fused loss also holds the lm_head weight's gradient and the hidden states' gradient, which
  plan does not count separately);
* ``gradients``: the student's ``.grad`` bytes after backward, against P x 4 (float32);
* ``step_peak``: the step's peak against plan's sum of those four.

Outputs: a rich table (component, plan, measured, measured / plan), ``--out`` JSON (default
``runs/bench_plan/results.json``) and a bar plot beside it.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from edgerazor.plan import FP32, plan_memory  # noqa: E402

MIB = 2**20
PHASES = ("teacher_forward", "student_forward", "loss", "backward")
GRADIENT_MARK = "gradient_complete:"
COMPONENTS = ("activations", "fake_quant_workspace", "logit_loss", "gradients", "step_peak")


def qwen3_config(hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int, head_dim: int,
                 vocab: int, seq: int):
    from transformers import Qwen3Config

    return Qwen3Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                       num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                       head_dim=head_dim, tie_word_embeddings=True, max_position_embeddings=max(seq, 256))


def default_recipe(config):
    """The recipe ``plan`` assumes without one: the defaults at the family's default rho."""
    from edgerazor.adapters import resolve_adapter
    from edgerazor.recipe import load_recipe

    family = resolve_adapter(config.model_type, None)
    return load_recipe(None, [f"quant.weight.rho={family.extra.get('default_rho', 0.125)}"]), family


def _live_timeline(prof):
    """``([(time_ns, live bytes after the event)], {phase: (start_ns, end_ns)}, [(time_ns, gradient
    bytes completed)])`` from the raw
    profiler events (``prof.events()`` folds allocations into the ops that made them)."""
    events = list(prof.profiler.kineto_results.events())
    allocations = sorted(((e.start_ns(), e.nbytes()) for e in events
                          if e.name() == "[memory]" and str(e.device_type()).endswith("CPU")), key=lambda item: item[0])
    live, timeline = 0, []
    for start, change in allocations:
        live += change
        timeline.append((start, live))
    phases = {e.name(): (e.start_ns(), e.start_ns() + e.duration_ns()) for e in events if e.name() in PHASES}
    marks = [(e.start_ns(), int(e.name()[len(GRADIENT_MARK):])) for e in events if e.name().startswith(GRADIENT_MARK)]
    return timeline, phases, marks


def _live_at(timeline, t: float) -> int:
    before = [live for when, live in timeline if when <= t]
    return before[-1] if before else 0


def _peak(timeline, start: float, end: float) -> int:
    return max((live for when, live in timeline if start <= when <= end), default=_live_at(timeline, start))


def measure_step(config, seq: int, micro_batch: int, checkpointing: bool, seed: int = 0) -> dict:
    """Bytes of one distillation step (module docstring) beyond what was live before it."""
    from transformers import Qwen3ForCausalLM

    from edgerazor.distill.objective import distillation_loss
    from edgerazor.distill.trainer import DistillationTrainer, training_arguments
    from edgerazor.quant import quantize

    recipe, family = default_recipe(config)
    torch.manual_seed(seed)
    teacher = Qwen3ForCausalLM(config).float().eval()
    student = Qwen3ForCausalLM(config).float()
    student.load_state_dict(teacher.state_dict())
    quantize(student, recipe, adapter=family)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = DistillationTrainer(model=student, teacher=teacher, recipe=recipe, adapter=family,
                                      args=training_arguments(recipe, tmp, use_cpu=True, disable_tqdm=True),
                                      data_collator=lambda rows: rows)
    student.train()
    if checkpointing:
        student.activation_checkpointing_enable()  # what the Trainer does for train.gradient_checkpointing
    ids = torch.randint(0, config.vocab_size, (micro_batch, seq), generator=torch.Generator().manual_seed(seed))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    params = {id(p): p for p in student.parameters() if p.requires_grad}.values()
    def mark_gradient(p):  # a profiler event at the time each gradient is complete, with its bytes
        with record_function(f"{GRADIENT_MARK}{p.grad.numel() * p.grad.element_size()}"):
            pass

    hooks = [p.register_post_accumulate_grad_hook(mark_gradient) for p in params]
    for p in params:
        p.grad = None
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        with record_function("teacher_forward"), torch.no_grad():
            teacher_out = trainer._forward(teacher, batch)
        with record_function("student_forward"):
            student_out = trainer._forward(student, batch)
        with record_function("loss"):
            loss = distillation_loss(student_out, teacher_out, batch, recipe.distill).total
        del teacher_out, student_out  # compute_loss returns only the loss to the Trainer's backward
        with record_function("backward"):
            loss.backward()
        del loss
    for hook in hooks:
        hook.remove()
    timeline, phases, marks = _live_timeline(prof)
    fwd_start, fwd_end = phases["student_forward"]
    loss_start, loss_end = phases["loss"]
    held_after_forward = _live_at(timeline, fwd_end)
    held_before_loss = _live_at(timeline, loss_start)
    back_start, back_end = phases["backward"]
    # in backward, what is live beyond the gradients finished so far: saved tensors, the recomputed
    # layer under checkpointing, autograd's temporaries
    backward_activations = max((live - sum(b for when, b in marks if when <= t) for t, live in timeline
                                if back_start <= t <= back_end), default=0)
    gradients = sum(p.grad.numel() * p.grad.element_size() for p in params if p.grad is not None)
    return {
        "activations": max(held_after_forward, backward_activations),
        "held_after_forward": held_after_forward,
        "backward_peak_less_gradients": backward_activations,
        "fake_quant_workspace": _peak(timeline, fwd_start, fwd_end) - held_after_forward,
        "logit_loss": _peak(timeline, loss_start, loss_end) - held_before_loss,
        "gradients": gradients,
        "step_peak": max((live for _, live in timeline), default=0),
        "phase_peaks": {name: _peak(timeline, *phases[name]) for name in PHASES},
        "resident_model_states": sum(p.numel() * p.element_size() for p in {id(p): p for p in
                                     [*teacher.parameters(), *student.parameters()]}.values()),
        "fused_logits": trainer.fused_logits,
    }


def plan_step(config, seq: int, micro_batch: int, checkpointing: bool) -> dict:
    """Plan's terms for the same shape in float32 (``dtype_bytes=4``), one GPU."""
    with tempfile.TemporaryDirectory() as tmp:
        config.save_pretrained(tmp)
        plan = plan_memory(tmp, 1, 80, 2, seq=seq, micro_batch=micro_batch, gradient_checkpointing=checkpointing,
                           dtype_bytes=FP32)
    terms = {
        "activations": plan.components["activations"],
        "fake_quant_workspace": plan.components["fake_quant_workspace"],
        "logit_loss": plan.components["logit_loss_chunk"],
        "gradients": FP32 * plan.total_params,
    }
    terms["step_peak"] = sum(terms.values())
    return terms


def compare(config, seq: int, micro_batch: int, details: dict | None = None) -> list[dict]:
    """Rows of (checkpointing, component, plan bytes, measured bytes, measured / plan); ``details``
    receives every measured quantity per checkpointing setting."""
    rows = []
    for checkpointing in (False, True):
        measured = measure_step(config, seq, micro_batch, checkpointing)
        planned = plan_step(config, seq, micro_batch, checkpointing)
        if details is not None:
            details["on" if checkpointing else "off"] = measured
        for name in COMPONENTS:
            rows.append({"gradient_checkpointing": checkpointing, "component": name, "plan_bytes": planned[name],
                         "measured_bytes": measured[name],
                         "ratio": measured[name] / planned[name] if planned[name] else None})
    return rows


def print_table(rows: list[dict], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for column in ("checkpointing", "component", "plan MiB", "measured MiB", "measured / plan"):
        table.add_column(column, justify="right" if "MiB" in column or "/" in column else "left")
    for row in rows:
        ratio = "-" if row["ratio"] is None else f"{row['ratio']:.2f}"
        table.add_row("on" if row["gradient_checkpointing"] else "off", row["component"],
                      f"{row['plan_bytes'] / MIB:.2f}", f"{row['measured_bytes'] / MIB:.2f}", ratio)
    Console().print(table)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, checkpointing in zip(axes, (False, True)):
        mine = [r for r in rows if r["gradient_checkpointing"] == checkpointing]
        x = range(len(mine))
        ax.bar([i - 0.2 for i in x], [r["plan_bytes"] / MIB for r in mine], 0.4, label="plan")
        ax.bar([i + 0.2 for i in x], [r["measured_bytes"] / MIB for r in mine], 0.4, label="measured")
        ax.set_xticks(list(x), [r["component"] for r in mine], rotation=30, ha="right")
        ax.set_title(f"gradient checkpointing {'on' if checkpointing else 'off'}")
    axes[0].set_ylabel("MiB")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--intermediate", type=int, default=1536)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--micro-batch", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="hidden 256, 2 layers, vocab 1024, 1 x 256 tokens")
    parser.add_argument("--out", type=Path, default=Path("runs/bench_plan/results.json"))
    args = parser.parse_args(argv)
    if args.quick:
        args.hidden, args.intermediate, args.layers, args.heads, args.head_dim = 256, 512, 2, 4, 64
        args.vocab, args.seq, args.micro_batch = 1024, 256, 1
    config = qwen3_config(args.hidden, args.intermediate, args.layers, args.heads, args.kv_heads, args.head_dim,
                          args.vocab, args.seq)
    details: dict = {}
    rows = compare(config, args.seq, args.micro_batch, details)
    shape = (f"hidden {args.hidden}, intermediate {args.intermediate}, {args.layers} layers, {args.heads}/"
             f"{args.kv_heads} heads x {args.head_dim}, vocab {args.vocab}, {args.micro_batch} x {args.seq} tokens")
    print_table(rows, f"plan vs measured step memory (float32, CPU): {shape}")
    out = args.out
    if out.exists() and not out.is_file():
        parser.error(f"--out {out}: not a file")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"shape": vars(args) | {"out": str(out)}, "dtype": "float32",
                               "measure": "torch.profiler profile_memory (CPU allocator), bytes beyond the "
                                          "state live before the step", "rows": rows,
                               "measured_details": details}, indent=1) + "\n")
    try:
        plot(rows, out.with_suffix(".png"))
    except ImportError:
        pass
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
