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
from typing import Any, NamedTuple

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


class _Layer(NamedTuple):
    """What one decoder block's step reads: norms, weights (`_t`: transposed views for `mm`), cache views."""

    sa_norm: nn.Module
    qkv: torch.Tensor    # q|k|v weights stacked (3 H d_kv, D), a copy
    qkv_t: torch.Tensor
    kv: torch.Tensor     # this layer's self-attention K|V cache (2, R, H, T, d_kv)
    k_t: torch.Tensor    # its keys as (R, H, d_kv, T)
    v: torch.Tensor
    o_t: torch.Tensor
    ca_norm: nn.Module
    ca_q_t: torch.Tensor
    ca_k_t: torch.Tensor  # cross-attention keys (R, H, d_kv, L) and values (R, H, L, d_kv)
    ca_v: torch.Tensor
    ca_o_t: torch.Tensor
    ff_norm: nn.Module
    wi: torch.Tensor     # a gated FF's wi_0|wi_1 stacked, else wi; a copy
    wi_t: torch.Tensor
    act: nn.Module
    wo_t: torch.Tensor


class BeamSearch:
    """Beam search over a fixed batch of `batch` regions and `enc_len` encoder tokens, on static buffers.

    `load(hidden, mask)` computes the cross-attention K/V of the encoder states (n <= batch regions; the rest
    repeat the last one) and resets the search; `run()` steps until every region's beams are done
    (eagerly, or on CUDA by replaying a captured graph); `result(n)` gives `generate`'s `sequences` and
    `sequences_scores` for the first n regions. Buffers keep their addresses for the object's lifetime.

    A step is written for few kernel calls, since on a small model or a CPU each call costs more than its
    arithmetic: per layer one matmul for q|k|v and one for a gated FF's wi_0|wi_1, residual adds inside the
    matmul (addmm), weights read through views made once, and results written straight into the state
    (`out=`) instead of computed and copied.
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
        blocks = t5.decoder.block
        f = dict(device=self.device)
        # Self-attention K/V (layer, k|v, row, head, position, d_kv) and cross-attention K/V (..., L, d_kv).
        self.kv = torch.zeros(len(blocks), 2, self.R, H, T, dk, dtype=self.dtype, **f)
        self.cross = torch.zeros(len(blocks), 2, self.R, H, L, dk, dtype=self.dtype, **f)
        self.enc_bias = torch.zeros(self.R, 1, 1, L, dtype=self.dtype, **f)
        # Relative position bias of query position p over all T keys, -inf beyond p: (T, H, 1, T).
        with torch.no_grad():
            bias = blocks[0].layer[0].SelfAttention.compute_bias(T, T, device=self.device)[0]
        future = torch.ones(T, T, dtype=torch.bool, **f).triu(1)
        self.pos_bias = bias.masked_fill(future, float("-inf")).transpose(0, 1).unsqueeze(2).to(self.dtype)
        # Beam state, as in `_beam_search` (B, K, ...). `closed` = not `is_early_stop_heuristic_unsatisfied`.
        self.cur_len = torch.ones(1, dtype=torch.long, **f)
        self.position = torch.zeros(1, dtype=torch.long, **f)  # cur_len - 1: where this step's token sits
        self.running_sequences = torch.zeros(B, K, T, dtype=torch.long, **f)
        self.running_scores = torch.zeros(B, K, **f)
        self.sequences = torch.zeros(B, K, T, dtype=torch.long, **f)
        self.beam_scores = torch.zeros(B, K, **f)
        self.finished = torch.zeros(B, K, dtype=torch.bool, **f)
        self.closed = torch.zeros(B, 1, dtype=torch.bool, **f)
        self.done = torch.zeros((), dtype=torch.bool, **f)
        # Constants.
        self.arange_t = torch.arange(T, **f)
        self.batch_offset = torch.arange(B, **f).view(B, 1) * K
        self.top_mask = torch.arange(2 * K, **f) < K
        self.new_token_at = self.cur_len.view(1, 1, 1).expand(B, 2 * K, 1)  # a view: follows cur_len
        # c ** length_penalty for c = cur_len (Python floats, as `generate` computes them, then fp32), and
        # whether EOS is banned at c (min_length, min_new_tokens).
        self.denoms = torch.tensor([float(c ** settings.length_penalty) if c else 1.0 for c in range(T + 1)], **f)
        self.eos_banned = torch.tensor([c < settings.min_length or c - 1 < settings.min_new_tokens
                                        for c in range(T + 1)], **f)
        attentions = [b.layer[0].SelfAttention for b in blocks]
        if any(lin.bias is not None for att in attentions for lin in (att.q, att.k, att.v)):
            raise ValueError("T5 attention without biases expected")
        self.gated = hasattr(blocks[0].layer[2].DenseReluDense, "wi_0")
        self._bind()

    def _bind(self) -> None:
        """Read the weights a step uses: (transposed) views made once, and per layer the self-attention's
        q|k|v and a gated FF's wi_0|wi_1 stacked into one matrix each (copies, one matmul instead of three
        and two). `load` refreshes the copies in place when a weight changed in place (an optimizer step), so
        a captured CUDA graph stays valid, and binds again when a weight was replaced."""
        t5 = self.t5
        self.layers = []
        for i, block in enumerate(t5.decoder.block):
            sa, ca, ff = block.layer
            dense = ff.DenseReluDense
            qkv, wi = self._fuse(sa.SelfAttention, dense)
            self.layers.append(_Layer(
                sa.layer_norm, qkv, qkv.t(), self.kv[i], self.kv[i, 0].transpose(2, 3), self.kv[i, 1],
                sa.SelfAttention.o.weight.t(), ca.layer_norm, ca.EncDecAttention.q.weight.t(),
                self.cross[i, 0].transpose(2, 3), self.cross[i, 1], ca.EncDecAttention.o.weight.t(),
                ff.layer_norm, wi, wi.t(), dense.act, dense.wo.weight.t()))
        self.final_norm = t5.decoder.final_layer_norm
        self.lm_head = t5.lm_head.weight.t()
        self.embedding = t5.decoder.embed_tokens.weight
        self.output_scale = t5.config.d_model ** -0.5 if t5.config.scale_decoder_outputs else None
        self._versions = self._weight_versions()
        self.graph = None

    def _fuse(self, att: nn.Module, dense: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        """New tensors: one layer's q|k|v weights stacked, and a gated FF's wi_0|wi_1 (an ungated FF's wi)."""
        qkv = torch.cat([att.q.weight, att.k.weight, att.v.weight]).detach()
        wi = torch.cat([dense.wi_0.weight, dense.wi_1.weight]) if self.gated else dense.wi.weight.clone()
        return qkv, wi.detach()

    def _weight_versions(self) -> list[tuple[int, int]]:
        """(address, in-place version) of every decoder weight: the views and copies read by a step follow
        them."""
        return [(w.data_ptr(), w._version) for w in self.t5.decoder.parameters()] + \
            [(self.t5.lm_head.weight.data_ptr(), self.t5.lm_head.weight._version)]

    # ------------------------------------------------------------------ inputs
    @torch.no_grad()
    def load(self, hidden: torch.Tensor, mask: torch.Tensor) -> None:
        """Encoder states (n, L', D) with mask (n, L'), n <= batch, L' <= enc_len: fill the cross K/V in place.

        K and V are computed on the n regions, then repeated over the beams (as `generate` expands its inputs)
        and the padded rows (which repeat the last region)."""
        n, length = hidden.shape[:2]
        if n > self.B or length > self.cross.shape[-2]:
            raise ValueError(f"{n} regions x {length} tokens do not fit a search of {self.B} x {self.cross.shape[-2]}")
        rows = torch.arange(self.B, device=self.device).clamp(max=n - 1).repeat_interleave(self.K)
        hidden = hidden.to(self.dtype).reshape(n * length, -1)
        for layer, block in zip(self.cross, self.t5.decoder.block):
            att = block.layer[1].EncDecAttention
            for kv, linear in zip(layer, (att.k, att.v)):
                x = torch.mm(hidden, linear.weight.t()).view(n, length, self.H, self.dk).transpose(1, 2)
                kv[..., :length, :].copy_(x.index_select(0, rows))
        self.cross[..., length:, :].zero_()
        self.enc_bias.fill_(torch.finfo(self.dtype).min)
        self.enc_bias[:, 0, 0, :length].masked_fill_(mask.bool()[rows], 0.0)
        versions = self._weight_versions()
        if [p for p, _ in versions] != [p for p, _ in self._versions]:
            self._bind()  # a weight was replaced: new views (and a new graph)
        elif versions != self._versions:
            for layer, block in zip(self.layers, self.t5.decoder.block):
                qkv, wi = self._fuse(block.layer[0].SelfAttention, block.layer[2].DenseReluDense)
                layer.qkv.copy_(qkv)
                layer.wi.copy_(wi)
            self._versions = versions
        self.reset()

    def reset(self) -> None:
        """Start state of `_beam_search`: every beam = [start], beam 0 at score 0, the others at -1e9."""
        fill = self.eos  # generate's output fill value (`pad_token_id or eos_token_id`, pad being 0)
        self.kv.zero_()
        self.cur_len.fill_(1)
        self.position.fill_(0)
        self.running_sequences.fill_(fill)
        self.running_sequences[:, :, 0] = self.start
        self.sequences.copy_(self.running_sequences)
        self.running_scores.zero_()
        self.running_scores[:, 1:] = -1e9
        self.beam_scores.fill_(-1e9)
        self.finished.zero_()
        self.closed.zero_()
        self.done.zero_()

    # ------------------------------------------------------------------ one step
    @staticmethod
    def _norm(layer_norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """T5's RMS norm; in fp32 as one kernel (the module takes five), in other dtypes the module's own
        mixed-precision arithmetic."""
        if x.dtype != torch.float32:
            return layer_norm(x)
        return F.rms_norm(x, (x.shape[-1],), layer_norm.weight, layer_norm.variance_epsilon)

    @staticmethod
    def _attend(q: torch.Tensor, k_t: torch.Tensor, v: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """T5 attention (no 1/sqrt(d) scaling) of q (R, H, 1, d) over keys k_t (R, H, d, S) and values
        v (R, H, S, d) -> (R, H*d). (A fused scaled_dot_product_attention measured no faster on our CPU.)"""
        scores = torch.matmul(q, k_t).add_(bias)
        if scores.dtype == torch.float32:
            weights = torch.softmax(scores, dim=-1)
        else:  # as T5Attention: softmax in fp32
            weights = torch.softmax(scores.float(), dim=-1).type_as(scores)
        return torch.matmul(weights, v).view(q.shape[0], -1)  # (R, H, 1, d) is laid out as (R, H*d)

    def logits(self) -> torch.Tensor:
        """fp32 logits (R, V) of each running beam's next token; writes its K/V at position cur_len - 1."""
        R, H, dk, pos = self.R, self.H, self.dk, self.position
        tokens = self.running_sequences.view(R, self.T).index_select(1, pos).view(R)
        h = F.embedding(tokens, self.embedding)  # (R, D): one query position per beam
        bias = self.pos_bias.index_select(0, pos)
        for w in self.layers:
            qkv = torch.mm(self._norm(w.sa_norm, h), w.qkv_t).view(R, 3, H, 1, dk)
            w.kv.index_copy_(3, pos, qkv[:, 1:].transpose(0, 1))
            h = torch.addmm(h, self._attend(qkv[:, 0], w.k_t, w.v, bias), w.o_t)
            q = torch.mm(self._norm(w.ca_norm, h), w.ca_q_t).view(R, H, 1, dk)
            h = torch.addmm(h, self._attend(q, w.ca_k_t, w.ca_v, self.enc_bias), w.ca_o_t)
            x = torch.mm(self._norm(w.ff_norm, h), w.wi_t)
            if self.gated:
                gate, linear = x.chunk(2, dim=-1)
                x = w.act(gate) * linear
            else:
                x = w.act(x)
            h = torch.addmm(h, x.to(w.wo_t.dtype), w.wo_t)
        h = self._norm(self.final_norm, h)
        if self.output_scale is not None:
            h = h * self.output_scale
        return torch.mm(h, self.lm_head).float()

    def scores(self, logits: torch.Tensor) -> torch.Tensor:
        """Processed log-probabilities (R, V): log_softmax, repetition penalty, min length (in place)."""
        s = self.s
        log_probs = torch.log_softmax(logits, dim=-1)
        if s.repetition_penalty != 1.0:  # transformers' gather / rescale / scatter over the seen ids
            seen = torch.where(self.arange_t < self.cur_len, self.running_sequences.view(self.R, self.T), self.start)
            score = torch.gather(log_probs, 1, seen)
            r = s.repetition_penalty
            log_probs.scatter_(1, seen, torch.where(score < 0, score * r, score / r))
        if s.min_length > 1 or s.min_new_tokens > 0:
            log_probs[:, self.eos].masked_fill_(self.eos_banned.index_select(0, self.cur_len), float("-inf"))
        return log_probs

    def step(self) -> None:
        """One decoding step of every beam, in place (static shapes, no host sync)."""
        B, K, T, V, c = self.B, self.K, self.T, self.V, self.cur_len
        log_probs = self.scores(self.logits()).view(B, K, V).add_(self.running_scores.unsqueeze(2))
        top_scores, top_idx = torch.topk(log_probs.view(B, K * V), k=2 * K)
        top_beam, top_token = top_idx // V, top_idx % V
        top_seq = torch.gather(self.running_sequences, 1, top_beam.unsqueeze(2).expand(B, 2 * K, T))
        top_seq.scatter_(2, self.new_token_at, top_token.unsqueeze(2))
        hits = (top_token == self.eos).logical_or_(c >= T - 1)
        # Running beams of the next step: the best K that did not just finish.
        run_scores = torch.add(top_scores, hits, alpha=-1.0e9)
        keep = torch.topk(run_scores, k=K)[1]
        torch.gather(top_seq, 1, keep.unsqueeze(2).expand(B, K, T), out=self.running_sequences)
        torch.gather(run_scores, 1, keep, out=self.running_scores)
        beam_idx = torch.gather(top_beam, 1, keep).add_(self.batch_offset).view(-1)
        # Finished hypotheses: merge the ones of the top K that just finished, keep the best K.
        denom = self.denoms.index_select(0, c)
        just_finished = hits & self.top_mask
        cand = torch.add(top_scores / denom, self.closed, alpha=-1.0e9)
        cand = torch.add(cand, ~just_finished, alpha=-1.0e9)
        merged_scores = torch.cat((self.beam_scores, cand), dim=1)
        best = torch.topk(merged_scores, k=K)[1]
        merged_sequences = torch.cat((self.sequences, top_seq), dim=1)
        torch.gather(merged_sequences, 1, best.unsqueeze(2).expand(B, K, T), out=self.sequences)
        torch.gather(torch.cat((self.finished, just_finished), dim=1), 1, best, out=self.finished)
        torch.gather(merged_scores, 1, best, out=self.beam_scores)
        # Early-stop heuristic (early_stopping=False): can the best running beam still beat the worst finished?
        worst = torch.where(self.finished, self.beam_scores.amin(dim=1, keepdim=True), -1.0e9)
        no_gain = (self.running_scores[:, :1] / denom <= worst).all(dim=-1, keepdim=True)
        self.closed.logical_or_(no_gain)
        torch.logical_or(self.closed.all(), hits.all(), out=self.done)
        # Reorder the cache along the beams, in place (same addresses for every step).
        self.kv.copy_(self.kv.index_select(2, beam_idx))
        self.cur_len.add_(1)
        self.position.add_(1)

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
        return [self.kv, self.cur_len, self.position, self.running_sequences, self.running_scores, self.sequences,
                self.beam_scores, self.finished, self.closed, self.done]

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
        hypothesis of each, cut to the longest best hypothesis of the batch. A hypothesis ends at its first EOS
        after the start token, or at the last position (the rest is filled with EOS)."""
        best = self.sequences[:, 0]
        ended = best[:, 1:] == self.eos
        ends = torch.where(ended.any(dim=1), ended.int().argmax(dim=1) + 1, self.T - 1)
        length = int(ends.max()) + 1
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
