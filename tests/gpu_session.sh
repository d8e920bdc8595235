#!/usr/bin/env bash
# Every GPU check the open issues wait for, prepared for one lease of a GPU machine (15 minutes on an H100/H200,
# start-up included; at most 10 minutes a command). Run from the repository root on the GPU machine:
#
#   bash tests/gpu_session.sh            # all three steps, about 10 minutes (the limits below add up to 570 s, under
#                                          a 600 s command limit with the version check)
#   bash tests/gpu_session.sh checks     # crop kernels + acceptance: issue 16
#   bash tests/gpu_session.sh bench      # Qwen2.5-VL-7B shapes, ours vs transformers: issue 13's GPU rows
#
# Steps, each under a time limit and logged to OUT/<step>.txt (OUT: the device tool's $OUT, else ./gpu-session):
#   crop        python crop_kernels.py --check      the Triton kernels bit for bit against the reference, their table
#   acceptance  python tests/gpu_acceptance.py      model / cache / zoom loop / 7B memory / SFT / GRPO on CUDA
#   bench7b     python bench.py model --preset 7b   every row of issue 13's table (rows print as they are measured),
#                                                    against transformers' default generate (its compiled static-cache
#                                                    rows, --no_hf_static here, would take minutes to compile; the
#                                                    issue's table has its H200 numbers)
# OUT/summary.txt has one line per step (exit status, seconds); OUT/env.txt names the card and the versions.
set -u -o pipefail
out=${OUT:-gpu-session}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
what=${1:-all}

{ date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda,
'triton', triton.__version__, 'transformers', transformers.__version__)"; } 2>&1 | tee "$out/env.txt"

step() {   # step NAME SECONDS COMMAND...
    local name=$1 limit=$2 t0=$SECONDS
    shift 2
    timeout -k 15 "$limit" "$@" 2>&1 | tee "$out/$name.txt"   # KILL 15 s after a TERM not obeyed
    echo "== $name: exit ${PIPESTATUS[0]} after $((SECONDS - t0)) s (limit $limit s; 124 = cut at the limit)" \
        | tee -a "$out/summary.txt"
}

if [[ $what == all || $what == checks ]]; then
    step crop 75 python3 crop_kernels.py --check
    step acceptance 285 python3 tests/gpu_acceptance.py --only model,cof,memory7b,sft,grpo   # crop: the step above
fi
if [[ $what == all || $what == bench ]]; then
    step bench7b 210 python3 bench.py model --preset 7b --no_crop --reps 3 --new_tokens 32 --no_hf_static
fi
cat "$out/summary.txt"
