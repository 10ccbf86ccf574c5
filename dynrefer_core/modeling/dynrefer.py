"""DynRefer: nested views of a region -> aligned, fused region tokens z -> tags, region-text scores, caption.

    views (N, n, 3, S, S) --ViT--> CLS_k, X_k --RoI-Align--> X_k (G x G)
    X_k (k >= 1) --alignment to X_0--> Y_k;  [CLS_k ; Y_k] over views --channel concat + MLP--> tokens
    tokens --Q-Former--> z = x_v (N, num_query_tokens, D)
    z --D_tag--> tag logits;  z --D_rtc--> region-text scores s;  z --D_llm (T5)--> caption

Training loss (spec 5.1): L = L_caption + 0.01 ASL_sum(tags) + 0.5 L_rtc.
"""
from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .. import runtime
from ..checkpoint import PretrainedMixin
from ..config import DynReferConfig
from ..vocab import Vocabulary, class_prompt
from .alignment import AlignmentModule
from .fusion import ViewFusion
from .heads import RegionTextDecoder, TagDecoder
from .language import LanguageDecoder, sample_control
from .losses import asymmetric_loss, sigmoid_contrastive_loss
from .qformer import QFormer
from .text import TextEncoder
from .tokenization import build_word_tokenizer
from .vision import ConvStem, VisionEncoder, sincos_position_embedding


@dataclass
class DynReferOutput:
    """`loss` = sum of `losses` ("caption", "tag", "rtc"), each already weighted."""

    loss: torch.Tensor
    losses: dict[str, torch.Tensor]


class DynRefer(PretrainedMixin, nn.Module):
    """The DynRefer model.

    Args:
        config: sizes and switches (`DynReferConfig.tiny()`, `.mini()`, `.official_flant5xl()`).
        tokenizer: the language decoder's tokenizer (pad=0, eos=1). Default: a word-level tokenizer
            trained on the vocabulary (`build_word_tokenizer`); pass one trained on your captions too.
        vocabulary: tags, class names and attributes (default: `Vocabulary.default()`). The tag head is
            open-vocabulary (its queries are text embeddings), so any list works at inference.
        text_tokenizer: tokenizer of the "clip" text encoder (default: `tokenizer`); "minilm" brings its own.
        compute_tables: embed the vocabulary now (False when the caller loads cached tables).
    """

    def __init__(self, config: DynReferConfig, tokenizer=None, vocabulary: Vocabulary | None = None,
                 text_tokenizer=None, *, compute_tables: bool = True):
        super().__init__()
        self.config = config
        self.vocabulary = vocabulary if vocabulary is not None else Vocabulary.default()
        if tokenizer is None:
            tokenizer = build_word_tokenizer(self.vocabulary.words(), config.language.vocab_size)
        if len(tokenizer) > config.language.vocab_size:
            raise ValueError(f"tokenizer has {len(tokenizer)} tokens but language.vocab_size is "
                             f"{config.language.vocab_size}: raise vocab_size or use a smaller tokenizer")
        self.tokenizer = tokenizer

        self.vision = VisionEncoder(config)
        self.align = AlignmentModule(config.vision_width, config.align_groups, config.align_modulation_init)
        self.fusion = ViewFusion(config.vision_width, config.n_views, config.grid_size, config.fusion_position_embedding)
        self.qformer = QFormer(config)
        self.tag_decoder = TagDecoder(config)
        self.rtc_decoder = RegionTextDecoder(config)
        self.language = LanguageDecoder(config)
        if config.text_encoder.kind == "clip" and text_tokenizer is None:
            text_tokenizer = tokenizer
        self.text_encoder = TextEncoder(config, text_tokenizer)
        for name in ("tag_embeds", "class_embeds", "attribute_embeds"):
            self.register_buffer(name, torch.zeros(0, config.text_embed_dim), persistent=False)
        self.attribute_groups: list[int] = []

        if config.freeze_vision:
            self.vision.requires_grad_(False)
        if config.freeze_language:
            self.language.t5.requires_grad_(False)
        if config.freeze_query_tokens:
            self.qformer.query_tokens.requires_grad_(False)
        self.compute_dtype = torch.float32
        if compute_tables:
            self.refresh_text_tables()

    # ------------------------------------------------------------------ initialisation
    def init_from_scratch(self, std: float = 0.02) -> "DynRefer":
        """Re-initialise the trainable towers for training from scratch; returns the model.

        The ViT (unless frozen): weights and embeddings truncated-normal at `std`, biases zero, the position
        table a 2-D sin-cos table, a conv stem left at PyTorch's fan-in initialisation. Why: BLIP-2's vision
        config initialises with std 1e-10 (it always loads pretrained weights), which leaves a fresh ViT
        constant. T5 (unless frozen): `lm_head` at std d_model^-0.5, so the caption loss starts near ln V
        (docs/training-from-scratch.md#initialisation).
        """
        if not self.config.freeze_vision:
            stem = {id(p) for m in self.vision.modules() if isinstance(m, ConvStem) for p in m.parameters()}
            for name, p in self.vision.named_parameters():
                if id(p) in stem:
                    continue
                if "position_embedding" in name:
                    with torch.no_grad():
                        p.copy_(sincos_position_embedding(self.config.grid_size, p.shape[-1]).reshape(p.shape))
                elif p.ndim >= 2 or "embedding" in name:
                    nn.init.trunc_normal_(p, std=std)
                elif name.endswith("bias"):
                    nn.init.zeros_(p)
        if not self.config.freeze_language:
            nn.init.normal_(self.language.t5.lm_head.weight, std=self.config.lm_hidden ** -0.5)
        return self

    # ------------------------------------------------------------------ placement
    @property
    def device(self) -> torch.device:
        return self.qformer.query_tokens.device

    def place(self, device: str | torch.device | None = None, dtype: torch.dtype | str | None = None) -> "DynRefer":
        """Move to the device chosen by `runtime` and set the compute dtype (bf16 autocast on CUDA).

        In bf16 the frozen towers (ViT, T5, text encoder) are stored in bf16 to halve their memory; the
        trainable blocks stay fp32 and run under autocast. The cast happens before the move, so a model
        loaded on the CPU never occupies its fp32 size on the GPU.
        """
        device = runtime.choose_device(device)
        self.compute_dtype = runtime.choose_dtype(device, dtype)
        frozen = [self.text_encoder]
        if self.config.freeze_vision:
            frozen.append(self.vision)
        if self.config.freeze_language:
            frozen.append(self.language.t5)
        for module in frozen:
            module.to(self.compute_dtype)
        return self.to(device)

    def autocast(self):
        return runtime.autocast(self.device, self.compute_dtype)

    def train(self, mode: bool = True) -> "DynRefer":
        super().train(mode)
        if self.config.freeze_vision:
            self.vision.eval()  # the release forces the frozen ViT into eval mode
        if self.config.freeze_language:
            self.language.t5.eval()
        return self

    # ------------------------------------------------------------------ text tables
    def refresh_text_tables(self) -> None:
        """Embed tags (raw strings), class prompts ("the {c}") and attribute prompts (spec 4.0)."""
        prompts, groups = self.vocabulary.attribute_prompts()
        self.tag_embeds = self.text_encoder.encode(self.vocabulary.tags).to(self.device)
        self.class_embeds = self.text_encoder.encode(self.vocabulary.class_prompts()).to(self.device)
        self.attribute_embeds = self.text_encoder.encode(prompts).to(self.device)
        self.attribute_groups = groups

    def text_tables(self) -> dict[str, torch.Tensor]:
        return {"tag_embeds": self.tag_embeds, "class_embeds": self.class_embeds,
                "attribute_embeds": self.attribute_embeds}

    # ------------------------------------------------------------------ region encoding
    def encode_regions(self, pixel_values: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        """Views (N, n, 3, S, S) and per-view region boxes (N, n, 4) -> z = x_v (N, num_query_tokens, D)."""
        return self.fuse_views(*self.embed_views(pixel_values, boxes))

    def embed_views(self, pixel_values: torch.Tensor, boxes: torch.Tensor,
                    return_grid: bool = False) -> tuple[torch.Tensor, ...]:
        """The ViT on every view: CLS tokens (N, n, C) and the region's RoI maps X_k (N, n, C, G, G); with
        `return_grid` also each view's whole token map (N, n, C, G, G), for the trainer's object probe."""
        c = self.config
        if pixel_values.dim() != 5 or pixel_values.shape[1:] != (c.n_views, 3, c.image_size, c.image_size):
            raise ValueError(f"pixel_values has shape {tuple(pixel_values.shape)}; expected "
                             f"(N, {c.n_views}, 3, {c.image_size}, {c.image_size})")
        if boxes.shape != (*pixel_values.shape[:2], 4):
            raise ValueError(f"boxes has shape {tuple(boxes.shape)}; expected {(*pixel_values.shape[:2], 4)}")
        n, v = pixel_values.shape[:2]
        pixel_values = pixel_values.to(self.device)
        boxes = boxes.to(self.device, torch.float32)
        with torch.set_grad_enabled(torch.is_grad_enabled() and not c.freeze_vision):
            out = self.vision(pixel_values.flatten(0, 1), boxes.flatten(0, 1), return_grid=return_grid)
        return (out[0].reshape(n, v, -1), *(x.reshape(n, v, *x.shape[1:]) for x in out[1:]))

    def fuse_views(self, cls: torch.Tensor, rois: torch.Tensor) -> torch.Tensor:
        """Align the context maps to the reference X_0, fuse all views, compress with the Q-Former -> z."""
        return self.qformer(self.fusion(cls, self.align_views(rois)))

    def align_views(self, rois: torch.Tensor) -> torch.Tensor:
        """RoI maps (N, n, C, G, G) -> [X_0, Y_1, ..., Y_{n-1}]: each context map X_k aligned to X_0."""
        n, v = rois.shape[:2]
        if v == 1:
            return rois
        reference = rois[:, 0]
        aligned = self.align(rois[:, 1:].flatten(0, 1), reference.repeat_interleave(v - 1, dim=0))
        return torch.cat([reference[:, None], aligned.reshape(n, v - 1, *aligned.shape[1:])], dim=1)

    # ------------------------------------------------------------------ decoders
    def tag_logits(self, z: torch.Tensor) -> torch.Tensor:
        return self.tag_decoder(z, self.tag_embeds)

    def tag_scores(self, z: torch.Tensor) -> torch.Tensor:
        """(N, V_tag) probabilities sigma(logit) for `vocabulary.tags`."""
        return torch.sigmoid(self.tag_logits(z).float())

    def text_scores(self, z: torch.Tensor, texts: Sequence[str]) -> torch.Tensor:
        """(N, T) raw D_rtc matching scores s (the release's OV-recognition score)."""
        return self.rtc_decoder(z, self.text_encoder.encode(list(texts)).to(z.device)).float()

    def match_probabilities(self, z: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
        """(N, T) sigma(s * exp(t) + b) for embedded texts (T, E): the trained (calibrated) SigLIP probability
        that region and text match."""
        return torch.sigmoid(self.rtc_decoder.calibrated(self.rtc_decoder(z, text_embeds).float()))

    def classify(self, z: torch.Tensor, class_names: Sequence[str] | None = None) -> torch.Tensor:
        """(N, C) raw s against "the {class}" prompts (default: `vocabulary.classes`); argmax = category."""
        if class_names is None:
            return self.rtc_decoder(z, self.class_embeds).float()
        return self.text_scores(z, [class_prompt(name) for name in class_names])

    def attribute_scores(self, z: torch.Tensor) -> torch.Tensor:
        """(N, A) attribute scores as in the release's OVAD evaluation: max over each attribute's
        prompts of sigma(s) (without the learned scale and bias)."""
        if not self.attribute_groups:
            return torch.zeros(z.shape[0], 0, device=z.device)
        probs = torch.sigmoid(self.rtc_decoder(z, self.attribute_embeds).float())
        return torch.stack([g.max(dim=1).values for g in probs.split(self.attribute_groups, dim=1)], dim=1)

    def generate_captions(self, z: torch.Tensor, controls: Sequence[str], decoder: str = "fast", **generation
                          ) -> tuple[list[str], torch.Tensor]:
        """Captions and scores exp(sequences_scores) for control strings like "man,shirt|".

        decoder: "fast" (our static-cache beam search) or "hf" (transformers' `generate`): same captions."""
        return self.language.generate(z, controls, self.tokenizer, decoder=decoder, **generation)

    # ------------------------------------------------------------------ training
    def sample_controls(self, tag_targets: torch.Tensor, captions: Sequence[str],
                        rng: random.Random | None = None) -> list[str]:
        """Training control strings (spec 4.3) from the GT tags and the caption phrases."""
        if rng is None:  # derive from torch's RNG so torch.manual_seed makes training reproducible
            rng = random.Random(int(torch.randint(0, 2**31 - 1, ()).item()))
        tags = self.vocabulary.tags
        lm = self.config.language
        out = []
        for row, caption in zip(tag_targets.cpu(), captions):
            names = [tags[i] for i in torch.nonzero(row > 0).flatten().tolist()]
            out.append(sample_control(names, caption, rng, lm.full_drop_ratio, lm.drop_ratio))
        return out

    def forward(self, pixel_values: torch.Tensor, boxes: torch.Tensor, captions: Sequence[str],
                tag_targets: torch.Tensor, controls: Sequence[str] | None = None,
                rng: random.Random | None = None, rtc_texts: Sequence[str] | None = None) -> DynReferOutput:
        """Training losses for N regions: views, per-view boxes, one caption per region and the
        multi-hot tag targets (N, len(vocabulary.tags)). `rtc_texts` (default: the captions) are the texts
        the region-text loss matches, e.g. a class prompt in place of some captions."""
        self.check_training_targets(pixel_values.shape[0], captions, tag_targets)
        if controls is None:  # drawn before the encoder's dropout, so a seed gives the same run as before
            controls = self.sample_controls(tag_targets, captions, rng)
        with self.autocast():
            z = self.encode_regions(pixel_values, boxes)
        return self.region_losses(z, captions, tag_targets, controls, rtc_texts=rtc_texts)

    def check_training_targets(self, n: int, captions: Sequence[str], tag_targets: torch.Tensor) -> None:
        """One caption and one multi-hot row over `vocabulary.tags` per region, or a ValueError that says so."""
        if len(captions) != n:
            raise ValueError(f"{len(captions)} captions for {n} regions")
        if tag_targets.shape != (n, len(self.vocabulary.tags)):
            raise ValueError(f"tag_targets has shape {tuple(tag_targets.shape)}; expected "
                             f"({n}, {len(self.vocabulary.tags)}) for this vocabulary")

    def region_losses(self, z: torch.Tensor, captions: Sequence[str], tag_targets: torch.Tensor,
                      controls: Sequence[str], rtc_texts: Sequence[str] | None = None) -> DynReferOutput:
        """The three decoders' losses on region tokens z (N, num_query_tokens, D), one control string per
        region (`sample_controls`); see `forward`."""
        n = z.shape[0]
        self.check_training_targets(n, captions, tag_targets)
        with self.autocast():
            tag = asymmetric_loss(self.tag_logits(z), tag_targets.to(z.device), gamma_neg=self.config.tag_gamma_neg)
            tag = tag * self.config.tag_loss_weight
            texts = list(captions if rtc_texts is None else rtc_texts)
            if len(texts) != n:
                raise ValueError(f"{len(texts)} region-text texts for {n} regions")
            scores = self.rtc_decoder(z, self.text_encoder.encode(texts).to(z.device))
            same = None
            if self.config.rtc_same_caption_positive:
                same = torch.tensor([[a == b for b in texts] for a in texts], device=z.device)
            rtc = sigmoid_contrastive_loss(scores, self.rtc_decoder.logit_scale, self.rtc_decoder.logit_bias, same)
            rtc = rtc * self.config.rtc_loss_weight
            caption = self.language.loss(z, controls, captions, self.tokenizer)
        losses = {"caption": caption.float(), "tag": tag.float(), "rtc": rtc.float()}
        return DynReferOutput(loss=sum(losses.values()), losses=losses)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    # ------------------------------------------------------------------ inference and I/O
    def describe(self, image, boxes, phrases: Sequence[str] = (), **kwargs):
        """Caption, tags and phrase similarities for each box; see `dynrefer_core.describe.describe`."""
        from ..describe import describe  # describe.py builds on the model, not the other way round

        return describe(self, image, boxes, phrases, **kwargs)

    def describe_all(self, image, proposer, phrases: Sequence[str] = (), max_regions: int = 30, views=None,
                     **kwargs):
        """Propose boxes with `proposer` and describe them, best first; see `automatic.AutomaticRegionDescriber`.
        `views`: ViewOptions as for `describe`; `kwargs`: the other options of `describe`."""
        from ..automatic import AutomaticRegionDescriber

        describer = AutomaticRegionDescriber(self, proposer, max_regions=max_regions, views=views)
        return describer.generate(image, phrases, **kwargs)
