#!/usr/bin/env bash
# The model's GPU checks as one prepared script (run from the repo root on the GPU machine):
#   1. tiny model on CUDA in bf16: alignment module vs torchvision.ops.deform_conv2d, forward + backward,
#      describe(), save_pretrained/from_pretrained;
#   2. bench_model.py --preset tiny on CUDA;  3. bench_model.py --preset official --random-weights (bf16).
# The GPU image lacks imagehash (used by dynrefer_core.views): put its wheels in .whl/ (see the report).
# Results go to $OUT (or /tmp/out). DEVICE=cpu runs step 1 on the CPU (to test this script itself).
set -o pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1
OUTDIR=${OUT:-/tmp/out}
DEVICE=${DEVICE:-cuda}
PY=${PY:-python3}
mkdir -p "$OUTDIR"
if ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUTDIR/gpu.txt"
$PY -c "import torch, torchvision, transformers; print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'transformers', transformers.__version__)" | tee -a "$OUTDIR/gpu.txt"

echo "== 1. tiny model checks on $DEVICE"
DEVICE=$DEVICE timeout 240 $PY - <<'EOF' 2>&1 | tee "$OUTDIR/checks.txt"
import os, tempfile, time
import torch
from torchvision.ops import deform_conv2d
from dynrefer_core.config import DynReferConfig
from dynrefer_core.modeling.alignment import AlignmentModule
from dynrefer_core.modeling.dynrefer import DynRefer

device = torch.device(os.environ["DEVICE"])
torch.manual_seed(0)
# Alignment vs deform_conv2d (same construction as tests/test_model_alignment.py), fp32 and bf16 autocast.
b, c, g, h, w = 4, 64, 4, 16, 16
m = AlignmentModule(c, g).to(device)
torch.nn.init.normal_(m.offset_mask.weight, std=0.3); torch.nn.init.normal_(m.offset_mask.bias, std=0.3)
x, r = torch.randn(b, c, h, w, device=device), torch.randn(b, c, h, w, device=device)
with torch.no_grad():
    ours = m(x, r)
    value = m.value_proj(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
    off, mod = m.offsets_and_modulation(x, r)
    order = [j * 3 + i for i in range(3) for j in range(3)]
    tv_off = torch.zeros(b, g, 9, 2, h, w, device=device); tv_mask = torch.zeros(b, g, 9, h, w, device=device)
    for k in range(9):
        tv_off[:, :, order[k], 0] = off[..., k, 1].permute(0, 3, 1, 2)
        tv_off[:, :, order[k], 1] = off[..., k, 0].permute(0, 3, 1, 2)
        tv_mask[:, :, order[k]] = mod[..., k].permute(0, 3, 1, 2)
    ref = deform_conv2d(value, tv_off.reshape(b, g * 18, h, w), torch.ones(c, 1, 3, 3, device=device), padding=1,
                        mask=tv_mask.reshape(b, g * 9, h, w))
    ref = m.output_proj(ref.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
    print("alignment vs deform_conv2d, fp32 max abs diff:", (ours - ref).abs().max().item())
    if device.type == "cuda":
        with torch.autocast("cuda", dtype=torch.bfloat16):
            ours16 = m(x, r)
        print("alignment bf16 autocast vs fp32 reference, max abs diff:", (ours16.float() - ref).abs().max().item(),
              "(output scale", ref.abs().max().item(), ")")

model = DynRefer(DynReferConfig.tiny()).place(device)
print("tiny placed on", model.device, "compute dtype", model.compute_dtype)
s = model.config.image_size
pv = torch.randn(4, 3, 3, s, s)
boxes = torch.tensor([[0.0, 0, s, s], [20, 25, 80, 90], [30, 12, 62, 60]]).expand(4, 3, 4)
tags = torch.zeros(4, len(model.vocabulary.tags)); tags[:, :3] = 1
opt = torch.optim.AdamW(model.trainable_parameters(), lr=2e-3)
model.train()
for step in range(5):
    out = model(pv, boxes, ["a man", "a red car", "a dog", "a tree"], tags, controls=["man|", "|", "dog|", "|"])
    opt.zero_grad(); out.loss.backward(); opt.step()
    print("step", step, {k: round(v.item(), 4) for k, v in out.losses.items()})
from matplotlib import cbook
photo = cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)
res = model.describe(photo, [(120, 60, 400, 330), (0, 0, 512, 600)], phrases=["a flag"])
print("describe:", res[0].to_dict()["caption"], res[0].caption_score, res[0].similarity, res[0].timings)
with tempfile.TemporaryDirectory() as tmp:
    model.save_pretrained(tmp)
    again = DynRefer.from_pretrained(tmp, device=device)
    with torch.inference_mode(), again.autocast():
        z1 = model.eval().encode_regions(pv, boxes); z2 = again.encode_regions(pv, boxes)
    print("from_pretrained on", again.device, "max |z1 - z2|:", (z1.float() - z2.float()).abs().max().item())
print("CHECKS DONE")
EOF
[ "$DEVICE" = cuda ] || exit 0

echo "== 2. bench, tiny preset on CUDA"
timeout 150 $PY bench/bench_model.py --preset tiny --device cuda --sizes 1,8,64 2>&1 | tee "$OUTDIR/bench_tiny_cuda.md"
echo "== 3. bench, official preset, random weights, bf16"
timeout 420 $PY bench/bench_model.py --preset official --random-weights --sizes 1,8,64 --repeats 3 2>&1 \
  | tee "$OUTDIR/bench_official.md"
