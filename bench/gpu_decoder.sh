#!/usr/bin/env bash
# The caption decoders on a GPU, one prepared run (from the repo root; results in $OUT or /tmp/out):
#   1. tiny T5, fp32, CUDA: fast search replayed from its CUDA graph == the same search run eagerly
#      (bitwise), and == transformers' generate (same tokens; scores within 1e-5);
#   2. bench_model.py --preset official --random-weights --decoders-only: FlanT5-XL sizes in bf16,
#      caption ms/region and regions/s for "hf" and "fast" at 1, 8 and 64 regions, share of equal captions.
# Needs imagehash like bench/gpu_checks.sh (wheels in .whl/).
set -o pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 PYTHONPATH=$PWD
OUTDIR=${OUT:-/tmp/out}
PY=${PY:-python3}
mkdir -p "$OUTDIR"
if ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:$PYTHONPATH
fi
echo "== 1. graph == eager == generate (tiny, fp32, cuda)"
timeout 180 $PY - <<'PYEOF' 2>&1 | tee "$OUTDIR/decoder_checks.txt"
import torch
from dynrefer_core.config import DynReferConfig
from dynrefer_core.modeling.decoding import BeamSearch, BeamSettings, beam_search
from dynrefer_core.modeling.language import LanguageDecoder

torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False
torch.manual_seed(0)
t5 = LanguageDecoder(DynReferConfig.tiny()).eval().t5.cuda()
with torch.no_grad():
    t5.lm_head.weight.mul_(2.0)
    t5.lm_head.weight[1] *= 1.4
for setting in [dict(num_beams=2, max_new_tokens=20, min_length=1, length_penalty=0.0, repetition_penalty=1.5),
                dict(num_beams=5, max_new_tokens=30, min_length=1, length_penalty=0.0, repetition_penalty=1.5)]:
    s = BeamSettings.resolve(setting)
    for n in (1, 3, 64):
        g = torch.Generator().manual_seed(n)
        x = torch.randn(n, 14, 32, generator=g).cuda()
        mask = torch.ones(n, 14, dtype=torch.long, device="cuda"); mask[::2, 9:] = 0
        with torch.no_grad():
            hidden = t5.encoder(inputs_embeds=x, attention_mask=mask).last_hidden_state
        out = {}
        for graph in (False, True):
            search = BeamSearch(t5, s, n, 14, use_graph=graph)
            for _ in range(2):  # the second load replays the graph captured by the first run
                search.load(hidden, mask); search.run()
            out[graph] = search.result(n)
        ref = t5.generate(inputs_embeds=x, attention_mask=mask, do_sample=False, output_scores=True,
                          return_dict_in_generate=True, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
                          **setting)
        fast = beam_search(t5, x, mask, s, cache={}, enc_len=48)  # padded bucket + encoder, graph
        print(setting["num_beams"], n, "graph==eager:", torch.equal(out[True][0], out[False][0])
              and torch.equal(out[True][1], out[False][1]),
              "eager==generate:", torch.equal(out[False][0], ref.sequences),
              "padded graph==generate:", torch.equal(fast[0], ref.sequences),
              "max |score diff|:", (fast[1] - ref.sequences_scores).abs().max().item())
print("DECODER CHECKS DONE")
PYEOF
echo "== 2. official sizes, random weights, bf16: hf vs fast"
timeout 400 $PY bench/bench_model.py --preset official --random-weights --decoders-only --sizes 1,8,64 --repeats 3 \
  2>&1 | grep -v "min_new_tokens" | tee "$OUTDIR/bench_decoders_official.md"
