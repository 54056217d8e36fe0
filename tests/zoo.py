"""The model zoo: small, randomly initialized members of many architecture families.

Every builder makes a real architecture (timm, Hugging Face transformers, torchvision, torch) from
a tiny config; nothing is downloaded. `prototype` returns a family's model in float64 with every
dropout, drop-path and layer-drop probability set to 0 (so train mode is deterministic), batch-norm
statistics frozen (momentum 0), and `revive`d: random init hides matrices behind constant
parameters (zero-init norms, layer scales of 1e-6, zero heads, all-ones gammas), which `revive`
replaces with random values of order 1, so every matrix shows in the output.

Used by ``tests/test_zoo.py`` and ``benchmarks/zoo_table.py`` (which puts this folder on sys.path).
"""

from __future__ import annotations

import copy
import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

Inputs = tuple[tuple, dict]


@dataclass(frozen=True)
class Family:
    """One architecture family: its builder, example inputs and the matrix kinds the default
    targets must find there."""

    library: str
    build: Callable[[], nn.Module]
    inputs: Callable[[torch.Generator], Inputs]
    kinds: frozenset[str]
    targets: list[str] | None = None  # None: factnet's default targets
    notes: str = ""


# ---- inputs --------------------------------------------------------------------------------------
def _images(size: int, keyword: str | None = None) -> Callable[[torch.Generator], Inputs]:
    def make(g: torch.Generator) -> Inputs:
        x = torch.randn(2, 3, size, size, generator=g, dtype=torch.float64)
        return ((), {keyword: x}) if keyword else ((x,), {})
    return make


def _tokens(vocab: int, length: int = 6, decoder: int = 0) -> Callable[[torch.Generator], Inputs]:
    def make(g: torch.Generator) -> Inputs:
        kwargs = {"input_ids": torch.randint(1, vocab, (2, length), generator=g)}
        if decoder:
            kwargs["decoder_input_ids"] = torch.randint(1, vocab, (2, decoder), generator=g)
        return (), kwargs
    return make


def _sequence(d: int, length: int = 5) -> Callable[[torch.Generator], Inputs]:
    return lambda g: ((torch.randn(2, length, d, generator=g, dtype=torch.float64),), {})


def _seq2seq_sequences(d: int) -> Callable[[torch.Generator], Inputs]:
    return lambda g: ((torch.randn(2, 5, d, generator=g, dtype=torch.float64),
                       torch.randn(2, 4, d, generator=g, dtype=torch.float64)), {})


# ---- timm ----------------------------------------------------------------------------------------
def _timm(arch: str, **config):
    def build() -> nn.Module:
        import timm

        return timm.create_model(arch, pretrained=False, num_classes=3, **config)
    return build


_VIT = dict(img_size=32, patch_size=8, depth=2, embed_dim=24, num_heads=2, drop_path_rate=0.0)
_SWIN = dict(img_size=32, embed_dim=16, depths=(2, 2), num_heads=(2, 4), window_size=4, drop_path_rate=0.0)


def _mixer(kind: str):
    def build() -> nn.Module:
        import timm
        from timm.models import mlp_mixer

        config = dict(num_classes=3, img_size=32, patch_size=8, num_blocks=2, embed_dim=16)
        if kind == "resmlp":
            config.update(mlp_ratio=4, block_layer=mlp_mixer.ResBlock, norm_layer=mlp_mixer.Affine)
        elif kind == "gmlp":
            config.update(mlp_ratio=6, block_layer=mlp_mixer.SpatialGatingBlock, mlp_layer=timm.layers.GatedMlp)
        return mlp_mixer.MlpMixer(**config)
    return build


def _maxvit() -> nn.Module:
    from timm.models import maxxvit

    cfg = maxxvit.MaxxVitCfg(
        embed_dim=(16, 32), depths=(1, 1), block_type=("M", "M"), stem_width=8,
        conv_cfg=maxxvit.MaxxVitConvCfg(block_type="mbconv", expand_ratio=2.0, attn_layer="se"),
        transformer_cfg=maxxvit.MaxxVitTransformerCfg(dim_head=8, window_size=(2, 2), grid_size=(2, 2)),
    )
    return maxxvit.MaxxVit(cfg, img_size=32, num_classes=3)


def _poolformer() -> nn.Module:
    from timm.models import metaformer

    return metaformer.MetaFormer(num_classes=3, depths=(1, 1, 1, 1), dims=(8, 16, 24, 32), use_mlp_head=False)


def _nest() -> nn.Module:
    from timm.models import nest

    return nest.Nest(img_size=32, patch_size=4, embed_dims=(16, 32, 48), num_heads=(1, 2, 3), depths=(1, 1, 1),
                     num_classes=3, drop_path_rate=0.0)


def _tnt() -> nn.Module:
    from timm.models import tnt

    return tnt.TNT(img_size=32, patch_size=8, embed_dim=24, inner_dim=8, depth=2, num_heads_inner=2,
                   num_heads_outer=2, num_classes=3)


# ---- Hugging Face transformers -------------------------------------------------------------------
_EAGER = dict(attn_implementation="eager")


def _hf(model_class: str, config_class: str, **config):
    def build() -> nn.Module:
        import transformers

        cfg = getattr(transformers, config_class)(**config, **_EAGER)
        return getattr(transformers, model_class)(cfg)
    return build


_BERT = dict(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
             max_position_embeddings=16, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=3)
_GPT2 = dict(vocab_size=50, n_embd=16, n_layer=2, n_head=2, n_positions=16, resid_pdrop=0.0, embd_pdrop=0.0,
             attn_pdrop=0.0, bos_token_id=0, eos_token_id=0, tie_word_embeddings=False)
_LLAMA = dict(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=32, attention_dropout=0.0, tie_word_embeddings=False)
_QWEN2 = dict(_LLAMA, num_key_value_heads=1)
_T5 = dict(vocab_size=50, d_model=16, d_kv=8, d_ff=32, num_layers=2, num_decoder_layers=2, num_heads=2,
           dropout_rate=0.0, relative_attention_num_buckets=8, decoder_start_token_id=0, pad_token_id=0,
           tie_word_embeddings=False)
_HF_VIT = dict(image_size=32, patch_size=8, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
               intermediate_size=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=3)
_CLIP = dict(image_size=32, patch_size=8, hidden_size=16, intermediate_size=64, num_hidden_layers=2,
             num_attention_heads=2, attention_dropout=0.0)
_DISTILBERT = dict(vocab_size=50, dim=16, n_layers=2, n_heads=2, hidden_dim=64, max_position_embeddings=16,
                   dropout=0.0, attention_dropout=0.0, seq_classif_dropout=0.0, num_labels=3)
_OPT = dict(vocab_size=50, hidden_size=16, num_hidden_layers=2, ffn_dim=64, num_attention_heads=2,
            max_position_embeddings=32, word_embed_proj_dim=16, dropout=0.0, attention_dropout=0.0,
            layerdrop=0.0, tie_word_embeddings=False, pad_token_id=0, bos_token_id=0, eos_token_id=0)
_BART = dict(vocab_size=50, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
             decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=32,
             dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, encoder_layerdrop=0.0,
             decoder_layerdrop=0.0, tie_word_embeddings=False, pad_token_id=0, bos_token_id=0, eos_token_id=0,
             decoder_start_token_id=0, forced_eos_token_id=None)


# ---- torchvision and torch -----------------------------------------------------------------------
def _torchvision_vit() -> nn.Module:
    import torchvision

    return torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2,
                                                hidden_dim=16, mlp_dim=64, num_classes=3)


def _torchvision_swin(v2: bool = False):
    def build() -> nn.Module:
        from torchvision.models import swin_transformer as swin

        extra = dict(block=swin.SwinTransformerBlockV2, downsample_layer=swin.PatchMergingV2) if v2 else {}
        return swin.SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[2, 2], num_heads=[2, 4],
                                    window_size=[4, 4], num_classes=3, stochastic_depth_prob=0.0, **extra)
    return build


def _transformer_encoder() -> nn.Module:
    layer = nn.TransformerEncoderLayer(d_model=16, nhead=2, dim_feedforward=64, dropout=0.0, batch_first=True)
    return nn.TransformerEncoder(layer, num_layers=2, norm=nn.LayerNorm(16), enable_nested_tensor=False)


def _transformer() -> nn.Module:
    return nn.Transformer(d_model=16, nhead=2, num_encoder_layers=1, num_decoder_layers=1, dim_feedforward=32,
                          dropout=0.0, batch_first=True, norm_first=True)


def _kinds(*names: str) -> frozenset[str]:
    return frozenset(names)


LINEAR = _kinds("linear")
MHA = _kinds("linear", "mha-in", "mha-out")

FAMILIES: dict[str, Family] = {
    # timm
    "timm-vit": Family("timm", _timm("vit_tiny_patch16_224", **_VIT), _images(32), LINEAR),
    "timm-deit-distilled": Family("timm", _timm("deit_tiny_distilled_patch16_224", **_VIT), _images(32), LINEAR),
    "timm-beit": Family("timm", _timm("beit_base_patch16_224", **_VIT, init_values=0.1), _images(32), LINEAR,
                        notes="F.linear(x, qkv.weight, cat(q_bias, k0, v_bias))"),
    "timm-eva02": Family("timm", _timm("eva02_tiny_patch14_224", img_size=28, patch_size=7, depth=2, embed_dim=24,
                                       num_heads=2, mlp_ratio=2.0, drop_path_rate=0.0), _images(28), LINEAR,
                         notes="rope, SwiGLU fc1 (24->96), F.linear on qkv.weight"),
    "timm-swin": Family("timm", _timm("swin_tiny_patch4_window7_224", **_SWIN), _images(32), LINEAR),
    "timm-swinv2": Family("timm", _timm("swinv2_tiny_window8_256", **_SWIN), _images(32), LINEAR,
                          notes="F.linear on qkv.weight, cosine attention, log-spaced CPB MLP"),
    "timm-convnext": Family("timm", _timm("convnext_atto", dims=(8, 16, 24, 32), depths=(1, 1, 2, 1), conv_mlp=True,
                                          drop_path_rate=0.0), _images(32), _kinds("conv1x1"),
                            notes="conv_mlp=True: MLPs are 1x1 convs"),
    "timm-pvt-v2": Family("timm", _timm("pvt_v2_b0", embed_dims=(8, 16, 24, 32), depths=(1, 1, 1, 1),
                                        num_heads=(1, 2, 3, 4), drop_path_rate=0.0), _images(32), LINEAR),
    "timm-mlp-mixer": Family("timm", _mixer("mixer"), _images(32), LINEAR),
    "timm-resmlp": Family("timm", _mixer("resmlp"), _images(32), LINEAR),
    "timm-gmlp": Family("timm", _mixer("gmlp"), _images(32), LINEAR),
    "timm-cait": Family("timm", _timm("cait_xxs24_224", img_size=32, patch_size=8, depth=2, depth_token_only=1,
                                      embed_dim=24, num_heads=4, drop_path_rate=0.0), _images(32), LINEAR,
                        notes="talking-heads proj_l/proj_w (4x4), class-attention blocks"),
    "timm-xcit": Family("timm", _timm("xcit_nano_12_p16_224", img_size=32, patch_size=16, depth=2, cls_attn_layers=1,
                                      embed_dim=24, num_heads=2, drop_path_rate=0.0), _images(32), LINEAR,
                        notes="pos_embed.token_projection (a 1x1 conv) is a position encoding: not a default"),
    "timm-maxvit": Family("timm", _maxvit, _images(32), _kinds("linear", "conv1x1")),
    "timm-poolformer": Family("timm", _poolformer, _images(32), _kinds("conv1x1")),
    "timm-nest": Family("timm", _nest, _images(32), LINEAR),
    "timm-tnt": Family("timm", _tnt, _images(32), LINEAR),
    # Hugging Face transformers
    "hf-bert": Family("transformers", _hf("BertForSequenceClassification", "BertConfig", **_BERT), _tokens(50),
                      LINEAR),
    "hf-distilbert": Family("transformers", _hf("DistilBertForSequenceClassification", "DistilBertConfig",
                                                **_DISTILBERT), _tokens(50), LINEAR),
    "hf-gpt2": Family("transformers", _hf("GPT2LMHeadModel", "GPT2Config", **_GPT2), _tokens(50), _kinds("conv1d")),
    "hf-llama-gqa": Family("transformers", _hf("LlamaForCausalLM", "LlamaConfig", **_LLAMA), _tokens(50), LINEAR,
                           notes="4 query heads, 2 KV heads: k/v_proj 16->8"),
    "hf-qwen2-mqa": Family("transformers", _hf("Qwen2ForCausalLM", "Qwen2Config", **_QWEN2), _tokens(50), LINEAR,
                           notes="1 KV head: k/v_proj 16->4, biased q/k/v"),
    "hf-opt": Family("transformers", _hf("OPTForCausalLM", "OPTConfig", **_OPT), _tokens(50), LINEAR),
    "hf-t5": Family("transformers", _hf("T5ForConditionalGeneration", "T5Config", **_T5), _tokens(50, decoder=4),
                    LINEAR, notes="encoder-decoder, decoder_input_ids"),
    "hf-bart": Family("transformers", _hf("BartForConditionalGeneration", "BartConfig", **_BART),
                      _tokens(50, decoder=4), LINEAR),
    "hf-vit": Family("transformers", _hf("ViTForImageClassification", "ViTConfig", **_HF_VIT),
                     _images(32, "pixel_values"), LINEAR),
    "hf-clip-vision": Family("transformers", _hf("CLIPVisionModel", "CLIPVisionConfig", **_CLIP),
                             _images(32, "pixel_values"), LINEAR),
    # torchvision
    "torchvision-vit": Family("torchvision", _torchvision_vit, _images(32), MHA),
    "torchvision-swin": Family("torchvision", _torchvision_swin(), _images(32), LINEAR,
                               notes="F.linear(x, qkv_weight, ...) in shifted_window_attention"),
    "torchvision-swinv2": Family("torchvision", _torchvision_swin(v2=True), _images(32), LINEAR),
    # torch
    "torch-transformer-encoder": Family("torch", _transformer_encoder, _sequence(16), MHA,
                                        notes="batch_first; fused inference fast path in eval"),
    "torch-transformer": Family("torch", _transformer, _seq2seq_sequences(16), MHA,
                                notes="encoder-decoder, norm_first, cross-attention"),
}


# ---- making a model ready ------------------------------------------------------------------------
def no_dropout(model: nn.Module) -> nn.Module:
    """Every dropout, drop-path, stochastic-depth and layer-drop probability set to 0, and every
    batch norm's momentum to 0 (train-mode forwards leave its running statistics as they are, so
    eval-mode outputs do not depend on how many train-mode forwards ran before), in place."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.momentum = 0.0
        if isinstance(module, nn.modules.dropout._DropoutNd):
            module.p = 0.0
        if type(module).__name__ == "StochasticDepth":  # torchvision
            module.p = 0.0
        for name, value in list(vars(module).items()):
            if type(value) is float and "drop" in name.lower():  # timm drop_prob, HF attention_dropout, layerdrop
                setattr(module, name, 0.0)
    return model


@torch.no_grad()
def revive(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every constant-valued parameter (all zeros, all ones, all equal: norm weights and biases,
    layer scales of 1e-6, zero heads and biases, zero tokens) random values, so that nothing in the
    model hides a matrix from the output. Vectors (and tokens, leading dim 1) get values in
    [0.5, 1.5); matrices N(0, 1/fan_in). Non-constant parameters are left as they are."""
    generator = torch.Generator().manual_seed(seed)
    for _, param in model.named_parameters():
        if not param.is_floating_point() or param.numel() == 0:
            continue
        flat = param.reshape(-1)
        if not bool((flat == flat[0]).all()):
            continue
        if param.dim() >= 2 and param.shape[0] > 1:
            fan_in = math.prod(param.shape[1:])
            value = torch.randn(param.shape, generator=generator, dtype=torch.float64) / math.sqrt(fan_in)
        else:
            value = 0.5 + torch.rand(param.shape, generator=generator, dtype=torch.float64)
        param.copy_(value.to(param.dtype))
    return model


@functools.cache
def _prototype(name: str) -> nn.Module:
    torch.manual_seed(0)
    model = FAMILIES[name].build()
    return revive(no_dropout(model).double(), seed=0).train()


def prototype(name: str) -> nn.Module:
    """A fresh copy of family ``name``'s model: float64, no dropout, revived, train mode."""
    return copy.deepcopy(_prototype(name))


def inputs(name: str, seed: int = 1) -> Inputs:
    """``(args, kwargs)`` for family ``name``'s model."""
    return FAMILIES[name].inputs(torch.Generator().manual_seed(seed))


def main_output(y) -> torch.Tensor:
    """The main tensor of a model's output: itself, ``logits`` or ``last_hidden_state`` of a
    ModelOutput, or the first element of a tuple."""
    if isinstance(y, torch.Tensor):
        return y
    for key in ("logits", "last_hidden_state"):
        value = getattr(y, key, None)
        if isinstance(value, torch.Tensor):
            return value
    if isinstance(y, (tuple, list)) and y:
        return main_output(y[0])
    raise TypeError(f"no main tensor in a {type(y).__name__}")


def run(model: nn.Module, args: tuple, kwargs: dict) -> torch.Tensor:
    return main_output(model(*args, **kwargs))
