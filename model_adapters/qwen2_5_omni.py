"""Qwen2.5-Omni: the thinker (``Qwen2_5OmniThinkerForConditionalGeneration``) as teacher and student.

The paper distils the thinker at 4 bits with G=32 (Table 1) and quantizes its vision encoder too.
A full ``Qwen2_5OmniForConditionalGeneration`` checkpoint (thinker, talker, token2wav) is read by
taking its ``thinker.``-prefixed weights only, so the speech half is never built.

Components beyond the text decoder, embedding and lm_head (``quant.components.<name>``):

- ``vision``: every ``nn.Linear`` of the vision blocks and the patch merger, and the ``nn.Conv3d``
  patch embedding, 4-bit by default. The Conv3d's kernel flattens to 3 x 2 x 14 x 14 = 1176 weights
  per output channel and the blocks' MLP input is 3420: neither is a multiple of 32 (their gcd is
  12), so the component zero-pads each row to a multiple of its group size (1176 -> 1184 and
  3420 -> 3424 at G=32), which ``quantize`` reports per layer (``padded_d_in``); a recipe can
  choose a dividing group size instead (``quant.components.vision: {group_size: 12, pad: false}``).
- ``audio``: the Whisper-style audio encoder's linears, 16-bit by default (``quant.components.audio:
  {quantizer: int4}`` quantizes them; its two Conv1d stay 16-bit).

KV8 reaches the text decoder's attention through transformers' attention interface after M-RoPE;
the vision and audio attentions have no KV cache.

GGUF: the text decoder is llama.cpp's ``qwen2vl`` (Qwen2 with M-RoPE; ``mrope_section`` becomes the
rotary sections); the vision encoder is an mmproj file with projector ``qwen2.5o`` (llama.cpp's
multimodal library reads it as its Qwen2.5-VL vision tower). The audio encoder is written to neither
file; the packed format carries the whole thinker.
"""

from __future__ import annotations

from dataclasses import dataclass

from edgerazor.adapters import AdapterError, Component, ModelAdapter
from edgerazor.hookspecs import hookimpl

THINKER = "qwen2_5_omni_thinker"
FULL = "qwen2_5_omni"


def _thinker_config(config):
    """The thinker's config, from a thinker config or a full Omni config."""
    if getattr(config, "model_type", None) == FULL:
        return config.thinker_config
    return config


#: why the audio encoder is in neither GGUF file
AUDIO_NOT_WRITTEN = ("not written: llama.cpp's qwen2.5o projector also runs the audio tower, but EdgeRazor writes and "
                     "checks only the vision encoder in the mmproj; audio stays available in the packed format")
#: what llama.cpp's Qwen2.5-VL vision graph fixes (tools/mtmd: clip.cpp and models/qwen2vl.cpp)
LLAMA_CPP_VISION = {"patch_size": 14, "temporal_patch_size": 2, "spatial_merge_size": 2, "window_size": 112,
                    "hidden_act": "silu"}
#: the vision blocks' and merger's RMSNorm epsilon (fixed in transformers' Qwen2.5-Omni vision encoder)
VISION_RMS_EPS = 1e-6
#: nominal image size key of the mmproj; Qwen's dynamic-resolution preprocessing does not resize to it
LLAMA_CPP_IMAGE_SIZE = 560


def _check_vision_for_llama_cpp(vision) -> None:
    for key, want in LLAMA_CPP_VISION.items():
        got = getattr(vision, key, None)
        if got != want:
            raise AdapterError(f"llama.cpp's Qwen2.5-Omni vision graph needs vision_config.{key} = {want!r}, this "
                               f"model has {got!r}: no mmproj is written; export with --format packed")
    full = list(getattr(vision, "fullatt_block_indexes", None) or [])
    pattern = full[0] + 1 if full else 0
    if not full or full != list(range(pattern - 1, int(vision.depth), pattern)):
        raise AdapterError(f"llama.cpp's Qwen2.5-Omni vision graph runs full attention every n-th block, counted "
                           f"from the n-th; vision_config.fullatt_block_indexes = {full} over {vision.depth} blocks "
                           "is not such a pattern: no mmproj is written; export with --format packed")


def _frame(index: int):
    """One frame of the Conv3d kernel ``[out, in, t, h, w]``: the Conv2d kernel ``[out, in, h, w]``."""
    return lambda weight: weight[:, :, index].numpy()


class _TextNames:
    """gguf-py's name map for the text decoder, read with the thinker's ``model.language_model.`` prefix
    as the plain ``model.`` of a text-only checkpoint."""

    def __init__(self, names) -> None:
        self.names = names

    def get_name(self, key: str, try_suffixes=()):
        return self.names.get_name(key.replace("model.language_model.", "model.", 1), try_suffixes=try_suffixes)


@dataclass(frozen=True)
class Qwen25OmniAdapter(ModelAdapter):
    def model_class(self, config):
        import transformers

        return transformers.Qwen2_5OmniThinkerForConditionalGeneration

    def from_config(self, config, device: str = "meta"):
        return super().from_config(_thinker_config(config), device)

    def load_config(self, location: str, trust_remote_code: bool = False):
        return _thinker_config(super().load_config(location, trust_remote_code))

    def load_model(self, location: str, dtype: str = "float32", trust_remote_code: bool = False):
        """A thinker checkpoint as is; a full Omni checkpoint's ``thinker.*`` weights with the prefix removed
        (talker and token2wav weights are not read into anything)."""
        import torch
        from transformers import AutoConfig

        full = AutoConfig.from_pretrained(location, trust_remote_code=trust_remote_code)
        config = _thinker_config(full)
        kwargs = {"key_mapping": {r"^thinker\.": ""}} if full.model_type == FULL else {}
        model = self.model_class(config).from_pretrained(location, config=config, dtype=getattr(torch, dtype), **kwargs)
        self.check_model(model)
        return model

    def check_model(self, model) -> None:
        if getattr(model.config, "model_type", None) != THINKER:
            raise AdapterError(
                f"adapter {self.name!r} serves the Qwen2.5-Omni thinker, got {type(model).__name__} "
                f"(model_type {getattr(model.config, 'model_type', None)!r}); load a full Omni checkpoint "
                "through the adapter (it takes the thinker)"
            )
        super().check_model(model)

    def gguf_tensor_names(self, config):
        """gguf-py's ``qwen2vl`` names, reached from the thinker's ``model.language_model.*`` parameters."""
        return _TextNames(super().gguf_tensor_names(_thinker_config(config)))

    def gguf_outside_text(self, config) -> dict[str, str]:
        """The encoders are not part of the text GGUF: vision goes to the mmproj file, audio is not written."""
        return {"model.visual.": "they go to the mmproj file", "model.audio_tower.": AUDIO_NOT_WRITTEN}

    def gguf_mmproj(self, model):
        """The vision encoder as llama.cpp's ``qwen2.5o`` projector (read as ``qwen2.5vl_merger`` for vision).

        llama.cpp's graph (tools/mtmd/models/qwen2vl.cpp) fixes parts of the architecture that the config
        could change; a config outside them is refused, naming the setting. The Conv3d patch embedding is
        split per frame into the two Conv2d kernels llama.cpp adds up (F32 from the dequantized codes, exact in
        the file; ggml's conv_2d rounds kernel and pixels to F16 when it runs them)."""
        from edgerazor.export.gguf import MmprojSpec, MmprojTensor
        from edgerazor.export.gguf.report import gguf_module

        gguf = gguf_module()
        config = _thinker_config(model.config)
        vision = config.vision_config
        _check_vision_for_llama_cpp(vision)
        pattern = vision.fullatt_block_indexes[0] + 1
        names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.MMPROJ, max(int(vision.depth), 3))
        tensors = []
        for name, _ in model.named_parameters():
            if not name.startswith("model.visual."):
                continue
            short = name.removeprefix("model.")
            if short == "visual.patch_embed.proj.weight":
                for frame in range(int(vision.temporal_patch_size)):
                    suffix = "" if frame == 0 else f".{frame}"
                    tensors.append(MmprojTensor(
                        f"v.patch_embd.weight{suffix}", name, _frame(frame),
                        "is a Conv3d kernel that llama.cpp runs as one Conv2d per frame, and ggml's conv_2d "
                        "takes F16/F32 kernels only (computing in F16 through im2col either way)"))
                continue
            gguf_name = names.get_name(short, try_suffixes=(".weight", ".bias"))
            if gguf_name is None and short.startswith("visual.merger.mlp.2."):  # the merger's second linear
                gguf_name = "mm.2." + short.rpartition(".")[2]
            if gguf_name is None:
                raise AdapterError(f"vision parameter {name!r} has no llama.cpp mmproj tensor name")
            tensors.append(MmprojTensor(gguf_name, name))

        def write_keys(writer) -> None:
            from transformers.utils.constants import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

            writer.add_clip_has_vision_encoder(True)
            writer.add_clip_has_audio_encoder(False)
            writer.add_clip_projector_type(gguf.VisionProjectorType.QWEN25O)
            writer.add_vision_projection_dim(int(vision.out_hidden_size))
            writer.add_vision_embedding_length(int(vision.hidden_size))
            writer.add_vision_feed_forward_length(int(vision.intermediate_size))
            writer.add_vision_block_count(int(vision.depth))
            writer.add_vision_head_count(int(vision.num_heads))
            writer.add_vision_patch_size(int(vision.patch_size))
            writer.add_vision_image_size(LLAMA_CPP_IMAGE_SIZE)
            writer.add_vision_spatial_merge_size(int(vision.spatial_merge_size))
            writer.add_vision_use_silu(True)
            writer.add_vision_n_wa_pattern(pattern)
            writer.add_vision_attention_layernorm_eps(VISION_RMS_EPS)
            # the image processor's normalisation (Qwen2VLImageProcessor: OpenAI CLIP's mean and std)
            writer.add_vision_image_mean(list(OPENAI_CLIP_MEAN))
            writer.add_vision_image_std(list(OPENAI_CLIP_STD))

        return MmprojSpec("qwen2.5o", write_keys, tuple(tensors), ("model.visual.",),
                          notes=(f"the audio encoder (model.audio_tower.*) is {AUDIO_NOT_WRITTEN}",))

    def build_datasets(self, section, tokenizer):
        """Video sources (``format: video``) become lazily decoded clip rows with expanded placeholders; text
        sources take the generic path."""
        if any(source.format == "video" for source in section.sources):
            from edgerazor.data.video import build_video_datasets

            return build_video_datasets(section, tokenizer)
        return super().build_datasets(section, tokenizer)

    def collator(self, tokenizer):
        """Tokens padded as for text, plus each clip's patches, grid and seconds per grid."""
        from edgerazor.data.video import VideoCollator

        return VideoCollator(tokenizer)

    def model_inputs(self, batch) -> dict:
        """Tokens and the attention mask (the thinker computes its M-RoPE position ids from them and the video
        grids), plus the clips' pixels, grids and seconds per grid when the batch has any."""
        keys = ("input_ids", "attention_mask", "pixel_values_videos", "video_grid_thw", "video_second_per_grid")
        return {k: batch[k] for k in keys if batch.get(k) is not None}

    def components(self) -> tuple[Component, ...]:
        return super().components() + (
            Component("vision", ("model.visual.patch_embed.*", "model.visual.blocks.*", "model.visual.merger.*"),
                      True, None, "vision encoder: every Linear of the blocks and the merger, and the Conv3d "
                      "patch embedding (rows zero-padded to a multiple of G)", pad=True, include_conv3d=True),
            Component("audio", ("model.audio_tower.*",), False, None,
                      "audio encoder linears (16-bit unless quant.components.audio sets a quantizer)", pad=True),
        )


QWEN2_5_OMNI = Qwen25OmniAdapter(
    name="qwen2_5_omni",
    model_types=(THINKER, FULL),
    decoder_patterns=("model.language_model.layers.*",),
    layers_path="model.language_model.layers",
    default_group_size=32,
    # llama.cpp runs the thinker's text decoder as qwen2vl: Qwen2 blocks (q/k/v biases) with M-RoPE
    gguf_archs={THINKER: "qwen2vl", FULL: "qwen2vl"},
    description="Qwen2.5-Omni thinker (from a thinker or a full Omni checkpoint): decoder G=32, vision encoder 4-bit",
    extra={
        "default_rho": 1.0,  # the paper's Omni student is 4-bit throughout: `edgerazor bits` starts there
        # Table 20: 4-bit, G=64, over the thinker
        "paper_bits": {
            "qwen2.5-omni-7b-thinker": {
                "table": "Table 20 (4-bit, G=64)",
                "edgerazor": {"quantized_fraction": 0.9673, "compression_ratio": 3.45},
                "GPTQ/AWQ (decoder only)": {"quantized_fraction": 0.7981, "compression_ratio": 2.45},
            }
        }
    },
)


@hookimpl
def register_adapters(register):
    register(QWEN2_5_OMNI.name, QWEN2_5_OMNI)
