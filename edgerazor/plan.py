"""Per-GPU memory of a distillation run before it starts (``edgerazor plan``).

A 7B teacher and a 7B student on 8 GPUs either fit or fail after the weights have loaded; this
says which from the model's shape alone. The model is built on the meta device through its
adapter, so parameter counts are exact and nothing is allocated.

Assumed dtypes are DeepSpeed's bf16 mixed precision: 16-bit (bf16) parameters and gradients, fp32
master weights, fp32 gradient partitions and fp32 Adam moments (m, v). Per GPU, with P parameters,
N GPUs and L the largest module's own parameters (what ZeRO-3 gathers at once):

- ZeRO-2: weights 2P + 4P/N, gradients 2P/N + 4P/N, Adam 8P/N  (= 2P + 18P/N)
- ZeRO-3: weights 2P/N + 2L + 4P/N, gradients 2L + 4P/N, Adam 8P/N  (= 4L + 18P/N)

which is what DeepSpeed's ``estimate_zero2_model_states_mem_needs`` and
``estimate_zero3_model_states_mem_needs`` (no offload) return. The frozen bf16 teacher is sharded
like ZeRO-3 inference (2P_t/N + 2L_t) under either student stage: under ``--zero 2`` that means a
ZeRO-3 inference engine for the teacher beside the ZeRO-2 student.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from edgerazor.errors import EdgeRazorError

GIB = 2**30
#: bytes of a bf16 parameter, activation or gradient; fp32 for master weights, moments and logits
HALF, FP32 = 2, 4
#: never planned away: the CUDA context and allocator fragmentation
RESERVE_FIXED_GIB = 1.0
RESERVE_FRACTION = 0.10
#: the paper's training machine (Sec. 4: 8 x A100-80GB) and sequence length (App. D.1: 1024 tokens)
PAPER_GPUS, PAPER_GPU_MEM, PAPER_SEQ = 8, 80.0, 1024
#: the paper's recipes (configs/table1) for ``edgerazor plan --paper``: built-in shape -> recipe file
PAPER_RECIPES = {
    "qwen3-0.6b": "table1/qwen3-0.6b-w1.88.yaml",
    "qwen3-1.7b": "table1/qwen3-1.7b-w1.88.yaml",
    "mobilellm-350m": "table1/mobilellm-350m-w1.88.yaml",
    "qwen2.5-omni-7b-thinker": "table1/qwen2.5-omni-7b-w4.00.yaml",
}


@dataclass
class Plan:
    """Bytes per GPU by component; ``components`` sums to ``per_gpu``."""

    model: str
    gpus: int
    gpu_mem_gib: float
    zero: int
    seq: int
    micro_batch: int
    gradient_checkpointing: bool
    total_params: int
    largest_layer_params: int
    model_states: dict[str, int]  # student_weights, gradients, adam_states
    components: dict[str, int]
    activations: dict[str, int]  # with_checkpointing, without_checkpointing
    notes: list[str] = field(default_factory=list)

    @property
    def per_gpu(self) -> int:
        return sum(self.components.values())

    @property
    def reserve_gib(self) -> float:
        return RESERVE_FIXED_GIB + RESERVE_FRACTION * self.gpu_mem_gib

    @property
    def fits(self) -> bool:
        return self.per_gpu / GIB <= self.gpu_mem_gib - self.reserve_gib

    def to_dict(self) -> dict:
        gib = lambda d: {k: round(v / GIB, 4) for k, v in d.items()}  # noqa: E731
        return {
            "model": self.model, "gpus": self.gpus, "gpu_mem_gib": self.gpu_mem_gib, "zero": self.zero,
            "seq": self.seq, "micro_batch": self.micro_batch, "gradient_checkpointing": self.gradient_checkpointing,
            "total_params": self.total_params, "largest_layer_params": self.largest_layer_params,
            "per_gpu_gib": round(self.per_gpu / GIB, 4), "components": gib(self.components),
            "model_states_detail": gib(self.model_states), "activations_gib": gib(self.activations),
            "reserve_gib": round(self.reserve_gib, 4), "fits": self.fits,
            "dtypes": "bf16 params/grads/teacher/activations, fp32 master weights, grad partitions, Adam m and v, logits",
            "notes": self.notes,
        }


def model_state_bytes(total_params: int, largest_layer_params: int, gpus: int, zero: int) -> dict[str, int]:
    """Student weights, gradients and Adam moments per GPU (the module docstring's formulas)."""
    p, n, big = total_params, gpus, largest_layer_params
    if zero == 2:
        return {"student_weights": HALF * p + FP32 * p // n, "gradients": (HALF + FP32) * p // n,
                "adam_states": 2 * FP32 * p // n}
    if zero == 3:
        return {"student_weights": HALF * p // n + HALF * big + FP32 * p // n,
                "gradients": HALF * big + FP32 * p // n, "adam_states": 2 * FP32 * p // n}
    raise EdgeRazorError(f"--zero {zero}: only ZeRO stages 2 and 3 are planned")


def resident_model_state_bytes(total_params: int, gpus: int, zero: int, param_bytes: int = HALF) -> dict[str, int]:
    """What a rank holds between steps, to check against a run's measured ``ranks.bytes`` in results.json:
    the student's parameters (whole under ZeRO-2, a 1/N partition under ZeRO-3), the fp32 master
    partition and Adam's m and v (fp32, 1/N each). Gradients are freed after the step and ZeRO-3's
    gathered module (the ``L`` terms of ``model_state_bytes``) lives only inside a forward or backward.
    ``param_bytes``: 2 for bf16 training (this module's assumption), 4 for a float32 run, where ZeRO-3
    steps the float32 partition in place (no master copy) and ZeRO-2 still keeps one."""
    p, n = total_params, gpus
    if zero not in (2, 3):
        raise EdgeRazorError(f"--zero {zero}: only ZeRO stages 2 and 3 are planned")
    master = 0 if zero == 3 and param_bytes == FP32 else FP32 * p // n
    return {"student_parameters": param_bytes * p if zero == 2 else param_bytes * p // n,
            "optimizer_master": master, "optimizer_adam": 2 * FP32 * p // n}


def layer_activation_elements(hidden: int, intermediate: int, heads: int, kv_heads: int, head_dim: int) -> int:
    """Elements one decoder layer keeps per token for its backward, with fused (flash/SDPA) attention:
    ``4h + 5·a·d + 4·kv·d + 5·i``. Attention: the norm's input and (fake-quantized) output, q, k, v,
    normed/rotated q and k, the attention output and o_proj's quantized input (2h + 5ad + 4kv·d);
    MLP: the norm's input and output, gate, up, silu(gate), their product and down_proj's quantized
    input (2h + 5i). No seq² term: fused attention keeps only its output and log-sum-exp."""
    a_d, kv_d = heads * head_dim, kv_heads * head_dim
    return 4 * hidden + 5 * a_d + 4 * kv_d + 5 * intermediate


def largest_layer(model) -> int:
    """The most parameters any one module holds itself (ZeRO-3 gathers a module's own parameters at once)."""
    return max((sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules()), default=0)


def plan_memory(spec: str, gpus: int, gpu_mem_gib: float, zero: int, seq: int | None = None,
                micro_batch: int | None = None, gradient_checkpointing: bool | None = None,
                recipe: str | Path | None = None, dtype_bytes: int = HALF) -> Plan:
    """Plan ``spec`` (a built-in shape, hub id or config path) on ``gpus`` GPUs of ``gpu_mem_gib`` GiB.

    ``seq``, ``micro_batch`` and ``gradient_checkpointing`` default to the recipe's
    ``data.max_length``, ``train.per_device_batch_size`` and ``train.gradient_checkpointing``, without
    a recipe to 1024, 1 and on. ``dtype_bytes``: bytes of an activation, a teacher weight and a
    fake-quantized weight copy (2 for bf16; 4 to check the plan against a float32 run on CPU,
    ``tools/bench_plan.py``); the model states keep DeepSpeed's bf16 formulas."""
    from edgerazor.adapters import resolve_adapter
    from edgerazor.quant import quantize
    from edgerazor.recipe import load_recipe
    from edgerazor.shapes import resolve_model

    if gpus < 1:
        raise EdgeRazorError(f"--gpus {gpus}: give at least 1 GPU")
    if gpu_mem_gib <= 0:
        raise EdgeRazorError(f"--gpu-mem {gpu_mem_gib}: give the memory of one GPU in GiB (e.g. 80)")
    model_state_bytes(1, 1, 1, zero)  # an unknown stage fails before the model is built
    config, _ = resolve_model(spec)
    family = resolve_adapter(config.model_type, None)
    sets = [] if recipe is not None else [f"quant.weight.rho={family.extra.get('default_rho', 0.125)}"]
    rec = load_recipe(recipe, sets)
    family = resolve_adapter(config.model_type, rec.model.adapter)
    seq = seq if seq is not None else (rec.data.max_length if recipe is not None else PAPER_SEQ)
    micro_batch = micro_batch if micro_batch is not None else (rec.train.per_device_batch_size if recipe is not None else 1)
    if gradient_checkpointing is None:
        gradient_checkpointing = rec.train.gradient_checkpointing if recipe is not None else True
    if seq < 1 or micro_batch < 1:
        raise EdgeRazorError(f"--seq {seq} --micro-batch {micro_batch}: both must be at least 1")

    model = family.from_config(config, "meta")
    total = sum(p.numel() for p in model.parameters())  # tied weights once
    big = largest_layer(model)
    states = model_state_bytes(total, big, gpus, zero)
    quantize(model, rec, adapter=family)

    # fake-quant workspace: the largest weight's padded copy, int8 codes, dequantized copy and
    # straight-through output, its group scales (fp32), and every layer's row mask (bool)
    quantized = [m for m in model.modules() if getattr(m, "weight_quant", None) is not None]
    def transient(m) -> int:
        wq = m.weight_quant
        d_out = m.weight.shape[0]
        return d_out * wq.padded_dim * (3 * dtype_bytes + 1) + d_out * (wq.padded_dim // wq.group_size) * FP32
    workspace = max((transient(m) for m in quantized), default=0) + sum(m.weight.shape[0] for m in quantized)

    text = config.get_text_config()
    h, inter, layers = text.hidden_size, text.intermediate_size, text.num_hidden_layers
    heads = text.num_attention_heads
    kv = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or h // heads
    vocab = text.vocab_size
    tokens = seq * micro_batch
    per_layer = layer_activation_elements(h, inter, heads, kv, head_dim) * tokens * dtype_bytes
    # F.linear keeps each fake-quantized weight for its backward: every decoder layer's and the
    # lm_head's without checkpointing, the lm_head's and one layer's (recomputed) with it
    decoder = family.decoder_layers(model)
    layer_q = [sum(m.weight.numel() for m in layer.modules() if getattr(m, "weight_quant", None) is not None
                   and m.__class__.__name__ != "QuantEmbedding") for layer in decoder]
    head = model.get_output_embeddings()
    head_q = head.weight.numel() if getattr(head, "weight_quant", None) is not None else 0
    teacher_features = (layers + 1) * tokens * h * dtype_bytes  # LAFD's record of the teacher's residual stream
    activations = {
        "without_checkpointing": layers * per_layer + (sum(layer_q) + head_q) * dtype_bytes + teacher_features,
        "with_checkpointing": layers * tokens * h * dtype_bytes + per_layer
        + (max(layer_q, default=0) + head_q) * dtype_bytes + teacher_features,
    }
    chunk = min(rec.distill.chunk_size, tokens)
    components = {
        "model_states": sum(states.values()),
        "fake_quant_workspace": workspace,
        # on 1 GPU nothing is gathered
        "teacher_shard": min(dtype_bytes * total, dtype_bytes * total // gpus + dtype_bytes * big),
        "activations": activations["with_checkpointing" if gradient_checkpointing else "without_checkpointing"],
        # the fused loss's fp32 chunk buffers (student and teacher logits, their gradient) and its fp32
        # accumulator of the lm_head weight gradient (the head's fake-quantized copy is the workspace's)
        "logit_loss_chunk": 3 * chunk * vocab * FP32 + head.weight.numel() * FP32,
    }
    notes = [
        f"teacher sharded like ZeRO-3 inference ({HALF * total / GIB:.2f} GiB whole, /{gpus} + its largest "
        "gathered module)" + (": under --zero 2 a ZeRO-3 inference engine for the teacher beside the ZeRO-2 student"
                              if zero == 2 else ""),
        f"a teacher replicated on every GPU (the paper's way) costs {HALF * total / GIB:.2f} GiB instead",
        f"not counted: full [tokens, V] logits of both models ({2 * tokens * vocab * FP32 / GIB:.2f} GiB in fp32) "
        "where the logit loss is not fused with the lm_head",
        f"activations for the text decoder at {tokens} tokens; vision/audio encoder activations are not counted",
    ]
    return Plan(spec, gpus, gpu_mem_gib, zero, seq, micro_batch, gradient_checkpointing, total, big, states,
                components, activations, notes)


def paper_plans(zero: int = 3) -> list[Plan]:
    """The paper's four 8-GPU recipes (configs/table1, A100-80GB) as ``plan`` sees them."""
    from importlib import resources

    folder = resources.files("edgerazor.configs")
    return [plan_memory(name, PAPER_GPUS, PAPER_GPU_MEM, zero, recipe=Path(str(folder / rel)))
            for name, rel in PAPER_RECIPES.items()]
