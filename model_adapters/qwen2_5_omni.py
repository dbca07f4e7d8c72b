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
the vision and audio attentions have no KV cache. No llama.cpp architecture is mapped (GGUF is
refused); the packed format serves the quantized thinker.
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

    def gguf_architecture(self, config) -> str:
        """Refused, naming what is missing: no llama.cpp mapping of the thinker is written or proven here."""
        raise AdapterError(
            f"GGUF export of the Qwen2.5-Omni thinker (model_type {getattr(config, 'model_type', None)!r}) is not "
            f"supported by adapter {self.name!r}: it needs the text decoder mapped to a llama.cpp architecture with "
            "M-RoPE and the vision encoder (Conv3d patch embedding included) written as an mmproj file, neither of "
            "which EdgeRazor writes; export with --format packed (decoder, vision encoder and Conv3d at their true bits)"
        )

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
