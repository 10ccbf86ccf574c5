"""Static-cache beam search for D_llm's T5 (spec 4.3), step for step what transformers' `generate` computes.

The T5 encoder runs once on [t5_proj(z) ; control embeddings]. The decoder then runs one token per step on
preallocated buffers of fixed shape: a self-attention K/V cache of `max_new_tokens + 1` positions, the
cross-attention K/V of every layer (computed once per batch), the relative position bias of every
(query, key) pair (computed once). Each step scores like `generate` does with the model's settings:

    log p = log_softmax(fp32 logits);  seen tokens (the decoder sequence so far, start token included; the
    encoder input is not an id sequence and does not count) -> p<0 ? p * r : p / r  (repetition penalty r);
    EOS banned while cur_len < min_length or cur_len - 1 < min_new_tokens;
    then transformers' vectorised beam update (top 2K candidates, finished hypotheses scored
    sum log p / len^length_penalty, the early_stopping=False heuristic), ending with an in-place reorder of
    the cache (`cache.copy_(cache.index_select(...))`), so no buffer ever changes address.

Why: `generate` spends most of its time on Python bookkeeping per step; here a step is a fixed sequence of
kernels with no host sync, which on CUDA is captured once per batch bucket in a `torch.cuda.CUDAGraph` and
replayed (on the CPU it runs eagerly). Regions are padded to a bucket (1, 2, 4, ..., 64) on CUDA by
repeating the last one, and the encoder length to its maximum, so one graph serves every call of a bucket.

Supported settings (anything else makes `BeamSettings.resolve` return None and the caller uses `generate`):
num_beams >= 2, max_new_tokens, min_length, min_new_tokens, length_penalty, repetition_penalty,
do_sample=False, num_return_sequences=1, early_stopping=False.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

BUCKETS = (1, 2, 4, 8, 16, 32, 64)
_FIXED = {"do_sample": False, "num_return_sequences": 1, "early_stopping": False}


@dataclass(frozen=True)
class BeamSettings:
    """Beam-search settings as `generate` reads them (K = num_beams, T = max_new_tokens + 1 positions)."""

    num_beams: int
    max_new_tokens: int
    min_length: int = 0
    min_new_tokens: int = 0
    length_penalty: float = 1.0
    repetition_penalty: float = 1.0

    @classmethod
    def resolve(cls, kwargs: dict[str, Any]) -> BeamSettings | None:
        """The settings of `generate(**kwargs)`, or None when the static decoder does not implement them."""
        values: dict[str, Any] = {}
        for key, value in kwargs.items():
            if key in _FIXED:
                if value != _FIXED[key]:
                    return None
            elif key in cls.__dataclass_fields__:
                values[key] = value
            else:
                return None
        if values.get("repetition_penalty") is None:
            values["repetition_penalty"] = 1.0
        values = {k: v for k, v in values.items() if v is not None}
        if "num_beams" not in values or "max_new_tokens" not in values:
            return None
        s = cls(**values)
        if s.num_beams < 2 or s.max_new_tokens < 1 or s.repetition_penalty <= 0:
            return None
        return s

    @property
    def positions(self) -> int:
        return self.max_new_tokens + 1


def bucket(n: int) -> int:
    """Smallest bucket >= n regions (multiples of the largest bucket beyond it)."""
    for b in BUCKETS:
        if n <= b:
            return b
    return -(-n // BUCKETS[-1]) * BUCKETS[-1]


class BeamSearch:
    """Beam search over a fixed batch of `batch` regions and `enc_len` encoder tokens, on static buffers.

    `load(hidden, mask)` computes the cross-attention K/V of the encoder states (n <= batch regions; the rest
    repeat the last one) and resets the search; `run()` steps until every region's beams are done
    (eagerly, or on CUDA by replaying a captured graph); `result(n)` gives `generate`'s `sequences` and
    `sequences_scores` for the first n regions. Buffers keep their addresses for the object's lifetime.
    """

    def __init__(self, t5: nn.Module, settings: BeamSettings, batch: int, enc_len: int, *,
                 eos_token_id: int = 1, decoder_start_token_id: int = 0, use_graph: bool | None = None):
        cfg = t5.config
        self.t5, self.s = t5, settings
        weight = t5.lm_head.weight
        self.device, self.dtype = weight.device, weight.dtype
        self.use_graph = self.device.type == "cuda" if use_graph is None else use_graph
        self.graph: torch.cuda.CUDAGraph | None = None
        self.eos, self.start = eos_token_id, decoder_start_token_id
        K, T, B = settings.num_beams, settings.positions, batch
        H, dk, L = cfg.num_heads, cfg.d_kv, enc_len
        self.B, self.K, self.T, self.R, self.H, self.dk, self.V = B, K, T, B * K, H, dk, cfg.vocab_size
        layers = len(t5.decoder.block)
        f = dict(device=self.device)
        # Self-attention K/V (layer, k|v, row, head, position, d_kv) and cross-attention K/V (..., L, d_kv).
        self.kv = torch.zeros(layers, 2, self.R, H, T, dk, dtype=self.dtype, **f)
        self.cross = torch.zeros(layers, 2, self.R, H, L, dk, dtype=self.dtype, **f)
        self.enc_bias = torch.zeros(self.R, 1, 1, L, dtype=self.dtype, **f)
        # Relative position bias of query position p over all T keys, -inf beyond p: (T, H, 1, T).
        with torch.no_grad():
            bias = t5.decoder.block[0].layer[0].SelfAttention.compute_bias(T, T, device=self.device)[0]
        future = torch.ones(T, T, dtype=torch.bool, **f).triu(1)
        self.pos_bias = bias.masked_fill(future, float("-inf")).transpose(0, 1).unsqueeze(2).to(self.dtype)
        # Beam state, as in `_beam_search` (B, K, ...); `lengths` = generated length + 1 of each hypothesis.
        self.cur_len = torch.ones((), dtype=torch.long, **f)
        self.running_sequences = torch.zeros(B, K, T, dtype=torch.long, **f)
        self.running_scores = torch.zeros(B, K, **f)
        self.sequences = torch.zeros(B, K, T, dtype=torch.long, **f)
        self.beam_scores = torch.zeros(B, K, **f)
        self.lengths = torch.zeros(B, K, dtype=torch.long, **f)
        self.finished = torch.zeros(B, K, dtype=torch.bool, **f)
        self.open = torch.ones(B, 1, dtype=torch.bool, **f)
        self.done = torch.zeros((), dtype=torch.bool, **f)
        # Constants.
        self.arange_t = torch.arange(T, **f)
        self.batch_offset = torch.arange(B, **f).view(B, 1) * K
        self.top_mask = torch.arange(2 * K, **f) < K
        self.is_eos = torch.arange(self.V, **f) == eos_token_id
        # c ** length_penalty for c = cur_len (Python floats, as `generate` computes them, then fp32).
        self.denoms = torch.tensor([float(c ** settings.length_penalty) if c else 1.0 for c in range(T + 1)], **f)
        # Per layer, the self-attention's q|k|v weights in one matrix and a gated FF's wi_0|wi_1 in one: one
        # matmul instead of three and two (on a small model each call costs more than its arithmetic). Copies,
        # refreshed in place by `load` when a source weight changed (training), so CUDA graphs stay valid.
        self._sources = [(b.layer[0].SelfAttention, b.layer[2].DenseReluDense) for b in t5.decoder.block]
        if any(lin.bias is not None for att, _ in self._sources for lin in (att.q, att.k, att.v)):
            raise ValueError("T5 attention without biases expected")
        self.gated = hasattr(self._sources[0][1], "wi_0")
        fused = [self._fuse(att, ff) for att, ff in self._sources]
        self.qkv = [qkv.detach().clone() for qkv, _ in fused]
        self.wi = [wi.detach().clone() if self.gated else ff.wi.weight for (_, wi), (_, ff) in zip(fused, self._sources)]
        self._versions = self._weight_versions()

    # ------------------------------------------------------------------ inputs
    @torch.no_grad()
    def load(self, hidden: torch.Tensor, mask: torch.Tensor) -> None:
        """Encoder states (n, L', D) with mask (n, L'), n <= batch, L' <= enc_len: fill the cross K/V in place."""
        n, length = hidden.shape[:2]
        if n > self.B or length > self.cross.shape[-2]:
            raise ValueError(f"{n} regions x {length} tokens do not fit a search of {self.B} x {self.cross.shape[-2]}")
        rows = torch.arange(self.B, device=self.device).clamp(max=n - 1)
        hidden = hidden.to(self.dtype)[rows].repeat_interleave(self.K, dim=0)  # as generate expands the beams
        mask = mask[rows].repeat_interleave(self.K, dim=0)
        self.cross.zero_()
        for layer, block in zip(self.cross, self.t5.decoder.block):
            att = block.layer[1].EncDecAttention
            shape = (self.R, length, self.H, self.dk)
            layer[0, :, :, :length].copy_(att.k(hidden).view(shape).transpose(1, 2))
            layer[1, :, :, :length].copy_(att.v(hidden).view(shape).transpose(1, 2))
        self.enc_bias.fill_(torch.finfo(self.dtype).min)
        self.enc_bias[:, 0, 0, :length].masked_fill_(mask.bool(), 0.0)
        versions = self._weight_versions()
        if versions != self._versions:
            for (att, ff), qkv, wi in zip(self._sources, self.qkv, self.wi):
                new_qkv, new_wi = self._fuse(att, ff)
                qkv.copy_(new_qkv)
                if self.gated:
                    wi.copy_(new_wi)
            self._versions = versions
        self.reset()

    def _fuse(self, att: nn.Module, ff: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One layer's q|k|v weights stacked, and a gated FF's wi_0|wi_1 (None for an ungated FF)."""
        qkv = torch.cat([att.q.weight, att.k.weight, att.v.weight])
        return qkv, torch.cat([ff.wi_0.weight, ff.wi_1.weight]) if self.gated else None

    def _weight_versions(self) -> list[tuple[int, int]]:
        """(address, in-place version) of every weight that `qkv` and `wi` copy."""
        weights = [w for att, ff in self._sources
                   for w in (att.q.weight, att.k.weight, att.v.weight,
                             *((ff.wi_0.weight, ff.wi_1.weight) if self.gated else ()))]
        return [(w.data_ptr(), w._version) for w in weights]

    def reset(self) -> None:
        """Start state of `_beam_search`: every beam = [start], beam 0 at score 0, the others at -1e9."""
        fill = self.eos  # generate's output fill value (`pad_token_id or eos_token_id`, pad being 0)
        self.kv.zero_()
        self.cur_len.fill_(1)
        self.running_sequences.fill_(fill)
        self.running_sequences[:, :, 0] = self.start
        self.sequences.copy_(self.running_sequences)
        self.running_scores.zero_()
        self.running_scores[:, 1:] = -1e9
        self.beam_scores.fill_(-1e9)
        self.lengths.zero_()
        self.finished.zero_()
        self.open.fill_(True)
        self.done.fill_(False)

    # ------------------------------------------------------------------ one step
    @staticmethod
    def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """T5 attention (no 1/sqrt(d) scaling) of q (R, H, 1, d) over k, v (R, H, S, d) -> (R, 1, H*d).
        (Fused scaled_dot_product_attention measured no faster on our CPU; this keeps T5's own arithmetic.)"""
        weights = torch.softmax(torch.matmul(q, k.transpose(2, 3)) + bias, dim=-1)
        out = torch.matmul(weights, v).transpose(1, 2).contiguous()
        return out.reshape(q.shape[0], 1, -1)

    @staticmethod
    def _norm(layer_norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """T5's RMS norm; in fp32 as one fused kernel (the module takes five), in other dtypes the module's own
        mixed-precision arithmetic."""
        if x.dtype != torch.float32:
            return layer_norm(x)
        return F.rms_norm(x, (x.shape[-1],), layer_norm.weight, layer_norm.variance_epsilon)

    def logits(self) -> torch.Tensor:
        """fp32 logits (R, V) of each running beam's next token; writes its K/V at position cur_len - 1."""
        t5, R, H, dk = self.t5, self.R, self.H, self.dk
        pos = (self.cur_len - 1).view(1)
        tokens = self.running_sequences.view(R, self.T).index_select(1, pos)
        h = t5.decoder.embed_tokens(tokens)
        bias = self.pos_bias.index_select(0, pos)
        for i, block in enumerate(t5.decoder.block):
            sa, ca, ff = block.layer
            att = sa.SelfAttention
            # (R, 1, 3 H dk) -> q, k, v of shape (R, H, 1, dk)
            q, k, v = F.linear(self._norm(sa.layer_norm, h), self.qkv[i]).view(R, 1, 3, H, dk).permute(2, 0, 3, 1, 4)
            self.kv[i, 0].index_copy_(2, pos, k)
            self.kv[i, 1].index_copy_(2, pos, v)
            h = h + F.linear(self._attend(q, self.kv[i, 0], self.kv[i, 1], bias), att.o.weight)
            att = ca.EncDecAttention
            q = F.linear(self._norm(ca.layer_norm, h), att.q.weight).view(R, 1, H, dk).transpose(1, 2)
            h = h + F.linear(self._attend(q, self.cross[i, 0], self.cross[i, 1], self.enc_bias), att.o.weight)
            h = h + self._feed_forward(ff, i, self._norm(ff.layer_norm, h))
        h = self._norm(t5.decoder.final_layer_norm, h)
        if t5.config.scale_decoder_outputs:
            h = h * (t5.config.d_model ** -0.5)
        return t5.lm_head(h)[:, -1, :].float()

    def _feed_forward(self, ff: nn.Module, i: int, x: torch.Tensor) -> torch.Tensor:
        """T5LayerFF's DenseReluDense (dropout is off at inference), with a gated FF's two inputs in one matmul."""
        dense = ff.DenseReluDense
        if self.gated:
            gate, linear = F.linear(x, self.wi[i]).chunk(2, dim=-1)
            x = dense.act(gate) * linear
        else:
            x = dense.act(F.linear(x, self.wi[i]))
        return F.linear(x.to(dense.wo.weight.dtype), dense.wo.weight)

    def scores(self, logits: torch.Tensor) -> torch.Tensor:
        """Processed log-probabilities (R, V): log_softmax, repetition penalty, min length."""
        s, c = self.s, self.cur_len
        log_probs = torch.log_softmax(logits, dim=-1)
        if s.repetition_penalty != 1.0:
            seen_ids = torch.where(self.arange_t < c, self.running_sequences.view(self.R, self.T), self.start)
            seen = torch.zeros_like(log_probs, dtype=torch.bool).scatter_(1, seen_ids, True)
            r = s.repetition_penalty
            log_probs = torch.where(seen, torch.where(log_probs < 0, log_probs * r, log_probs / r), log_probs)
        if s.min_length > 1 or s.min_new_tokens > 0:
            ban = (c < s.min_length) | (c - 1 < s.min_new_tokens)
            log_probs = torch.where(self.is_eos & ban, float("-inf"), log_probs)
        return log_probs

    def step(self) -> None:
        """One decoding step of every beam, in place (static shapes, no host sync)."""
        B, K, T, V, c = self.B, self.K, self.T, self.V, self.cur_len
        log_probs = self.scores(self.logits()).view(B, K, V) + self.running_scores[:, :, None]
        top_scores, top_idx = torch.topk(log_probs.view(B, K * V), k=2 * K)
        top_beam, top_token = top_idx // V, top_idx % V
        top_seq = torch.take_along_dim(self.running_sequences, top_beam[..., None], dim=1)
        top_seq.scatter_(2, c.view(1, 1, 1).expand(B, 2 * K, 1), top_token[..., None])
        hits = (top_token == self.eos) | (c + 1 >= T)
        # Running beams of the next step: the best K that did not just finish.
        run_scores = top_scores + hits.to(torch.float32) * -1.0e9
        keep = torch.topk(run_scores, k=K)[1]
        running_sequences = torch.take_along_dim(top_seq, keep[..., None], dim=1)
        running_scores = torch.take_along_dim(run_scores, keep, dim=1)
        beam_idx = (torch.take_along_dim(top_beam, keep, dim=1) + self.batch_offset).view(-1)
        # Finished hypotheses: merge the ones of the top K that just finished, keep the best K.
        denom = self.denoms.index_select(0, c.view(1))
        just_finished = hits & self.top_mask
        cand = top_scores / denom
        cand = cand + (~self.open).to(torch.float32) * -1.0e9
        cand = cand + (~just_finished) * -1.0e9
        merged_scores = torch.cat((self.beam_scores, cand), dim=1)
        best = torch.topk(merged_scores, k=K)[1]
        sequences = torch.take_along_dim(torch.cat((self.sequences, top_seq), dim=1), best[..., None], dim=1)
        lengths = torch.cat((self.lengths, (c + 1).expand(B, 2 * K)), dim=1)
        finished = torch.take_along_dim(torch.cat((self.finished, just_finished), dim=1), best, dim=1)
        beam_scores = torch.take_along_dim(merged_scores, best, dim=1)
        # Early-stop heuristic (early_stopping=False): can the best running beam still beat the worst finished?
        worst = torch.where(finished, beam_scores.min(dim=1, keepdim=True)[0], -1.0e9)
        open_ = self.open & torch.any(running_scores[:, :1] / denom > worst, dim=-1, keepdim=True)
        # Write back in place (same addresses for every step), reorder the cache along the beams.
        self.kv.copy_(self.kv.index_select(2, beam_idx))
        self.running_sequences.copy_(running_sequences)
        self.running_scores.copy_(running_scores)
        self.sequences.copy_(sequences)
        self.lengths.copy_(torch.take_along_dim(lengths, best, dim=1))
        self.finished.copy_(finished)
        self.beam_scores.copy_(beam_scores)
        self.open.copy_(open_)
        self.done.copy_(~(open_.any() & ~hits.all()))
        self.cur_len.add_(1)

    # ------------------------------------------------------------------ the loop
    def _capture(self) -> None:
        """Record one step in a CUDA graph: warm up on a side stream, capture, then restore the start state."""
        saved = [t.clone() for t in self._state()]
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(2):
                self.step()
        torch.cuda.current_stream(self.device).wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.step()
        for t, v in zip(self._state(), saved):
            t.copy_(v)

    def _state(self) -> list[torch.Tensor]:
        return [self.kv, self.cur_len, self.running_sequences, self.running_scores, self.sequences,
                self.beam_scores, self.lengths, self.finished, self.open, self.done]

    @torch.no_grad()
    def run(self) -> None:
        """Step until every beam of every region is done (at most max_new_tokens steps, like `generate`)."""
        with torch.autocast(self.device.type, enabled=False):
            if self.use_graph and self.graph is None:
                self._capture()
            for _ in range(self.s.max_new_tokens):
                self.graph.replay() if self.use_graph else self.step()
                if bool(self.done):
                    break

    def result(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """`generate`'s (sequences (n, length), sequences_scores (n,)) for the first n regions: the best
        hypothesis of each, cut to the longest best hypothesis of the batch."""
        length = int(self.lengths[:, 0].max())
        return self.sequences[:n, 0, :length].clone(), self.beam_scores[:n, 0].clone()


def beam_search(t5: nn.Module, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, settings: BeamSettings,
                *, cache: dict | None = None, pad_batch: bool | None = None, enc_len: int | None = None,
                use_graph: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`t5.generate(inputs_embeds=..., attention_mask=..., num_beams=K, ...)`'s sequences and sequences_scores.

    The encoder runs once (eagerly, as `generate` runs it). `pad_batch` (default: on CUDA) pads the regions to a
    bucket and the encoder to `enc_len` tokens so that `cache` (a dict kept by the caller) can reuse the
    searches and their CUDA graphs; otherwise a search of exactly this shape is built for the call.
    """
    with torch.no_grad():
        hidden = t5.encoder(inputs_embeds=inputs_embeds, attention_mask=attention_mask).last_hidden_state
    n, length = hidden.shape[:2]
    device = hidden.device
    if pad_batch is None:
        pad_batch = device.type == "cuda"
    batch, enc = (bucket(n), max(length, enc_len or length)) if pad_batch else (n, length)
    key = (settings, batch, enc, device, t5.lm_head.weight.dtype)
    search = cache.get(key) if cache is not None else None
    if search is None:
        search = BeamSearch(t5, settings, batch, enc, eos_token_id=t5.config.eos_token_id,
                            decoder_start_token_id=t5.config.decoder_start_token_id, use_graph=use_graph)
        if cache is not None:
            cache[key] = search
    search.load(hidden, attention_mask)
    search.run()
    return search.result(n)


__all__ = ["BUCKETS", "BeamSearch", "BeamSettings", "beam_search", "bucket"]
