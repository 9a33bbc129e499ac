#!/usr/bin/env bash
# Reproduce the paper's Tables II-VI, top to bottom: pre-training -> linear evaluation (IV) ->
# fine-tuning (V) -> C2F / F2C distillation (V) -> SED (VI) -> ablations (II, III) -> tables.
# ASiT is pre-trained beside ATST-Clip and ATST-Frame and fills its rows of Tables IV-VI.
#
#   bash run_all.sh                                       # demo data, tiny models, CPU, < 30 min
#   DATA_ROOT=/data PRESET=base NPROC=8 bash run_all.sh   # the paper's protocol, real datasets
#
# Every stage skips work whose result already exists, so a rerun after a crash continues where
# it stopped (pre-training also resumes inside a run from its last checkpoint). Results land in
# $OUT (one JSON per run); tables.py turns them into $OUT/tables.md and PNG plots.
set -euo pipefail
cd "$(dirname "$0")"

DATA_ROOT=${DATA_ROOT:-}    # root of the named datasets (README 'Data layout'); '' = demo data
PRESET=${PRESET:-}          # model size of the main runs; '' = tiny (demo) / base (real data)
NPROC=${NPROC:-1}           # processes per run (GPUs); > 1 launches through torchrun
OUT=${OUT:-results}         # result JSONs, run folders, tables.md, plots

if [ -z "$DATA_ROOT" ]; then
  # demo scale: every run CPU-sized; ablations at the same budget as the main runs
  PRESET=${PRESET:-tiny}; ABL_PRESET=$PRESET
  export ATST_DATA=${ATST_DATA:-data}
  PRE_DATA=demo; ABL_DATA=demo
  STEPS=${STEPS:-48}        # pre-training steps of every run (batch 32 x 48 = 6 epochs)
  PRE_ARGS="--max_steps $STEPS --warmup_epochs 1 --ckpt_every 16 --log_every 4"
  LINEAR_TASKS="demo_events demo_tags"; ABL_TASKS="demo_events"
  FT_TASKS="demo_events"; SED_DATA=demo_sed
  SED_FT_ARGS="--epochs 10"  # fine-tune-mode SED: half the demo's 20 epochs (CPU time)
  python demo.py --data_root "$ATST_DATA" >/dev/null
else
  # the paper: base models on AudioSet-1.9M; Tables II-III ablations are small on AS-200K
  PRESET=${PRESET:-base}; ABL_PRESET=small
  export ATST_DATA=$DATA_ROOT
  PRE_DATA=as1.9m; ABL_DATA=as200k
  PRE_ARGS=""
  LINEAR_TASKS="us8k spcv2 vox1 nsynth fsd50k as20k"; ABL_TASKS="as20k spcv2 vox1 nsynth us8k"
  FT_TASKS="as2m as20k spcv2 vox1 fsd50k"; SED_DATA=dcase2022
  SED_FT_ARGS=""
fi
mkdir -p "$OUT"

run() {  # one process per device, or torchrun
  if [ "$NPROC" -gt 1 ]; then torchrun --standalone --nproc_per_node="$NPROC" "$@"
  else python "$@"; fi
}
pretrained() {  # the run's final checkpoint exists (its summary says step == total)
  python -c "import json,sys; s=json.load(open(sys.argv[1])); sys.exit(s['step'] != s['total'])" \
    "$1/ckpt.pt.json" 2>/dev/null
}
pretrain() {  # pretrain NAME SCRIPT PRESET DATA [FLAGS...]
  local name=$1 script=$2 preset=$3 data=$4; shift 4
  pretrained "$OUT/pretrain/$name" && return
  echo "== pre-train $name"
  run "$script" --preset "$preset" --data "$data" --out_dir "$OUT/pretrain/$name" $PRE_ARGS "$@"
}
same() {  # the ablation row equal to a main run (same preset and data): reuse, don't repeat
  [ "$ABL_PRESET" = "$PRESET" ] && [ "$ABL_DATA" = "$PRE_DATA" ] && [ ! -e "$OUT/pretrain/$1" ] &&
    ln -s "$2" "$OUT/pretrain/$1" || true
}
linear() {  # linear NAME TASK [FLAGS...]: Table II-IV cells
  local name=$1 task=$2 json=$OUT/linear/$1_$2.json; shift 2
  [ -f "$json" ] && return
  local extra=""; [ "$task" = us8k ] && extra="--folds 10"
  case $name in *_1s) extra="$extra --chunk_seconds 1";; esac  # Table II: 1 s chunks downstream
  local ckpt=$OUT/pretrain/${name%_random}/ckpt.pt
  run linear_eval.py --ckpt "$ckpt" --data "$task" $extra --out "$json" \
    --cache_dir "$OUT/cache" "$@"
}
finetune() {  # finetune NAME SCRIPT TASK CKPT [FLAGS...]: Table V cells
  local name=$1 script=$2 task=$3 ckpt=$4; shift 4
  [ -f "$OUT/finetune/${name}_$task/result.json" ] && return
  run "$script" --ckpt "$ckpt" --data "$task" --out_dir "$OUT/finetune/${name}_$task" "$@"
}
sed_run() {  # sed_run NAME CKPT MODE [FLAGS...]: Table VI cells
  local name=$1 ckpt=$2 mode=$3; shift 3
  [ -f "$OUT/sed/$name/result.json" ] && return
  run sed.py --ckpt "$ckpt" --data "$SED_DATA" --mode "$mode" --out_dir "$OUT/sed/$name" "$@"
}

# ---- 1. pre-training: ATST-Clip (two 6 s segments) and ATST-Frame (config D) -------------
pretrain clip pretrain_clip.py "$PRESET" "$PRE_DATA"
pretrain frame pretrain_frame.py "$PRESET" "$PRE_DATA"
pretrain asit pretrain_asit.py "$PRESET" "$PRE_DATA"           # ASiT (SPEC_ASIT), same budget

# ---- 2. linear evaluation (Table IV), and the same encoders with random weights -----------
for task in $LINEAR_TASKS; do
  for name in clip frame asit; do
    linear $name "$task"
    linear ${name}_random "$task" --random_init true
  done
done

# ---- 3. fine-tuning (Table V), then 4. C2F / F2C distillation (Table V) -----------------
for task in $FT_TASKS; do
  finetune clip finetune.py "$task" "$OUT/pretrain/clip/ckpt.pt"
  finetune frame finetune.py "$task" "$OUT/pretrain/frame/ckpt.pt"
  finetune c2f distill.py "$task" "$OUT/pretrain/frame/ckpt.pt" \
    --teacher "$OUT/finetune/clip_$task/best.pt"
  finetune f2c distill.py "$task" "$OUT/pretrain/clip/ckpt.pt" \
    --teacher "$OUT/finetune/frame_$task/best.pt"
  finetune asit finetune.py "$task" "$OUT/pretrain/asit/ckpt.pt"   # our protocol (SPEC_ASIT 7)
done

# ---- 5. sound event detection (Table VI): linear, fine-tune, C2F, F2C --------------------
for kind in clip frame asit; do
  sed_run ${kind}_linear "$OUT/pretrain/$kind/ckpt.pt" linear
  sed_run ${kind}_finetune "$OUT/pretrain/$kind/ckpt.pt" finetune $SED_FT_ARGS
done
sed_run c2f "$OUT/pretrain/frame/ckpt.pt" finetune $SED_FT_ARGS \
  --teacher "$OUT/sed/clip_finetune/best.pt"
sed_run f2c "$OUT/pretrain/clip/ckpt.pt" finetune $SED_FT_ARGS \
  --teacher "$OUT/sed/frame_finetune/best.pt"

# ---- 6. ablations (Tables II, III) at the ablation scale ------------------------------------
# Table II, ATST-Clip views: one or two segments of 1 s or 6 s
same clip_two_6s clip
for seg in single two; do
  for sec in 1 6; do
    pretrain clip_${seg}_${sec}s pretrain_clip.py "$ABL_PRESET" "$ABL_DATA" \
      --segments $seg --crop_sec $sec
  done
done
# Table III, ATST-Frame: A no augmentation, B random masking, C masked teacher, D the method,
# E both views augmented
pretrain frame_A pretrain_frame.py "$ABL_PRESET" "$ABL_DATA" --aug_views 0
pretrain frame_B pretrain_frame.py "$ABL_PRESET" "$ABL_DATA" --mask_mode random
pretrain frame_C pretrain_frame.py "$ABL_PRESET" "$ABL_DATA" --mask_teacher true
same frame_D frame
pretrain frame_D pretrain_frame.py "$ABL_PRESET" "$ABL_DATA"
pretrain frame_E pretrain_frame.py "$ABL_PRESET" "$ABL_DATA" --aug_views 2
for task in $ABL_TASKS; do
  for name in clip_single_1s clip_two_1s clip_single_6s clip_two_6s \
              frame_A frame_B frame_C frame_D frame_E; do
    linear $name "$task"
  done
done

# ---- 7. tables and plots -----------------------------------------------------------------
python tables.py --out "$OUT"
