"""Seeded random corruption of packed exports, GGUF files and recipes: every case ends in a clean
``EdgeRazorError`` or in exactly the original model (logits ``torch.equal``, same tokenizer), never in a
different model and never in another exception.

One tiny quantized model is exported once per module; each case corrupts a copy. The forged classes
edit the metadata, ``config.json`` or the tensors *and recompute the checksums*, so only the
structural checks can catch them. The table of classes x outcomes is printed and asserted.
"""

from __future__ import annotations

import importlib.util
import json
import random
import shutil
from collections import Counter, defaultdict
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import Qwen3ForCausalLM

import edgerazor
from edgerazor.errors import EdgeRazorError
from edgerazor.export.packed import CHECKSUM_FILE, FORMAT, METADATA_FILE, WEIGHTS_FILE, export_packed
from edgerazor.export.packed_format import checksum_line, manifest_of
from edgerazor.recipe import load_recipe
from edgerazor.runtime.packed import load_packed
from tests.helpers import tiny_qwen3_config
from tests.tokenizer_utils import train_tiny_tokenizer

HAS_GGUF = importlib.util.find_spec("gguf") is not None  # the "export" extra: only the GGUF classes need it
needs_gguf = pytest.mark.skipif(not HAS_GGUF, reason="gguf-py is not installed (pip install 'edgerazor[export]')")

OUTCOMES = ("error", "identical", "wrong", "other")
RESULTS: dict[str, Counter] = defaultdict(Counter)
FAILURES: list[str] = []

RECIPE_YAML = """\
name: corrupt-me
model:
  teacher: Qwen/Qwen3-0.6B
quant:
  scheme: 1.88-8-8
  weight:
    group_size: 64
    allocation: super_group
  embedding:
    quantizer: int4
data:
  sources:
    - path: data/train.jsonl
      prompt_field: prompt
      response_field: response
  max_length: 512
train:
  learning_rate: 2.0e-5
  max_steps: 100
  per_device_batch_size: 4
  seed: 7
"""


# ------------------------------------------------------------------------------------------------
# The originals
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def original(tmp_path_factory):
    tok = train_tiny_tokenizer(["To be, or not to be, that is the question. " * 40], vocab_size=320)
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(tiny_qwen3_config(vocab_size=len(tok)))
    edgerazor.quantize(model, {"quant": {"scheme": "1.88-8-8", "weight": {"group_size": 64}}})
    model.eval()
    root = tmp_path_factory.mktemp("corruption")
    export_packed(model, tok, root / "packed")
    (root / "recipe.yaml").write_text(RECIPE_YAML)
    ids = torch.randint(0, len(tok), (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = model(ids).logits
    loaded, loaded_tok = load_packed(root / "packed")
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, logits)  # the pristine export is the model itself
    found = {"root": root, "ids": ids, "logits": logits, "vocab": tok.get_vocab(), "chat_template": tok.chat_template,
             "special_tokens": tok.special_tokens_map, "all_special_tokens": tok.all_special_tokens,
             "recipe": load_recipe(root / "recipe.yaml")}
    if HAS_GGUF:
        from gguf import GGUFReader

        from edgerazor.export.gguf import write_gguf
        from edgerazor.export.gguf.check import field_values, tensor_expectations

        write_gguf(model, tok, root / "model.gguf", quiet=True)
        reader = GGUFReader(root / "model.gguf")
        found |= {"gguf_tensors": tensor_expectations(reader), "gguf_kv": field_values(reader),
                  "gguf_regions": _gguf_regions(reader, root / "model.gguf")}
    return found


def _record(kind: str, label: str, outcome: str, detail: str = "") -> None:
    RESULTS[kind][outcome] += 1
    if outcome in ("wrong", "other"):
        FAILURES.append(f"{kind} / {label}: {outcome} {detail}")


def _copy(original, tmp_path: Path, i: int) -> Path:
    target = tmp_path / f"case{i}"
    shutil.copytree(original["root"] / "packed", target)
    return target


def _packed_outcome(original, path: Path) -> tuple[str, str]:
    try:
        model, tokenizer = load_packed(path)
        with torch.no_grad():
            logits = model(original["ids"]).logits
    except EdgeRazorError as exc:
        return "error", str(exc)
    except Exception as exc:  # noqa: BLE001 - the test classifies every other exception as a failure
        return "other", f"{type(exc).__name__}: {exc}"
    same = (torch.equal(logits, original["logits"]) and tokenizer.get_vocab() == original["vocab"]
            and tokenizer.chat_template == original["chat_template"]
            and tokenizer.special_tokens_map == original["special_tokens"]
            and tokenizer.all_special_tokens == original["all_special_tokens"])
    return ("identical", "") if same else ("wrong", "loaded a different model")


def forge(path: Path) -> None:
    """Recompute the manifest and the metadata checksum, as a deliberate edit of the files would."""
    meta_file = path / METADATA_FILE
    try:
        meta = json.loads(meta_file.read_text())
    except (ValueError, UnicodeDecodeError):
        meta = None
    if isinstance(meta, dict) and isinstance(meta.get("manifest"), dict):
        meta["manifest"] = manifest_of(path)
        meta_file.write_text(json.dumps(meta, indent=1))
    (path / CHECKSUM_FILE).write_text(checksum_line(meta_file.read_bytes()))


def _flip(file: Path, rng: random.Random, start: int = 0, end: int | None = None) -> str:
    data = bytearray(file.read_bytes())
    end = len(data) if end is None else end
    at = rng.randrange(start, end)
    bit = rng.randrange(8)
    data[at] ^= 1 << bit
    file.write_bytes(bytes(data))
    return f"{file.name} byte {at} bit {bit}"


def _truncate(file: Path, rng: random.Random) -> str:
    data = file.read_bytes()
    keep = rng.randrange(len(data))
    file.write_bytes(data[:keep])
    return f"{file.name} to {keep} of {len(data)} bytes"


def _files(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir() if p.is_file())


def _header_length(file: Path) -> int:
    return int.from_bytes(file.read_bytes()[:8], "little")


# ------------------------------------------------------------------------------------------------
# Packed: damage (caught by the checksums) and forged edits (caught by the structural checks)
# ------------------------------------------------------------------------------------------------


def _untied(meta, rng):
    return rng.choice(sorted(n for n, e in meta["layers"].items() if "tied_to" not in e))


def _set_layer(key, values):
    def edit(meta, rng):
        name = _untied(meta, rng)
        value = rng.choice(values(meta["layers"][name]) if callable(values) else values)
        meta["layers"][name][key] = value
        return f"layers[{name}].{key}={value!r}"
    return edit


def _set_recipe(keys, values):
    def edit(meta, rng):
        node = meta["recipe"]
        for key in keys[:-1]:
            node = node[key]
        value = rng.choice(values)
        node[keys[-1]] = value
        return f"recipe.{'.'.join(keys)}={value!r}"
    return edit


def _tie_somewhere(meta, rng):
    name = _untied(meta, rng)
    other = rng.choice(sorted(n for n in meta["layers"] if n != name))
    meta["layers"][name]["tied_to"] = other
    return f"layers[{name}].tied_to={other}"


def _untie_head(meta, rng):
    meta["layers"]["lm_head"].pop("tied_to")
    return "lm_head untied"


def _drop_key(meta, rng):
    key = rng.choice(["layers", "recipe", "manifest", "kv_cache", "tokenizer", "adapter", "allocation", "w_a_kv"])
    meta.pop(key)
    return f"drop {key}"


def _drop_layer_key(meta, rng):
    name = _untied(meta, rng)
    key = rng.choice(["d_out", "d_in", "group_size", "padded_d_in", "high", "high_rows", "codec_high", "activation",
                      "kind"])
    meta["layers"][name].pop(key, None)
    return f"drop layers[{name}].{key}"


def _wrong_type(meta, rng):
    name = _untied(meta, rng)
    key, value = rng.choice([("d_out", "128"), ("d_out", True), ("high_rows", 1.5), ("group_size", None),
                             ("codec_low", 3), ("activation", "int8"), ("d_in", [128])])
    meta["layers"][name][key] = value
    return f"layers[{name}].{key}={value!r}"


def _layers_shape(meta, rng):
    choice = rng.randrange(4)
    name = _untied(meta, rng)
    if choice == 0:
        meta["layers"] = list(meta["layers"].items())
        return "layers as a list"
    if choice == 1:
        meta["layers"].pop(name)
        return f"drop layers[{name}]"
    if choice == 2:
        meta["layers"][name + "_copy"] = dict(meta["layers"][name])
        return f"add layers[{name}_copy]"
    meta["layers"][name.replace("layers.0", "layers.7")] = meta["layers"].pop(name)
    return f"rename layers[{name}]"


def _kv_edit(meta, rng):
    name = rng.choice(sorted(meta["kv_cache"]))
    if rng.random() < 0.5:
        meta["kv_cache"].pop(name)
        return f"drop kv_cache[{name}]"
    meta["kv_cache"][name]["group_size"] = 16
    return f"kv_cache[{name}].group_size=16"


def _top_level(meta, rng):
    key, value = rng.choice([("allocation", "stacked"), ("w_a_kv", "1.88-16-16"), ("adapter", "mobilellm"),
                             ("adapter", "no-such-adapter"), ("format_version", 1), ("format", "other"),
                             ("tokenizer", {"tokens": 999, "chat_template": True}), ("tokenizer", [])])
    meta[key] = value
    return f"{key}={value!r}"


def _tokenizer_summary(meta, rng):
    summary = meta["tokenizer"]
    key = rng.choice(["tokens", "chat_template", "special_tokens", "all_special_tokens"])
    summary[key] = {"tokens": summary["tokens"] - 1, "chat_template": not summary["chat_template"],
                    "special_tokens": {**summary["special_tokens"], "eos_token": "<|pad|>"},
                    "all_special_tokens": summary["all_special_tokens"][:-1]}[key]
    return f"tokenizer.{key}"


def _size_report(meta, rng):
    meta["size"]["total_bytes"] = rng.randrange(10**6)
    return "size.total_bytes (informational only)"


def _train_value(meta, rng):
    meta["recipe"]["train"]["learning_rate"] = rng.choice([1e-3, 5e-5])
    meta["recipe"]["name"] = "renamed"
    return "recipe.train.learning_rate / recipe.name (no effect on the model)"


def _consistent_scheme(meta, rng):
    """A recipe edit that stays valid and also rewrites the W-A-KV label: only the per-layer activation and
    KV-cache entries can tell that the export was not trained this way."""
    a, kv = rng.choice([(16, 16), (16, 8), (8, 16)])
    quant = meta["recipe"]["quant"]
    quant["scheme"] = f"1.88-{a}-{kv}"
    quant["activation"]["bits"], quant["kv_cache"]["bits"] = a, kv
    meta["w_a_kv"] = quant["scheme"]
    return f"recipe scheme, bits and w_a_kv -> 1.88-{a}-{kv}"


def _rho_edit(meta, rng):
    """rho 0 or 1 with the scheme dropped and the label rewritten: the recipe then fixes every layer's rows."""
    rho = rng.choice([0.0, 1.0])
    quant = meta["recipe"]["quant"]
    quant["scheme"], quant["weight"]["rho"] = None, rho
    meta["w_a_kv"] = "1.58-8-8" if rho == 0 else "4-8-8"
    return f"recipe.quant.weight.rho={rho} without a scheme"


METADATA_EDITS = [
    _set_layer("d_out", lambda e: [e["d_out"] + 1, e["d_out"] - 1, 2 * e["d_out"]]),
    _set_layer("d_in", lambda e: [e["d_in"] - 64, e["d_in"] - 1, e["d_in"] + 64]),
    _set_layer("padded_d_in", lambda e: [e["padded_d_in"] + 64, e["padded_d_in"] - 64]),
    _set_layer("group_size", [32, 128, 16, 0]),
    _set_layer("codec_high", ["sym7", "int8", "ternary_2bit", "int3x", "sym200"]),
    _set_layer("codec_low", ["ternary_2bit", "sym1", "int4", "base3"]),
    _set_layer("high_rows", lambda e: [e["high_rows"] + 1, e["high_rows"] - 1, 0, e["d_out"]]),
    _set_layer("high", ["int8", "ternary", "int3"]),
    _set_layer("low", ["int4", None, "int8"]),
    _set_layer("kind", ["embedding", "linear", "conv"]),
    _set_layer("activation", [None, {"quantizer": "int8", "group_size": 32, "padded_dim": 128},
                              {"quantizer": "int4", "group_size": 64, "padded_dim": 128}]),
    _tie_somewhere, _untie_head, _drop_key, _drop_layer_key, _wrong_type, _layers_shape, _kv_edit, _top_level,
    _tokenizer_summary,
    _set_recipe(["quant", "weight", "group_size"], [32, 128]),
    _set_recipe(["quant", "weight", "high"], ["int8", "ternary"]),
    _set_recipe(["quant", "weight", "rho"], [0.0, 1.0]), _rho_edit, _rho_edit,
    _set_recipe(["quant", "activation", "bits"], [16]),
    _set_recipe(["quant", "kv_cache", "group_size"], [16, 8]),
    _set_recipe(["quant", "embedding", "quantizer"], [None, "int8"]),
    _set_recipe(["model", "adapter"], ["mobilellm", "qwen3"]),
    _set_recipe(["quant", "scheme"], ["2.79-8-8", "1.88-16-16"]),
    _set_recipe(["quant", "weight", "allocation"], ["stacked", "nope"]),
    _set_recipe(["quant", "weight", "pad"], [True]),
    _set_recipe(["quant", "exclude"], [["*.mlp.down_proj"], ["lm_head"]]),
    _set_recipe(["quant", "lm_head", "group_size"], [32]),
    _consistent_scheme, _consistent_scheme, _size_report, _train_value,
]


def _forged_metadata(path: Path, rng: random.Random) -> str:
    meta_file = path / METADATA_FILE
    if rng.random() < 0.08:
        raw = rng.choice([b"[]", b'"text"', b"\xff\xfe{}", b'{"format": "edgerazor-packed", "format_version": 2}',
                          b"null", b"{" * 5000])
        meta_file.write_bytes(raw)
        forge(path)
        return f"metadata replaced by {raw[:20]!r}"
    meta = json.loads(meta_file.read_text())
    edit = rng.choice(METADATA_EDITS)
    label = edit(meta, rng)
    meta_file.write_text(json.dumps(meta, indent=1))
    config_file = path / "config.json"
    config = json.loads(config_file.read_text())
    if isinstance(meta.get("recipe"), dict) and config["edgerazor"]["recipe"] != meta["recipe"]:
        config["edgerazor"]["recipe"] = meta["recipe"]  # a thorough forger keeps the copy in config.json in step
        config_file.write_text(json.dumps(config, indent=2))
    forge(path)
    return label


def _forged_config(path: Path, rng: random.Random) -> str:
    file = path / "config.json"
    config = json.loads(file.read_text())
    key, value = rng.choice([
        ("vocab_size", config["vocab_size"] + 1), ("vocab_size", config["vocab_size"] - 1), ("vocab_size", 10**12),
        ("hidden_size", 64), ("hidden_size", 256), ("num_hidden_layers", 1), ("num_hidden_layers", 3),
        ("num_hidden_layers", 10**9), ("intermediate_size", 128), ("num_attention_heads", 2), ("head_dim", 16),
        ("tie_word_embeddings", False), ("model_type", "llama"), ("model_type", "no-such-model"),
        ("vocab_size", "285"), ("hidden_size", None), ("num_key_value_heads", 4),
    ])
    if rng.random() < 0.15:
        raw = rng.choice([b"[1, 2]", b"\xc3\x28", b"{}", b"{\"model_type\": \"qwen3\"}"])
        file.write_bytes(raw)
        forge(path)
        return f"config.json replaced by {raw!r}"
    if rng.random() < 0.1:
        config["edgerazor"]["recipe"]["quant"]["weight"]["group_size"] = 128
        label = "config.json edgerazor.recipe group_size=128"
    else:
        config[key] = value
        label = f"config.json {key}={value!r}"
    file.write_text(json.dumps(config, indent=2))
    forge(path)
    return label


def _forged_tensors(path: Path, rng: random.Random) -> str:
    file = path / WEIGHTS_FILE
    tensors = load_file(str(file))
    packed = sorted(k for k in tensors if k.rsplit(".", 1)[1] in ("codes_high", "codes_low", "scales", "mask"))
    plain = sorted(k for k in tensors if k not in packed)
    choice = rng.randrange(8)
    key = rng.choice(packed)
    if choice == 0:
        tensors.pop(key)
        label = f"drop {key}"
    elif choice == 1:
        tensors[key + "x"] = tensors.pop(key)
        label = f"rename {key}"
    elif choice == 2:
        name = key.rsplit(".", 1)[0] + ".scales"
        tensors[name] = tensors[name].float()
        label = f"{name} as float32"
    elif choice == 3:
        name = rng.choice([k for k in packed if "codes" in k])
        tensors[name] = tensors[name][1:].clone()
        label = f"{name} one row short"
    elif choice == 4:
        name = rng.choice(plain)
        tensors[name] = tensors[name][..., :-1].clone()
        label = f"{name} one column short"
    elif choice == 5:
        tensors["model.extra.weight"] = torch.zeros(3)
        label = "an extra tensor"
    elif choice == 6:
        name = rng.choice(plain)
        tensors[name] = tensors[name].to(torch.int32)
        label = f"{name} as int32"
    else:
        layer = key.rsplit(".", 1)[0]
        tensors[layer + ".weight"] = torch.zeros(2, 2)
        label = f"a dense {layer}.weight beside the packed one"
    save_file(tensors, str(file), metadata={"format": FORMAT})
    forge(path)
    return label


def _damage(kind: str, path: Path, rng: random.Random) -> str:
    weights = path / WEIGHTS_FILE
    if kind == "packed: truncated file":
        return _truncate(rng.choice(_files(path)), rng)
    if kind == "packed: safetensors header flip":
        return _flip(weights, rng, 0, 8 + _header_length(weights))
    if kind == "packed: safetensors payload flip":
        return _flip(weights, rng, 8 + _header_length(weights))
    if kind == "packed: metadata/config/tokenizer flip":
        return _flip(rng.choice([f for f in _files(path) if f.name != WEIGHTS_FILE]), rng)
    if kind == "packed: file removed/renamed/added":
        file = rng.choice(_files(path))
        action = rng.randrange(3)
        if action == 0:
            file.unlink()
            return f"remove {file.name}"
        if action == 1:
            file.rename(file.with_name(file.name + ".bak"))
            return f"rename {file.name}"
        (path / "notes.txt").write_text("mine")
        return "an extra file"
    if kind == "packed: tokenizer file deleted (forged)":
        name = rng.choice(["tokenizer.json", "chat_template.jinja", "tokenizer_config.json"])
        (path / name).unlink()
        forge(path)
        return f"remove {name} and forge the manifest"
    if kind == "packed: metadata edit (forged)":
        return _forged_metadata(path, rng)
    if kind == "packed: config.json edit (forged)":
        return _forged_config(path, rng)
    if kind == "packed: tensor set/dtype/shape edit (forged)":
        return _forged_tensors(path, rng)
    raise AssertionError(kind)


PACKED_CLASSES = {
    "packed: truncated file": 20,
    "packed: safetensors header flip": 20,
    "packed: safetensors payload flip": 20,
    "packed: metadata/config/tokenizer flip": 20,
    "packed: file removed/renamed/added": 12,
    "packed: tokenizer file deleted (forged)": 6,
    "packed: metadata edit (forged)": 60,
    "packed: config.json edit (forged)": 20,
    "packed: tensor set/dtype/shape edit (forged)": 16,
}


@pytest.mark.parametrize("kind", list(PACKED_CLASSES))
def test_packed_corruptions(original, tmp_path, kind):
    rng = random.Random(f"packed {kind}")
    for i in range(PACKED_CLASSES[kind]):
        path = _copy(original, tmp_path, i)
        label = _damage(kind, path, rng)
        outcome, detail = _packed_outcome(original, path)
        _record(kind, label, outcome, detail)
        shutil.rmtree(path)
    counts = RESULTS[kind]
    assert counts["wrong"] == counts["other"] == 0, FAILURES
    assert sum(counts.values()) == PACKED_CLASSES[kind]


# ------------------------------------------------------------------------------------------------
# GGUF
# ------------------------------------------------------------------------------------------------


def _gguf_regions(reader, path: Path) -> dict[str, tuple[int, int]]:
    first_info = min(t.field.offset for t in reader.tensors)
    last = max(reader.tensors, key=lambda t: t.field.offset)
    infos_end = last.field.offset + sum(int(p.nbytes) for p in last.field.parts)
    return {"header": (0, 24), "key/values": (24, first_info), "tensor infos": (first_info, infos_end),
            "tensor data": (reader.data_offset, path.stat().st_size)}


def _gguf_outcome(original, path: Path) -> tuple[str, str]:
    from gguf import GGUFReader

    from edgerazor.export.gguf.check import check_gguf, field_values, tensor_expectations

    try:
        check_gguf(path, original["gguf_tensors"], original["gguf_kv"])
    except EdgeRazorError as exc:
        return "error", str(exc)
    except Exception as exc:  # noqa: BLE001
        return "other", f"{type(exc).__name__}: {exc}"
    reader = GGUFReader(path)  # accepted: it must be the original file's content, read independently
    same = field_values(reader) == original["gguf_kv"] and tensor_expectations(reader) == original["gguf_tensors"]
    return ("identical", "") if same else ("wrong", "accepted a different file")


GGUF_CLASSES = {"gguf: truncated": 16, "gguf: header flip": 12, "gguf: key/values flip": 16,
                "gguf: tensor infos flip": 16, "gguf: tensor data flip": 16}


@needs_gguf
@pytest.mark.parametrize("kind", list(GGUF_CLASSES))
def test_gguf_corruptions(original, tmp_path, kind):
    rng = random.Random(f"gguf {kind}")
    source = original["root"] / "model.gguf"
    for i in range(GGUF_CLASSES[kind]):
        path = tmp_path / f"case{i}.gguf"
        shutil.copyfile(source, path)
        if kind == "gguf: truncated":
            label = _truncate(path, rng)
        else:
            start, end = original["gguf_regions"][kind.removeprefix("gguf: ").removesuffix(" flip")]
            label = _flip(path, rng, start, end)
        outcome, detail = _gguf_outcome(original, path)
        _record(kind, label, outcome, detail)
        path.unlink()
    counts = RESULTS[kind]
    assert counts["wrong"] == counts["other"] == 0, FAILURES
    assert counts["error"] > 0


# ------------------------------------------------------------------------------------------------
# Recipes
# ------------------------------------------------------------------------------------------------

RECIPE_CLASSES = {"recipe: byte flip": 40, "recipe: truncated": 20}


@pytest.mark.parametrize("kind", list(RECIPE_CLASSES))
def test_recipe_corruptions(original, tmp_path, kind):
    """A damaged recipe is an error or a valid recipe; a valid one that differs is what the file now says
    (a recipe has no checksum), counted as "identical" only when it equals the original."""
    rng = random.Random(f"recipe {kind}")
    for i in range(RECIPE_CLASSES[kind]):
        path = tmp_path / f"case{i}.yaml"
        path.write_text(RECIPE_YAML)
        label = _truncate(path, rng) if kind == "recipe: truncated" else _flip(path, rng)
        try:
            recipe = load_recipe(path)
        except EdgeRazorError:
            _record(kind, label, "error")
            continue
        except Exception as exc:  # noqa: BLE001
            _record(kind, label, "other", f"{type(exc).__name__}: {exc}")
            continue
        _record(kind, label, "identical" if recipe == original["recipe"] else "valid edit")
    counts = RESULTS[kind]
    assert counts["other"] == 0, FAILURES
    assert counts["error"] > 0


def test_corruption_table(capsys):
    """Runs last in this module: the table over every class above (at least 200 cases)."""
    if not RESULTS:
        pytest.skip("run with the corruption tests above")
    columns = (*OUTCOMES, "valid edit")
    width = max(len(k) for k in RESULTS) + 2
    lines = [f"{'class':<{width}}" + "".join(f"{c:>12}" for c in columns) + f"{'cases':>8}"]
    for kind, counts in RESULTS.items():
        lines.append(f"{kind:<{width}}" + "".join(f"{counts[c]:>12}" for c in columns) + f"{sum(counts.values()):>8}")
    total = Counter()
    for counts in RESULTS.values():
        total.update(counts)
    lines.append(f"{'total':<{width}}" + "".join(f"{total[c]:>12}" for c in columns) + f"{sum(total.values()):>8}")
    with capsys.disabled():
        print("\n" + "\n".join(lines))
    assert total["wrong"] == total["other"] == 0, FAILURES
    if len(RESULTS) == len(PACKED_CLASSES) + len(GGUF_CLASSES) + len(RECIPE_CLASSES):
        assert sum(total.values()) >= 200
