"""Language decoder D_llm (spec 4.3): T5 fed with the region tokens and a control string.

Encoder input = [ t5_proj(z) (num_query_tokens tokens) ; embed_tokens(control ids) + cem_memory ].
The control string is the tags/phrases joined by "," and ended with "|" ("man,white shirt|"; empty: "|");
T5 appends </s>. `cem_memory` (zero-initialised, trainable) is added to every control-token embedding,
padding and </s> included, as in the release. There is no instruction prompt.

The T5 feed-forward uses exact (erf) GELU, like LAVIS's T5 (HF's FlanT5 config says tanh "gelu_new").
Caption score = exp(sequences_scores), which with length_penalty 0 is the beam's sequence probability.
Two decoders give the same captions and scores: "fast" (default), our static-cache beam search
(`decoding.py`, CUDA graphs on CUDA), and "hf", transformers' `generate`. Settings the fast decoder does not
implement (greedy num_beams=1, sampling, several return sequences, ...) go to "hf" silently.
"""
from __future__ import annotations

import random
import re
from collections.abc import Sequence

import torch
from torch import nn
from transformers import T5Config, T5ForConditionalGeneration
from transformers.activations import GELUActivation
from transformers.models.t5.modeling_t5 import T5DenseGatedActDense

from ..config import DynReferConfig
from .decoding import BeamSettings, beam_search
from .tokenization import clean_decoded

DECODERS = ("fast", "hf")


def t5_config(config: DynReferConfig, tokenizer=None) -> T5Config:
    lm = config.language
    return T5Config(
        vocab_size=lm.vocab_size, d_model=config.lm_hidden, d_kv=lm.d_kv, d_ff=lm.d_ff,
        num_layers=lm.num_layers, num_decoder_layers=lm.num_decoder_layers, num_heads=lm.num_heads,
        relative_attention_num_buckets=lm.relative_attention_num_buckets,
        relative_attention_max_distance=lm.relative_attention_max_distance,
        dropout_rate=lm.dropout_rate, layer_norm_epsilon=lm.layer_norm_epsilon,
        feed_forward_proj="gated-gelu", dense_act_fn="gelu", tie_word_embeddings=lm.tie_word_embeddings,
        pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    )


def control_string(items: Sequence[str]) -> str:
    """Controls -> "a,b,c|" (duplicates and empty items dropped, order kept)."""
    seen: list[str] = []
    for item in items:
        item = item.strip()
        if item and item not in seen:
            seen.append(item)
    return ",".join(seen) + "|"


_WORD = re.compile(r"[a-z][a-z'-]*")
# Function words: a phrase never starts or continues with them (our stand-in for TextBlob's POS tags).
_STOP = set("""a an the this that these those some any many much more most few two three four five one
of on in at with and or but to from by for near next behind above below under over into onto off out up
down front back top bottom left right side middle is are was were be been being has have had having do does
it its he she they them his her their there here who which what while where when very also just not no
sitting standing walking holding wearing looking riding playing parked hanging lying running eating
drinking flying swimming""".split())


def caption_phrases(caption: str) -> list[str]:
    """Noun/adjective phrases of a caption, e.g. "a man in a white shirt" -> ["man", "white shirt", "shirt"].

    The release tags words with TextBlob and starts a phrase at every NN*/JJ* word, extending it over the
    following nouns. TextBlob is not a dependency here: content words are the non-function words, and a
    phrase runs from each content word to the end of its run of content words.
    """
    words = _WORD.findall(caption.lower())
    phrases = []
    for i, word in enumerate(words):
        if word in _STOP:
            continue
        end = i + 1
        while end < len(words) and words[end] not in _STOP:
            end += 1
        phrases.append(" ".join(words[i:end]))
    return list(dict.fromkeys(phrases))


def sample_control(tags: Sequence[str], caption: str, rng: random.Random, full_drop_ratio: float = 0.5,
                   drop_ratio: float = 0.5) -> str:
    """Training control sampler (spec 4.3): candidates = GT tags + caption phrases; with p=full_drop the
    control is empty, else each candidate is kept with p = 1 - drop_ratio and the kept ones shuffled."""
    candidates = list(dict.fromkeys(list(tags) + caption_phrases(caption)))
    if rng.random() < full_drop_ratio or not candidates:
        return "|"
    kept = [c for c in candidates if rng.random() > drop_ratio]
    rng.shuffle(kept)
    return control_string(kept)


class LanguageDecoder(nn.Module):
    def __init__(self, config: DynReferConfig):
        super().__init__()
        self.settings = config.language
        self.t5 = T5ForConditionalGeneration(t5_config(config))
        self._tie_embeddings(config.language.tie_word_embeddings)
        for module in self.t5.modules():  # exact erf GELU whatever the T5 config says
            if isinstance(module, T5DenseGatedActDense):
                module.act = GELUActivation()
        self.proj = nn.Linear(config.qformer_hidden, config.lm_hidden)  # release: t5_proj
        self.control_memory = nn.Parameter(torch.zeros(config.lm_hidden))  # release: cem_memory
        self._searches: dict = {}  # static beam searches (and their CUDA graphs) by shape, for decoder="fast"

    def _apply(self, fn, *args, **kwargs):
        self._searches = {}  # .to()/.half() make new weight tensors: captured graphs would read the old ones
        return super()._apply(fn, *args, **kwargs)

    def _tie_embeddings(self, tie_lm_head: bool) -> None:
        """Tie encoder/decoder token embeddings to `shared`, and `lm_head` only if asked.

        transformers 5 always ties T5's lm_head at construction; FlanT5 (v1.1) has its own lm_head, so it is
        untied here. Done explicitly so that it also holds when weights are not initialised (loading).
        """
        t5 = self.t5
        t5.encoder.embed_tokens = t5.shared
        t5.decoder.embed_tokens = t5.shared
        if tie_lm_head:
            t5.lm_head.weight = t5.shared.weight
        elif t5.lm_head.weight is t5.shared.weight:
            t5.lm_head.weight = nn.Parameter(t5.shared.weight.detach().clone())
        tied = getattr(t5, "all_tied_weights_keys", None)
        if isinstance(tied, dict) and not tie_lm_head:
            tied.pop("lm_head.weight", None)

    def encoder_inputs(self, z: torch.Tensor, controls: Sequence[str], tokenizer):
        if len(controls) != z.shape[0]:
            raise ValueError(f"{len(controls)} control strings for {z.shape[0]} regions")
        device = z.device
        tokens = tokenizer(list(controls), padding="longest", truncation=True,
                           max_length=self.settings.max_txt_len, return_tensors="pt").to(device)
        embed = self.t5.get_input_embeddings()
        visual = self.proj(z)
        control = embed(tokens.input_ids).to(visual.dtype) + self.control_memory.to(visual.dtype)
        inputs = torch.cat([visual, control], dim=1)
        mask = torch.cat([torch.ones(visual.shape[:2], dtype=tokens.attention_mask.dtype, device=device),
                          tokens.attention_mask], dim=1)
        return inputs, mask

    def loss(self, z: torch.Tensor, controls: Sequence[str], captions: Sequence[str], tokenizer) -> torch.Tensor:
        """Token-mean cross-entropy of the captions (pad -> -100)."""
        inputs, mask = self.encoder_inputs(z, controls, tokenizer)
        target = tokenizer(list(captions), padding="longest", truncation=True,
                           max_length=self.settings.max_txt_len, return_tensors="pt").to(z.device)
        labels = target.input_ids.masked_fill(target.input_ids == tokenizer.pad_token_id, -100)
        out = self.t5(inputs_embeds=inputs, attention_mask=mask, decoder_attention_mask=target.attention_mask,
                      labels=labels)
        return out.loss

    @torch.no_grad()
    def generate(self, z: torch.Tensor, controls: Sequence[str], tokenizer, decoder: str = "fast", **overrides
                 ) -> tuple[list[str], torch.Tensor]:
        """Beam search; returns captions and their scores exp(sequences_scores).

        decoder: "fast" (static-cache beam search, `decoding.py`) or "hf" (`generate`); both take the same
        overrides (num_beams, max_new_tokens, min_length, min_new_tokens, length_penalty, repetition_penalty,
        ...), and "fast" hands the ones it does not implement to "hf".
        """
        if decoder not in DECODERS:
            raise ValueError(f"decoder={decoder!r}, expected one of {DECODERS}")
        s = self.settings
        kwargs = dict(do_sample=False, num_beams=s.num_beams, max_new_tokens=s.max_new_tokens,
                      min_length=s.min_length, length_penalty=s.length_penalty,
                      repetition_penalty=s.repetition_penalty, num_return_sequences=1)
        kwargs.update(overrides)
        inputs, mask = self.encoder_inputs(z, controls, tokenizer)
        fast = BeamSettings.resolve(kwargs) if decoder == "fast" else None
        if fast is not None:
            enc_len = z.shape[1] + s.max_txt_len  # the longest encoder input: one CUDA graph per batch bucket
            sequences, log_prob = beam_search(self.t5, inputs, mask, fast, cache=self._searches, enc_len=enc_len)
        else:
            out = self.t5.generate(inputs_embeds=inputs, attention_mask=mask, output_scores=True,
                                   return_dict_in_generate=True, pad_token_id=0, eos_token_id=1,
                                   decoder_start_token_id=0, **kwargs)
            sequences = out.sequences
            if kwargs["num_beams"] > 1:
                log_prob = out.sequences_scores
            else:  # greedy: sum of the chosen tokens' log-probabilities
                steps = self.t5.compute_transition_scores(out.sequences, out.scores, normalize_logits=True)
                log_prob = steps.masked_fill(~torch.isfinite(steps), 0).sum(-1)
        texts = tokenizer.batch_decode(sequences, skip_special_tokens=True)
        return [clean_decoded(t) for t in texts], log_prob.float().exp()
