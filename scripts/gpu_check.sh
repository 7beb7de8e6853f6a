#!/usr/bin/env bash
# The checks a session with a CUDA GPU runs (docs/BENCHMARKS.md, "GPU"): the training and
# Mini-Gemini / MoE tests on the GPU (accelerate picks it up), a tiny bf16 training run under
# accelerate's FSDP (FSDP2, one process per GPU), then the tiny run resumed and its loss checked to
# fall; the same under DeepSpeed ZeRO-2 where deepspeed is installed.
#
#   scripts/gpu_check.sh [OUT]        # from the repo root; python3 with minigem's deps
#
# Each step prints PASS/FAIL; logs go to OUT (default gpu-check/).
set -uo pipefail
out=${1:-gpu-check}
mkdir -p "$out"
py=${PYTHON:-python3}
ngpu=$($py -c "import torch; print(torch.cuda.device_count())")
[ "$ngpu" -gt 0 ] || { echo "no CUDA GPU: nothing to check"; exit 2; }

step() {  # name, command...
  local name=$1; shift
  if "$@" >"$out/$name.log" 2>&1; then echo "PASS $name"; else echo "FAIL $name (rc $?)"; tail -20 "$out/$name.log"; fi
}

step pytest-gpu $py -m pytest -q -p no:cacheprovider tests/test_training.py \
  tests/test_mgm_components.py tests/test_moe.py tests/test_padfree.py tests/test_fsdp.py

$py - "$out/fsdp" <<'EOF'
import sys
from pathlib import Path

sys.path.insert(0, "tests")
from conftest import tiny_recipe  # noqa: E402

stage = {"name": "instruct", "train": ["connector", "llm"],
         "data": {"synth": {"n": 512, "seed": 3, "image_size": 96}},
         "lr": 1e-3, "batch_size": 8, "steps": 20}
Path(sys.argv[1]).mkdir(parents=True, exist_ok=True)
tiny_recipe(Path(sys.argv[1]), [stage], bf16="on", save_every=10)
EOF
step fsdp-train $py -m accelerate.commands.launch --num_processes "$ngpu" --use_fsdp --fsdp_version 2 \
  --mixed_precision bf16 -m minigem.cli train "$out/fsdp/recipe.yaml" --stop-after 10
step fsdp-resume $py -m accelerate.commands.launch --num_processes "$ngpu" --use_fsdp --fsdp_version 2 \
  --mixed_precision bf16 -m minigem.cli train "$out/fsdp/recipe.yaml" --resume
# the loss must fall: FSDP2 once ran end to end with the optimizer stepping no gradients
falls() {  # RUN_DIR: the first and last logged losses of its metrics.jsonl
  $py - "$1/metrics.jsonl" <<'EOF'
import json, sys
losses = [json.loads(line)["loss"] for line in open(sys.argv[1])]
print(f"loss {losses[0]:.4f} -> {losses[-1]:.4f} over {len(losses)} steps")
sys.exit(0 if losses[-1] < losses[0] - 0.2 else 1)
EOF
}
step fsdp-loss-falls falls "$out/fsdp/run"
step synth-test $py -m minigem.cli data synth --out "$out/fsdp/test" --n 16 --seed 1 --image-size 96
step fsdp-eval $py -m minigem.cli eval --model "$out/fsdp/run/final" --data "$out/fsdp/test/data.json" \
  --image-folder "$out/fsdp/test" --limit 16 --json

# DeepSpeed ZeRO-2 (bf16) on the same tiny recipe, where deepspeed is installed
if $py -c "import deepspeed" 2>/dev/null; then
  mkdir -p "$out/ds" && sed "s#$out/fsdp/run#$out/ds/run#" "$out/fsdp/recipe.yaml" >"$out/ds/recipe.yaml"
  ds=($py -m accelerate.commands.launch --num_processes "$ngpu" --use_deepspeed --zero_stage 2
      --mixed_precision bf16 -m minigem.cli train "$out/ds/recipe.yaml")
  step ds-train "${ds[@]}" --stop-after 10
  step ds-resume "${ds[@]}" --resume
  step ds-loss-falls falls "$out/ds/run"
  step ds-eval $py -m minigem.cli eval --model "$out/ds/run/final" --data "$out/fsdp/test/data.json" \
    --image-folder "$out/fsdp/test" --limit 16 --json
else
  echo "SKIP deepspeed (not installed)"
fi
