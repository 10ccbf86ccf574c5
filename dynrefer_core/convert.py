"""Build a ready DynRefer model folder from the released files (spec 6).

    python -m dynrefer_core.convert \\
        --release ckpts/refcocog_ft.pth            # or vg1.2_5e.pth (authors' OneDrive, see README)
        --blip2 Salesforce/blip2-flan-t5-xl        # HF hub id or local folder: ViT-g, ln_vision, queries,
                                                   # Q-Former init, t5_proj init, FlanT5-XL and its tokenizer
        --eva-clip ckpts/eva_clip_psz14.pt         # BAAI/EVA: only the "text." keys are used
        --clip-tokenizer openai/clip-vit-large-patch14   # the CLIP BPE (same as EVA-CLIP's tokenizer)
        --tags ram_tag_list.txt                    # optional: the RAM tag list the release was trained with
        --attributes model_configs/ovad2000.json   # optional: the release's 117 OVAD attributes
        --out checkpoints/dynrefer-refcocog

Load order as in the release: BLIP-2 first, then the DynRefer checkpoint on top (strict on its trainable
families). Sizes are read from the files (BLIP-2 config, EVA-CLIP shapes, release shapes), so the same
path converts the tiny test models. Every step prints what it did and fails with a message naming the
file and the missing or mismatched keys.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import pickle
import sys
from pathlib import Path

import torch

from .checkpoint import load_official_state_dict, map_prefix, resolve_folder
from .config import DynReferConfig, LanguageConfig, TextEncoderConfig
from .vocab import Vocabulary


class ConversionError(RuntimeError):
    """A conversion step failed; the message says which file and what to do."""


def _say(msg: str) -> None:
    print(msg, flush=True)


# ---------------------------------------------------------------------------- release checkpoint
def load_torch_file(path: str | Path, trust_pickle: bool = False) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConversionError(f"{path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "Unsupported global" not in str(err):  # torch >= 2.4 names the class it refused to unpickle
            raise _unreadable(path, err) from err
        if not trust_pickle:
            raise ConversionError(
                f"{path} holds more than tensors (e.g. the LAVIS run config), which torch refuses to unpickle "
                f"safely ({type(err).__name__}). If you trust the file, rerun with --trust-pickle.") from err
    except Exception as err:
        raise _unreadable(path, err) from err
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:
        raise _unreadable(path, err) from err


def _unreadable(path: Path, err: Exception) -> ConversionError:
    detail = str(err).split("WeightsUnpickler error:")[-1].strip()  # torch's own cause, without its advice
    detail = detail.splitlines()[0].split(". ")[0][:200] if detail else "no data"
    return ConversionError(f"{path} could not be read as a PyTorch checkpoint: the file is damaged, truncated or "
                           f"not a .pth ({type(err).__name__}: {detail})")


def release_state_dict(obj) -> dict[str, torch.Tensor]:
    state = obj.get("model", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict) or not state:
        raise ConversionError("the release file is not a LAVIS checkpoint ({'model': state_dict}) nor a state dict")
    if "cvem_mlp.0.weight" not in state:
        raise ConversionError("the release state dict has no 'cvem_mlp.0.weight': is this a DynRefer checkpoint "
                              f"(vg1.2_5e.pth / refcocog_ft.pth)? First keys: {list(state)[:5]}")
    return state


# ---------------------------------------------------------------------------- BLIP-2 (HF format)
def resolve_hf_folder(src: str | Path) -> Path:
    try:
        return resolve_folder(src, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"])
    except (FileNotFoundError, ValueError) as err:
        raise ConversionError(str(err)) from err


class TensorFolder:
    """Lazy access to the tensors of an HF model folder (single or sharded safetensors / .bin)."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.files: dict[str, Path] = {}
        for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
            if (folder / index_name).is_file():
                weight_map = json.loads((folder / index_name).read_text())["weight_map"]
                self.files = {k: folder / v for k, v in weight_map.items()}
                break
        else:
            for name in ("model.safetensors", "pytorch_model.bin"):
                if (folder / name).is_file():
                    self.files = {k: folder / name for k in self._keys_of(folder / name)}
                    break
        if not self.files:
            raise ConversionError(f"{folder} has no model.safetensors(.index.json) or pytorch_model.bin")
        self._bin_cache: dict[Path, dict] = {}

    @staticmethod
    def _keys_of(path: Path) -> list[str]:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), "pt") as f:
                return list(f.keys())
        return list(torch.load(path, map_location="cpu", weights_only=True))

    def keys(self) -> list[str]:
        return list(self.files)

    def get(self, key: str) -> torch.Tensor:
        path = self.files[key]
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), "pt") as f:
                return f.get_tensor(key)
        if path not in self._bin_cache:
            self._bin_cache = {path: torch.load(path, map_location="cpu", weights_only=True)}
        return self._bin_cache[path][key]


def blip2_to_ours(key: str) -> str | None:
    return map_prefix(key, [("vision_model.", "vision.vit."), ("qformer.", "qformer.model."),
                            ("language_projection.", "language.proj."), ("language_model.", "language.t5."),
                            ("query_tokens", "qformer.query_tokens")])


# ---------------------------------------------------------------------------- EVA-CLIP text tower
def eva_text_state_dict(obj) -> dict[str, torch.Tensor]:
    """Keys of the EVA-CLIP text tower with the "text." prefix removed (the release's filter)."""
    for wrapper in ("state_dict", "model", "module"):
        if isinstance(obj, dict) and wrapper in obj and isinstance(obj[wrapper], dict):
            obj = obj[wrapper]
    if not isinstance(obj, dict):
        raise ConversionError("the EVA-CLIP file is not a state dict")
    out = {}
    for key, value in obj.items():
        key = key.removeprefix("module.")
        if key.startswith("text."):
            out[key[len("text."):]] = value
    needed = ["token_embedding.weight", "positional_embedding", "ln_final.weight", "text_projection"]
    missing = [k for k in needed if k not in out]
    if missing:
        raise ConversionError(f"the EVA-CLIP file lacks the text keys {['text.' + k for k in missing]}; "
                              "use eva_clip_psz14.pt from BAAI/EVA")
    return out


def eva_text_to_hf(eva: dict[str, torch.Tensor], prefix: str = "text_encoder.model.") -> dict[str, torch.Tensor]:
    """Map open_clip-style text-tower keys onto `CLIPTextModelWithProjection` (in_proj split into q/k/v,
    text_projection (width, embed) transposed into a bias-free Linear)."""
    out = {
        "text_model.embeddings.token_embedding.weight": eva["token_embedding.weight"],
        "text_model.embeddings.position_embedding.weight": eva["positional_embedding"],
        "text_model.final_layer_norm.weight": eva["ln_final.weight"],
        "text_model.final_layer_norm.bias": eva["ln_final.bias"],
        "text_projection.weight": eva["text_projection"].t().contiguous(),
    }
    layers = sorted({int(k.split(".")[2]) for k in eva if k.startswith("transformer.resblocks.")})
    for i in layers:
        src, dst = f"transformer.resblocks.{i}.", f"text_model.encoder.layers.{i}."
        for part in ("weight", "bias"):
            q, k, v = eva[f"{src}attn.in_proj_{part}"].chunk(3, dim=0)
            out[f"{dst}self_attn.q_proj.{part}"], out[f"{dst}self_attn.k_proj.{part}"] = q, k
            out[f"{dst}self_attn.v_proj.{part}"] = v
            out[f"{dst}self_attn.out_proj.{part}"] = eva[f"{src}attn.out_proj.{part}"]
            out[f"{dst}layer_norm1.{part}"] = eva[f"{src}ln_1.{part}"]
            out[f"{dst}layer_norm2.{part}"] = eva[f"{src}ln_2.{part}"]
            out[f"{dst}mlp.fc1.{part}"] = eva[f"{src}mlp.c_fc.{part}"]
            out[f"{dst}mlp.fc2.{part}"] = eva[f"{src}mlp.c_proj.{part}"]
    return {prefix + k: v for k, v in out.items()}


# ---------------------------------------------------------------------------- sizes from the files
def derive_config(blip2_config: dict, eva: dict[str, torch.Tensor], release: dict[str, torch.Tensor],
                  text_heads: int | None = None) -> DynReferConfig:
    """DynReferConfig whose sizes match the three files (official values where a file does not say)."""
    base = DynReferConfig.official_flant5xl()
    try:
        vision, qformer, text = (blip2_config["vision_config"], blip2_config["qformer_config"],
                                 blip2_config["text_config"])
    except KeyError as err:
        raise ConversionError(f"the BLIP-2 config.json lacks {err}; is it a Blip2ForConditionalGeneration?") from err
    if text.get("model_type") != "t5":
        raise ConversionError(f"the BLIP-2 language model is {text.get('model_type')!r}; DynRefer's release "
                              "uses FlanT5 (Salesforce/blip2-flan-t5-xl)")
    width = vision["hidden_size"]
    fusion_in = release["cvem_mlp.0.weight"].shape[1]
    if fusion_in % width:
        raise ConversionError(f"cvem_mlp.0.weight takes {fusion_in} inputs, not a multiple of the ViT width {width}")
    offset_rows = release["cvem_align.offset_mask.weight"].shape[0]
    groups = next((g for g in range(1, 65) if math.ceil(g * 27 / 8) * 8 == offset_rows), None)
    if groups is None:
        raise ConversionError(f"cvem_align.offset_mask has {offset_rows} rows; no group count gives that")
    head_layers = len({k.split(".")[3] for k in release if k.startswith("tag_head.encoder.layer.")})
    head_hidden, text_dim = release["tag_text_proj.weight"].shape
    eva_width = eva["token_embedding.weight"].shape[1]
    eva_layers = len({k.split(".")[2] for k in eva if k.startswith("transformer.resblocks.")})
    if eva["text_projection"].shape[1] != text_dim:
        raise ConversionError(f"EVA-CLIP text projection gives {eva['text_projection'].shape[1]}-d embeddings but "
                              f"the release's tag_text_proj expects {text_dim}-d")
    language = dataclasses.replace(
        LanguageConfig(), vocab_size=text["vocab_size"], d_kv=text["d_kv"], d_ff=text["d_ff"],
        num_layers=text["num_layers"], num_decoder_layers=text.get("num_decoder_layers") or text["num_layers"],
        num_heads=text["num_heads"],
        relative_attention_num_buckets=text.get("relative_attention_num_buckets", 32),
        relative_attention_max_distance=text.get("relative_attention_max_distance", 128),
        layer_norm_epsilon=text.get("layer_norm_epsilon", 1e-6))
    text_encoder = TextEncoderConfig(
        kind="clip", hidden=eva_width, layers=eva_layers, heads=text_heads or max(1, eva_width // 64),
        intermediate=eva["transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
        vocab_size=eva["token_embedding.weight"].shape[0], max_length=eva["positional_embedding"].shape[0])
    return dataclasses.replace(
        base, n_views=fusion_in // width, image_size=vision["image_size"], patch_size=vision["patch_size"],
        vision_width=width, vision_layers=vision["num_hidden_layers"], vision_heads=vision["num_attention_heads"],
        vision_intermediate=vision["intermediate_size"],
        vision_layer_norm_eps=vision.get("layer_norm_eps", 1e-6), vision_post_layernorm_eps=1e-5,
        box_rounding="reference", align_groups=groups,
        qformer_hidden=qformer["hidden_size"], qformer_layers=qformer["num_hidden_layers"],
        qformer_heads=qformer["num_attention_heads"], qformer_intermediate=qformer["intermediate_size"],
        cross_attention_freq=qformer.get("cross_attention_frequency", 2),
        num_query_tokens=blip2_config.get("num_query_tokens", 32), head_hidden=head_hidden,
        head_layers=head_layers,
        head_intermediate=release["tag_head.encoder.layer.0.intermediate.dense.weight"].shape[0],
        text_embed_dim=text_dim, lm_hidden=text["d_model"], language=language, text_encoder=text_encoder)


# ---------------------------------------------------------------------------- the conversion
def convert(release: str | Path, blip2: str | Path, eva_clip: str | Path, clip_tokenizer: str | Path,
            out: str | Path, tags: str | Path | None = None, classes: str | Path | None = None,
            attributes: str | Path | None = None,
            dtype: str = "bf16", trust_pickle: bool = False, text_heads: int | None = None,
            head_heads: int = 4, tag_threshold: float | None = None) -> Path:
    from transformers.initialization import no_init_weights

    from .modeling.dynrefer import DynRefer
    from .modeling.tokenization import load_tokenizer

    _say(f"[1/7] release checkpoint {release}")
    release_sd = release_state_dict(load_torch_file(release, trust_pickle))
    _say(f"      {len(release_sd)} tensors")

    _say(f"[2/7] BLIP-2 FlanT5 {blip2}")
    blip2_dir = resolve_hf_folder(blip2)
    if not (blip2_dir / "config.json").is_file():
        raise ConversionError(f"{blip2_dir} has no config.json; give the Salesforce/blip2-flan-t5-xl folder")
    blip2_config = json.loads((blip2_dir / "config.json").read_text())
    tensors = TensorFolder(blip2_dir)
    try:
        tokenizer = load_tokenizer(blip2_dir)
    except Exception as err:
        raise ConversionError(f"no T5 tokenizer in {blip2_dir} ({type(err).__name__}: {err})") from err
    if tokenizer.pad_token_id != 0 or tokenizer.eos_token_id != 1:
        raise ConversionError(f"the tokenizer in {blip2_dir} has pad={tokenizer.pad_token_id}, "
                              f"eos={tokenizer.eos_token_id}; a T5 tokenizer has pad=0, eos=1")

    _say(f"[3/7] EVA-CLIP text tower {eva_clip}")
    eva = eva_text_state_dict(load_torch_file(eva_clip, trust_pickle))
    try:
        text_tokenizer = load_tokenizer(resolve_hf_folder(clip_tokenizer))
    except ConversionError:
        raise
    except Exception as err:
        raise ConversionError(f"cannot load the CLIP tokenizer {clip_tokenizer} ({type(err).__name__}: {err})") from err

    _say("[4/7] sizes")
    config = derive_config(blip2_config, eva, release_sd, text_heads)
    config = dataclasses.replace(config, head_heads=head_heads, text_encoder=dataclasses.replace(
        config.text_encoder, eos_token_id=text_tokenizer.eos_token_id,
        pad_token_id=text_tokenizer.pad_token_id or 0,
        bos_token_id=getattr(text_tokenizer, "bos_token_id", None) or 0))
    if tag_threshold is not None:
        config = dataclasses.replace(config, tag_threshold=tag_threshold)
    _say(f"      n_views={config.n_views} ViT {config.vision_width}x{config.vision_layers} "
         f"Q-Former {config.qformer_hidden}x{config.qformer_layers} T5 d_model {config.lm_hidden} "
         f"text {config.text_encoder.hidden}->{config.text_embed_dim}")
    vocabulary = Vocabulary.default()
    if tags:
        vocabulary = vocabulary.with_tags_file(tags)
    if classes:
        names = [c.strip() for c in Path(classes).read_text().splitlines() if c.strip()]
        vocabulary = dataclasses.replace(vocabulary, classes=names,
                                         sources={**vocabulary.sources, "classes": Path(classes).name})
    if attributes:
        try:
            vocabulary = vocabulary.with_attributes_file(attributes)
        except ValueError as err:
            raise ConversionError(str(err)) from err
    _say(f"      vocabulary: {len(vocabulary.tags)} tags, {len(vocabulary.classes)} classes, "
         f"{len(vocabulary.attributes)} attributes ({vocabulary.sources})")
    with no_init_weights():  # every weight is loaded below, and checked
        model = DynRefer(config, tokenizer, vocabulary, text_tokenizer, compute_tables=False)
    state = model.state_dict()
    written: set[str] = set()

    def put(name: str, value: torch.Tensor, source: str) -> None:
        if name not in state:
            raise ConversionError(f"{source}: no model parameter {name}")
        if tuple(value.shape) != tuple(state[name].shape):
            raise ConversionError(f"{source}: {name} has shape {tuple(value.shape)}, model expects "
                                  f"{tuple(state[name].shape)}")
        with torch.no_grad():
            state[name].copy_(value.to(state[name].dtype))
        written.add(name)

    _say(f"[5/7] loading BLIP-2 weights ({len(tensors.keys())} tensors)")
    ignored = []
    for key in tensors.keys():
        name = blip2_to_ours(key)
        if name is None or name not in state:
            ignored.append(key)
            continue
        put(name, tensors.get(key), f"BLIP-2 {key}")
    if ignored:
        _say(f"      ignored {len(ignored)} BLIP-2 tensors DynRefer does not use (e.g. {ignored[:3]})")
    for name, value in eva_text_to_hf(eva).items():
        put(name, value, f"EVA-CLIP {name}")
    _say("[6/7] loading the DynRefer checkpoint on top")
    try:
        report = load_official_state_dict(model, release_sd)
    except ValueError as err:
        raise ConversionError(f"{release}: {err}") from err
    written.update(report["loaded"])
    if report["tied"]:
        _say(f"      the file's {len(report['tied'])} tied T5 embedding copies equal BLIP-2's FlanT5 embeddings")
    ptrs = {(state[k].untyped_storage().data_ptr(), state[k].storage_offset()) for k in written}
    unset = sorted(k for k in state if k not in written
                   and (state[k].untyped_storage().data_ptr(), state[k].storage_offset()) not in ptrs)
    if unset:
        raise ConversionError(f"{len(unset)} model weights were found in none of the files: {unset[:20]}")

    _say(f"[7/7] text tables ({len(vocabulary.tags)} tags, {len(vocabulary.classes)} classes) and saving to {out}")
    from . import runtime

    model.text_encoder.to(runtime.choose_device())  # only the text tower needs a fast device here
    model.refresh_text_tables()
    model.to("cpu")
    if dtype == "bf16":
        for module in (model.vision, model.language.t5, model.text_encoder):
            module.to(torch.bfloat16)
    model.save_pretrained(out)
    _say(f"done: DynRefer.from_pretrained({str(out)!r})")
    return Path(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dynrefer_core.convert", description=__doc__.split("\n\n")[0])
    parser.add_argument("--release", required=True, help="vg1.2_5e.pth or refcocog_ft.pth")
    parser.add_argument("--blip2", default="Salesforce/blip2-flan-t5-xl", help="HF folder or hub id")
    parser.add_argument("--eva-clip", required=True, help="eva_clip_psz14.pt (BAAI/EVA)")
    parser.add_argument("--clip-tokenizer", default="openai/clip-vit-large-patch14", help="HF folder or hub id")
    parser.add_argument("--tags", help="tag list, one per line (e.g. RAM's ram_tag_list.txt)")
    parser.add_argument("--classes", help="class names, one per line (default: COCO-80)")
    parser.add_argument("--attributes", help="attribute list: the release's model_configs/ovad2000.json (117 OVAD "
                        "attributes) or '<is|has> <type>:<syn>/<syn>' lines (default: ours)")
    parser.add_argument("--out", required=True, help="output model folder")
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16",
                        help="storage dtype of the frozen towers (trainable blocks stay fp32)")
    parser.add_argument("--tag-threshold", type=float, help="default tag threshold (release: 0.7; demo 0.76)")
    parser.add_argument("--trust-pickle", action="store_true",
                        help="allow full unpickling of the .pth files (only for files you trust)")
    args = parser.parse_args(argv)
    try:
        convert(args.release, args.blip2, args.eva_clip, args.clip_tokenizer, args.out, tags=args.tags,
                classes=args.classes, attributes=args.attributes, dtype=args.dtype, trust_pickle=args.trust_pickle,
                tag_threshold=args.tag_threshold)
    except (ConversionError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
