#!/usr/bin/env bash
# distributed.strategy on GPUs (docs/multi-gpu.md): ddp and fsdp QLoRA (4-bit, NCCL) on N GPUs of one machine,
# the per-rank memory each really used next to what `ftk plan --device cuda --nproc N` predicted, the fsdp
# adapter against the ddp one, and the fsdp checkpoint resumed on N/2 processes. Nothing to edit; prints one
# table. `--cpu` runs the same on CPU processes (gloo) with the tiny model, to check the script itself.
#
#   bench/multi_gpu.sh [--model DIR] [--nproc N] [--steps S] [--batch B] [--cpu]
#
# DIR: a local LLaMA-family checkpoint (default: ../shared/models/stories260K; a 7B or larger one makes the
# memory figures meaningful). N: processes (default: every GPU nvidia-smi lists). S: optimizer steps
# (default 6, a checkpoint at S/2). B: per-process batch. Output under $OUT (default: a new temporary folder).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
MODEL=$(cd .. && pwd)/shared/models/stories260K
NPROC=""
STEPS=6
BATCH=2
CPU=0
while [ $# -gt 0 ]; do
  case "$1" in
    --model) MODEL=$(cd "$2" && pwd); shift 2 ;;
    --nproc) NPROC=$2; shift 2 ;;
    --steps) STEPS=$2; shift 2 ;;
    --batch) BATCH=$2; shift 2 ;;
    --cpu) CPU=1; shift ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
$PY -c "import ftk" 2>/dev/null || $PY -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | grep -v -i warning || true
if [ "$CPU" = 1 ]; then
  DEVICE=cpu; NPROC=${NPROC:-2}; export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
else
  DEVICE=cuda
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  NPROC=${NPROC:-$(nvidia-smi -L | wc -l)}
fi
OUT=${OUT:-$(mktemp -d)}/multi_gpu
rm -rf "$OUT" && mkdir -p "$OUT"
echo "output: $OUT; $NPROC $DEVICE process(es); model $MODEL"
[ "$NPROC" -ge 2 ] || echo "note: one process: fsdp has nothing to shard; only its single-process path (DCP checkpoints, packed storage) runs"

# recipes: the same run under each strategy; the resumption keeps the global batch on half the processes
$PY - "$OUT" "$MODEL" "$STEPS" "$BATCH" "$NPROC" "$(cd .. && pwd)/shared/data/alpaca/alpaca_sample.json" <<'EOF'
import json, sys
out, model, steps, batch, nproc, alpaca = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), sys.argv[6]
half = max(1, nproc // 2)
for name, strategy, bs in (("ddp", "ddp", batch), ("fsdp", "fsdp", batch), ("fsdp_resume", "fsdp", batch * nproc // half)):
    r = {"model": {"name": model, "quantization": {"method": "nf4"}},
         "adapter": {"method": "lora", "r": 16, "dropout": 0.0},
         "data": {"datasets": [{"loader": "alpaca", "path": alpaca, "max_examples": 400}], "max_length": 512,
                  "validation_size": 8, "cache": False},
         "training": {"max_steps": steps, "batch_size": bs, "gradient_accumulation_steps": 1, "optimizer": "adamw_torch",
                      "learning_rate": 1e-4, "save_steps": max(1, steps // 2), "report_to": ["none"]},
         "evaluation": {"metrics": ["perplexity"], "compare_base": False},
         "distributed": {"strategy": strategy},
         "output_dir": f"{out}/{'fsdp_resume' if name == 'fsdp_resume' else name}"}
    json.dump(r, open(f"{out}/{name}.json", "w"), indent=1)
EOF

# each rank records its peak memory: after loading (before training) and during training
cat > "$OUT/measure.py" <<'EOF'
import json, os, sys, time
import torch, transformers
orig = transformers.Trainer.train
def train(self, *a, **k):
    rank, cuda = int(os.environ.get("RANK", "0")), torch.cuda.is_available()
    rec = {"rank": rank}
    if cuda:
        rec["load_peak"] = torch.cuda.max_memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    t = time.time()
    try:
        return orig(self, *a, **k)
    finally:
        rec["train_s"] = round(time.time() - t, 3)
        if cuda:
            rec["train_peak"] = torch.cuda.max_memory_allocated()
        else:
            import resource
            rec["max_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        d = self.args.output_dir.rsplit("/checkpoints", 1)[0]
        with open(f"{d}/mem_rank{rank}.json", "w") as f:
            json.dump(rec, f)
transformers.Trainer.train = train
from ftk.cli import main
main(sys.argv[1:])
EOF

run() {  # NAME NPROC [ftk args...]
  local name=$1 n=$2; shift 2
  echo "== $name on $n process(es)"
  $PY -m torch.distributed.run --standalone --nproc_per_node "$n" "$OUT/measure.py" run "$OUT/$name.json" "$@" \
    > "$OUT/$name.log" 2>&1 || { tail -30 "$OUT/$name.log"; echo "FAILED: $name (log $OUT/$name.log)"; exit 1; }
  grep -o "distributed: .*" "$OUT/$name.log" | head -1 || true
}
for s in ddp fsdp; do
  $PY -m ftk plan "$OUT/$s.json" --no-data --device "$DEVICE" --nproc "$NPROC" --json > "$OUT/plan_$s.json"
done
run ddp "$NPROC"
run fsdp "$NPROC"
# resume the fsdp run's middle checkpoint on half the processes (same global batch)
mkdir -p "$OUT/fsdp_resume/checkpoints"
mid=$(ls -d "$OUT"/fsdp/checkpoints/checkpoint-* | sort -t- -k2 -n | head -1)
cp -r "$mid" "$OUT/fsdp_resume/checkpoints/"
run fsdp_resume "$(( NPROC / 2 > 0 ? NPROC / 2 : 1 ))" --resume

$PY - "$OUT" <<'EOF'
import glob, json, sys
from safetensors.torch import load_file
out = sys.argv[1]
mib = lambda b: f"{b / 2**20:,.1f}" if b is not None else "-"
def adapter(run):
    return load_file(f"{out}/{run}/adapter/adapter_model.safetensors")
ref = adapter("ddp")
print(f"\n{'run':<12} {'ran':<12} {'procs':>5} {'params MiB/rank':>16} {'load peak':>10} {'train peak':>11} "
      f"{'planned':>9} {'steps/s':>8} {'max |adapter - ddp|':>20}")
for run in ("ddp", "fsdp", "fsdp_resume"):
    m = json.load(open(f"{out}/{run}/metrics.json"))["train"]
    d = m["distributed"]
    mem = [json.load(open(f)) for f in sorted(glob.glob(f"{out}/{run}/mem_rank*.json"))]
    peak = max((x.get("train_peak") or x.get("max_rss") or 0) for x in mem)
    load = max((x.get("load_peak") or 0) for x in mem) or None
    plan = json.load(open(f"{out}/plan_{run.split('_')[0]}.json"))["bytes"]["total"] if run != "fsdp_resume" else None
    a = adapter(run)
    diff = max((a[k] - ref[k]).abs().max().item() for k in ref)
    steps = m["steps"] - (int(m["resumed_from"].rsplit("-", 1)[1]) if m.get("resumed_from") else 0)
    params = max(r["parameters"] for r in d["parameter_bytes_per_rank"])
    print(f"{run:<12} {d['ran']:<12} {d['processes']:>5} {mib(params):>16} {mib(load):>10} {mib(peak):>11} "
          f"{mib(plan):>9} {steps / m['runtime_s']:>8.2f} {diff:>20.3g}")
print("(peak: torch.cuda.max_memory_allocated per rank, the largest rank; on --cpu the train peak is the max RSS; "
      "planned: `ftk plan --device ... --nproc ...` total per process)")
EOF
