"""Model folders (save_pretrained / from_pretrained) and the released checkpoint's key names (spec 6.4).

A model folder is self-contained:

    config.json                DynReferConfig
    model.safetensors          all weights (tied aliases stored once; the MiniLM text tower is not
                               stored: its package provides it)
    tokenizer/                 the language decoder's tokenizer (T5TokenizerFast or our word-level one)
    text_tokenizer/            the CLIP text encoder's tokenizer ("clip" kind only)
    vocab/                     tags.txt, coco_classes.txt, attributes.txt
    text_tables.safetensors    cached text embeddings of the vocabulary (recomputed if stale)

The release's `.pth` (LAVIS: `{"model": state_dict, ...}`) holds the trainable families (cvem_align,
cvem_mlp, cem_memory, tag_*, attr_*, Qformer.*, t5_proj) and, written by LAVIS's own writer, the two tied
T5 embedding aliases. `load_official_state_dict` maps them
onto this model strictly; `official_state_dict` exports them back under the release's names.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .config import DynReferConfig
from .vocab import Vocabulary

FORMAT = "dynrefer-core/1"
IGNORED_RELEASE_KEYS = {"Qformer.bert.embeddings.position_ids"}
# LAVIS's writer drops frozen parameters by the names of named_parameters(), which lists T5's shared
# embedding once: its two aliases stay in the file (spec 6.3). They must equal our T5 input embeddings.
TIED_T5_KEYS = ("t5_model.encoder.embed_tokens.weight", "t5_model.decoder.embed_tokens.weight")
_T5_EMBEDDINGS = "language.t5.shared.weight"

# (release prefix, our prefix); the first match wins. Q-Former layer internals are handled by _QFORMER.
_PREFIXES = [
    ("cvem_align.offset_mask_dw.", "align.offset_conv."),
    ("cvem_align.offset_mask.", "align.offset_mask."),
    ("cvem_align.value_proj.", "align.value_proj."),
    ("cvem_align.output_proj.", "align.output_proj."),
    ("cvem_mlp.", "fusion.mlp."),
    ("cem_memory", "language.control_memory"),
    ("tag_head.encoder.layer.", "tag_decoder.head.layer."),
    ("tag_vision_proj.", "tag_decoder.vision_proj."),
    ("tag_text_proj.", "tag_decoder.text_proj."),
    ("tag_fc.", "tag_decoder.fc."),
    ("attr_head.encoder.layer.", "rtc_decoder.head.layer."),
    ("attr_vision_proj.", "rtc_decoder.vision_proj."),
    ("attr_text_proj.", "rtc_decoder.text_proj."),
    ("attr_fc.", "rtc_decoder.fc."),
    ("attr_t", "rtc_decoder.logit_scale"),
    ("attr_b", "rtc_decoder.logit_bias"),
    ("Qformer.bert.embeddings.LayerNorm.", "qformer.model.layernorm."),
    ("Qformer.bert.encoder.layer.", "qformer.model.encoder.layer."),
    ("t5_proj.", "language.proj."),
]
# Parameters the release takes from the BLIP-2 checkpoint (frozen, so absent from DynRefer's .pth).
_BLIP2_EXTRAS = [("query_tokens", "qformer.query_tokens"), ("ln_vision.", "vision.vit.post_layernorm.")]
# LAVIS BERT names "attention.self.*" what transformers' Q-Former names "attention.attention.*".
_QFORMER = re.compile(r"^(\d+\.(?:attention|crossattention))\.self\.")
_QFORMER_BACK = re.compile(r"^(\d+\.(?:attention|crossattention))\.attention\.")
TRAINABLE_PREFIXES = ("align.", "fusion.", "language.control_memory", "tag_decoder.", "rtc_decoder.",
                      "qformer.model.", "language.proj.")


def map_prefix(key: str, table) -> str | None:
    """`key` renamed by the first (source prefix, target prefix) of `table` that matches it (a prefix ending
    in "." matches what starts with it, any other only itself); None if none matches."""
    for src, dst in table:
        if key == src or (src.endswith(".") and key.startswith(src)):
            rest = key[len(src):]
            if src == "Qformer.bert.encoder.layer.":
                rest = _QFORMER.sub(r"\1.attention.", rest)
            elif dst == "Qformer.bert.encoder.layer.":
                rest = _QFORMER_BACK.sub(r"\1.self.", rest)
            return dst + rest
    return None


def release_to_ours(key: str) -> str | None:
    """Our parameter name for a release key (None if the key is not one of the mapped families)."""
    return map_prefix(key, _PREFIXES + _BLIP2_EXTRAS)


def ours_to_release(key: str) -> str | None:
    return map_prefix(key, [(d, s) for s, d in _PREFIXES])


def _trainable_names(model) -> list[str]:
    return [k for k in model.state_dict() if k.startswith(TRAINABLE_PREFIXES)]


def official_state_dict(model, include_blip2: bool = False, tied_embeddings: bool = False
                        ) -> dict[str, torch.Tensor]:
    """The release's trainable families under the release's names, detached copies on the CPU.

    `include_blip2`: also query_tokens and ln_vision (which the release takes from BLIP-2).
    `tied_embeddings`: also the two T5 embedding aliases that LAVIS's writer keeps (spec 6.3), so that the
    export is the file LAVIS itself would write.
    """
    state = model.state_dict()
    out = {}
    for name in _trainable_names(model):
        out[ours_to_release(name)] = state[name].detach().cpu().clone()
    if include_blip2:
        back = [(d, s) for s, d in _BLIP2_EXTRAS]
        for name in state:
            key = map_prefix(name, back)
            if key is not None:
                out[key] = state[name].detach().cpu().clone()
    if tied_embeddings:
        for key in TIED_T5_KEYS:
            out[key] = state[_T5_EMBEDDINGS].detach().cpu().clone()
    return out


def _same_embeddings(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal up to the rounding of the coarser of the two dtypes (the release stores T5 in bf16)."""
    eps = max(torch.finfo(a.dtype).eps, torch.finfo(b.dtype).eps) if a.is_floating_point() else 0.0
    return a.shape == b.shape and torch.allclose(a.float(), b.float(), rtol=eps, atol=eps * 1e-3)


def load_official_state_dict(model, checkpoint: dict) -> dict[str, list[str]]:
    """Load a release checkpoint (`{"model": {...}}` or the bare state dict) into `model`.

    Strict on the trainable families: raises ValueError naming every missing, unexpected or wrongly
    shaped key before touching the model. `query_tokens` and `ln_vision.*` are loaded when present.
    The BERT `position_ids` buffer is ignored. The T5 embedding aliases that LAVIS's writer keeps
    (`TIED_T5_KEYS`) are not loaded but checked: they must equal the model's T5 input embeddings (from
    BLIP-2), else the file belongs to another language model. Returns {"loaded", "blip2", "tied"}.
    """
    if not isinstance(checkpoint, dict):
        raise ValueError(f"expected a dict checkpoint, got {type(checkpoint).__name__}")
    state = checkpoint.get("model", checkpoint)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError("checkpoint['model'] is not a state dict of tensors")
    ours = model.state_dict()
    expected = set(_trainable_names(model))
    unexpected, wrong_shape, wrong_names, mapped, blip2, tied = [], [], set(), {}, [], []
    for key, value in state.items():
        if key in IGNORED_RELEASE_KEYS:
            continue
        if key in TIED_T5_KEYS:
            embeddings = ours[_T5_EMBEDDINGS]
            if tuple(value.shape) != tuple(embeddings.shape):
                wrong_shape.append(f"{key}: checkpoint {tuple(value.shape)} vs model {tuple(embeddings.shape)}")
            elif not _same_embeddings(value, embeddings):
                raise ValueError(f"{key} differs from this model's T5 input embeddings ({_T5_EMBEDDINGS}): the "
                                 "release was trained on another language model, or BLIP-2's FlanT5 is not "
                                 "loaded yet (load it first, as convert does)")
            else:
                tied.append(key)
            continue
        name = release_to_ours(key)
        if name is None or name not in ours:
            unexpected.append(key)
            continue
        if tuple(value.shape) != tuple(ours[name].shape):
            wrong_shape.append(f"{key}: checkpoint {tuple(value.shape)} vs model {tuple(ours[name].shape)}")
            wrong_names.add(name)
            continue
        mapped[name] = value
        if name not in expected:
            blip2.append(key)
    missing = sorted(ours_to_release(n) for n in expected - set(mapped) - wrong_names)
    if missing or unexpected or wrong_shape:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys: {missing}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys: {sorted(unexpected)}")
        if wrong_shape:
            parts.append(f"{len(wrong_shape)} keys with the wrong shape: {wrong_shape}")
        raise ValueError("checkpoint does not match this DynRefer configuration (is it the FlanT5-XL, "
                         "n_views=3 release?):\n  " + "\n  ".join(parts))
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    with torch.no_grad():
        for name, value in mapped.items():
            target = params.get(name, buffers.get(name))
            target.copy_(value.to(target.dtype))
    return {"loaded": sorted(mapped), "blip2": sorted(blip2), "tied": sorted(tied)}


# ---------------------------------------------------------------------- model folders
def _vocab_digest(model) -> str:
    texts = model.vocabulary.tags + ["\x00"] + model.vocabulary.class_prompts() + ["\x00"]
    texts += model.vocabulary.attribute_prompts()[0]
    text_kind = json.dumps(model.config.text_encoder.__dict__, sort_keys=True)
    return hashlib.sha256(("\n".join(texts) + text_kind).encode()).hexdigest()


def _weights_to_save(model) -> dict[str, torch.Tensor]:
    out, seen = {}, set()
    skip_text = model.config.text_encoder.kind == "minilm"
    for name, tensor in model.state_dict().items():
        if skip_text and name.startswith("text_encoder."):
            continue
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if tensor.numel() and key in seen:
            continue  # a tied alias (T5 shared / embed_tokens): stored once, restored by tying
        seen.add(key)
        out[name] = tensor.detach().contiguous().cpu()
    return out


def update_config(folder: str | Path, **fields) -> DynReferConfig:
    """Change `fields` of a saved model's config.json in place (e.g. the task priors a view study measured),
    checked as DynReferConfig checks them; the weights are untouched."""
    config = dataclasses.replace(read_config(folder), **fields)  # replace() runs the config's checks
    _write_config(config, folder)
    return config


def read_config(folder: str | Path) -> DynReferConfig:
    """The DynReferConfig of a saved model folder, its format checked."""
    path = Path(folder) / "config.json"
    raw = json.loads(path.read_text())
    fmt = raw.pop("format", None)
    if fmt != FORMAT:
        raise ValueError(f"{path} has format {fmt!r}, expected {FORMAT!r}")
    return DynReferConfig.from_dict(raw)


def _write_config(config: DynReferConfig, folder: Path) -> None:
    (Path(folder) / "config.json").write_text(json.dumps({**config.to_dict(), "format": FORMAT}, indent=2) + "\n")


def save_pretrained(model, folder: str | Path) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    _write_config(model.config, folder)
    save_file(_weights_to_save(model), str(folder / "model.safetensors"), metadata={"format": "pt"})
    model.tokenizer.save_pretrained(str(folder / "tokenizer"))
    if model.config.text_encoder.kind == "clip" and model.text_encoder.tokenizer is not None:
        model.text_encoder.tokenizer.save_pretrained(str(folder / "text_tokenizer"))
    model.vocabulary.save(folder / "vocab")
    tables = {k: v.detach().float().contiguous().cpu() for k, v in model.text_tables().items()}
    save_file(tables, str(folder / "text_tables.safetensors"),
              metadata={"vocab_digest": _vocab_digest(model), "attribute_groups": json.dumps(model.attribute_groups)})
    return folder


def resolve_folder(folder_or_hub_id: str | Path, allow_patterns: list[str] | None = None) -> Path:
    """A local folder, or a Hugging Face Hub model id downloaded (or found in the cache) as one
    (`allow_patterns`: only the files that match)."""
    path = Path(folder_or_hub_id)
    if path.is_dir():
        return path
    if path.exists():
        raise ValueError(f"{path} is a file; give a model folder (see save_pretrained) or a Hugging Face Hub id")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(str(folder_or_hub_id), allow_patterns=allow_patterns))
    except Exception as err:
        raise FileNotFoundError(f"{folder_or_hub_id!r} is neither a local model folder nor a reachable Hugging Face "
                                f"Hub model ({type(err).__name__}: {err})") from err


class PretrainedMixin:
    """`save_pretrained` / `from_pretrained` for the model class that mixes this in (as transformers puts
    them on PreTrainedModel), so this module never imports the model."""

    def save_pretrained(self, folder: str | Path) -> Path:
        """Write a self-contained model folder (see the module docstring)."""
        return save_pretrained(self, folder)

    @classmethod
    def from_pretrained(cls, folder_or_hub_id: str | Path, device=None, dtype=None):
        """Load a model folder (or a Hugging Face Hub id), placed on `device` in `dtype` (runtime's choice by
        default), in eval mode."""
        return from_pretrained(cls, folder_or_hub_id, device=device, dtype=dtype)


def from_pretrained(model_class, folder_or_hub_id: str | Path, device=None, dtype=None):
    from transformers.initialization import no_init_weights

    from . import runtime
    from .modeling.tokenization import load_tokenizer

    folder = resolve_folder(folder_or_hub_id)
    missing = [n for n in ("config.json", "model.safetensors", "tokenizer", "vocab") if not (folder / n).exists()]
    if missing:
        raise FileNotFoundError(f"model folder {folder} lacks {missing}; make one with save_pretrained or "
                                "python -m dynrefer_core.convert")
    config = read_config(folder)
    tokenizer = load_tokenizer(folder / "tokenizer")
    text_tokenizer = load_tokenizer(folder / "text_tokenizer") if (folder / "text_tokenizer").is_dir() else None
    vocabulary = Vocabulary.from_folder(folder / "vocab")
    target = runtime.choose_device(device)
    # Built and loaded on the CPU, then cast and moved by place(): the GPU only ever holds the placed size
    # (the official model: ~7.8 GiB in bf16, instead of 15 GiB in fp32).
    with no_init_weights():  # every persistent weight is loaded below
        model = model_class(config, tokenizer, vocabulary, text_tokenizer, compute_tables=False)
    _load_weights(model, folder / "model.safetensors")
    model.place(target, dtype)
    _load_tables(model, folder / "text_tables.safetensors")
    return model.eval()


def _load_weights(model, path: Path) -> None:
    params = model.state_dict()
    skip_text = model.config.text_encoder.kind == "minilm"
    expected = {k for k in params if not (skip_text and k.startswith("text_encoder."))}
    loaded, unexpected, wrong = set(), [], []
    with safe_open(str(path), "pt") as f, torch.no_grad():
        for key in f.keys():
            if key not in params:
                unexpected.append(key)
                continue
            value = f.get_tensor(key)
            if tuple(value.shape) != tuple(params[key].shape):
                wrong.append(f"{key}: file {tuple(value.shape)} vs model {tuple(params[key].shape)}")
                continue
            params[key].copy_(value.to(params[key].dtype))
            loaded.add(key)
    # Tied aliases share storage with a loaded tensor.
    ptrs = {(params[k].untyped_storage().data_ptr(), params[k].storage_offset()) for k in loaded}
    missing = sorted(k for k in expected - loaded
                     if (params[k].untyped_storage().data_ptr(), params[k].storage_offset()) not in ptrs)
    if missing or unexpected or wrong:
        raise ValueError(f"{path} does not match its config.json: missing {missing}, unexpected {unexpected}, "
                         f"wrong shape {wrong}")


def _load_tables(model, path: Path) -> None:
    if path.is_file():
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            if meta.get("vocab_digest") == _vocab_digest(model):
                for key in ("tag_embeds", "class_embeds", "attribute_embeds"):
                    setattr(model, key, f.get_tensor(key).to(model.device))
                model.attribute_groups = json.loads(meta["attribute_groups"])
                return
    model.refresh_text_tables()  # missing or stale: recompute from the frozen text encoder
