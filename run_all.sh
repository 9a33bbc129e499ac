#!/usr/bin/env bash
# Reproduce the paper's Tables II-VI, top to bottom: pre-training -> linear evaluation (IV) ->
# fine-tuning (V) -> C2F / F2C distillation (V) -> SED (VI) -> ablations (II, III) -> tables.
# ASiT is pre-trained beside ATST-Clip and ATST-Frame and fills its rows of Tables IV-VI.
#
#   bash run_all.sh                                       # demo data, tiny models, CPU, < 30 min
#   DATA_ROOT=/data PRESET=base NPROC=8 bash run_all.sh   # the paper's protocol, real datasets
#   DATA_ROOT=/data PRESET=tiny STEPS=4 EPOCHS=1 LINEAR_EPOCHS=10 BATCH=8 bash run_all.sh
#                                 # the same protocol in miniature: every stage, minutes
#   sbatch --nodes=2 slurm.sh run_all.sh   # several nodes: every node runs this script, each
#                                 # run is one torchrun job over all of them (NNODES, RDZV)
#
# The datasets come from prepare.py (README "Reproduce the tables"). Every stage skips work
# whose result already exists, so a rerun after a crash continues where it stopped
# (pre-training also resumes inside a run from its last checkpoint). Results land in $OUT (one
# JSON per run); tables.py turns them into $OUT/tables.md and PNG plots.
set -euo pipefail
cd "$(dirname "$0")"

DATA_ROOT=${DATA_ROOT:-}    # root of the named datasets (prepare.py --out); '' = demo data
PRESET=${PRESET:-}          # model size of the main runs; '' = tiny (demo) / base (real data)
NPROC=${NPROC:-1}           # processes per run and node (GPUs); > 1 launches through torchrun
NNODES=${NNODES:-1}         # nodes; > 1: start this script on every node with the same RDZV
RDZV=${RDZV:-}              # host:port of the first node, where the nodes meet (run n: port + n)
RDZV_ID=${RDZV_ID:-}        # the job's name for every run's rendezvous, new for a new job (the
                            # out_dir lock knows a job by it); slurm.sh: the SLURM job id
NODE_RANK=${NODE_RANK:-${SLURM_NODEID:-0}}  # this node's place: node 0 also writes the tables
OUT=${OUT:-results}         # result JSONs, run folders, tables.md, plots
# knobs honoured by every stage ('' = the protocol's own values)
STEPS=${STEPS:-}            # pre-training steps of every run (demo: 48)
EPOCHS=${EPOCHS:-}          # fine-tuning, distillation and SED epochs
LINEAR_EPOCHS=${LINEAR_EPOCHS:-}  # linear-evaluation head epochs
BATCH=${BATCH:-}            # global batch of every stage (SED: strong and weak clips each)
DTYPE=${DTYPE:-}            # auto (bf16 on CUDA, fp32 on CPU) | bf16 (on the CPU too) | fp32
WORKERS=${WORKERS:-}        # DataLoader workers per process of every stage
JOBS=${JOBS:-1}             # cells run side by side (a CPU machine: each gets cores/JOBS threads;
                            # on GPUs keep 1 and use NPROC: jobs would share the devices)

if [ "$NNODES" -gt 1 ] && { [[ ! "$RDZV" =~ ^[^:]+:[0-9]+$ ]] || [ -z "$RDZV_ID" ] ||
                            [ "$JOBS" -gt 1 ]; }; then
  echo "run_all.sh: NNODES=$NNODES needs RDZV=host:port (the first node), RDZV_ID (a name" \
    "for this job) and JOBS=1" >&2; exit 2
fi

if [ -z "$DATA_ROOT" ]; then
  # demo scale: every run CPU-sized; ablations at the same budget as the main runs
  PRESET=${PRESET:-tiny}; ABL_PRESET=$PRESET
  export ATST_DATA=${ATST_DATA:-data}
  PRE_DATA=demo; ABL_DATA=demo
  STEPS=${STEPS:-48}        # batch 32 x 48 steps = 6 epochs of the demo corpus
  PRE_ARGS="--warmup_epochs 1 --ckpt_every 16 --log_every 4"
  LINEAR_TASKS="demo_events demo_tags"; ABL_TASKS="demo_events"
  FT_TASKS="demo_events"; SED_DATA=demo_sed
  SED_FT_ARGS="--epochs 10"  # fine-tune-mode SED: half the demo's 20 epochs (CPU time)
  python demo.py --data_root "$ATST_DATA"  # says when it writes the data (once), then where
else
  # the paper: base models on AudioSet-1.9M; Tables II-III ablations are small on AS-200K
  # (with another PRESET, e.g. the miniature's tiny, the ablations take that one)
  PRESET=${PRESET:-base}
  if [ "$PRESET" = base ]; then ABL_PRESET=small; else ABL_PRESET=$PRESET; fi
  export ATST_DATA=$DATA_ROOT
  PRE_DATA=as1.9m; ABL_DATA=as200k
  PRE_ARGS=""
  LINEAR_TASKS="us8k spcv2 vox1 nsynth fsd50k as20k esc50"  # ESC-50: beside the paper's
  ABL_TASKS="as20k spcv2 vox1 nsynth us8k"
  FT_TASKS="as2m as20k spcv2 vox1 fsd50k"; SED_DATA=dcase2022
  SED_FT_ARGS=""
fi
ALL=${DTYPE:+ --dtype $DTYPE}${WORKERS:+ --num_workers $WORKERS}   # flags of every stage
PRE_ARGS="$PRE_ARGS${STEPS:+ --max_steps $STEPS}${BATCH:+ --batch_size $BATCH}$ALL"
FT_ARGS="${EPOCHS:+--epochs $EPOCHS}${BATCH:+ --batch_size $BATCH}$ALL"
LIN_ARGS="${LINEAR_EPOCHS:+--epochs $LINEAR_EPOCHS}$ALL"
SED_ARGS="${EPOCHS:+--epochs $EPOCHS}${BATCH:+ --batch_strong $BATCH --batch_weak $BATCH}$ALL"
if [ -n "$EPOCHS" ]; then SED_FT_ARGS=""; fi
mkdir -p "$OUT"
if [ "$JOBS" -gt 1 ] && [ -z "${OMP_NUM_THREADS:-}" ]; then  # cores shared by the jobs
  export OMP_NUM_THREADS=$(( $(nproc) > JOBS ? $(nproc) / JOBS : 1 ))
fi

pids=()
CELLS=0; CELL=0
cell() {  # cell FUNCTION ARGS...: one table cell (or run), now or, with JOBS > 1, beside others
  CELL=$((CELL + 1))
  if [ "$CELLS" = 0 ]; then return; fi  # the first pass through protocol counts the cells
  echo "== cell $CELL of $CELLS: $*"
  if [ "$JOBS" -le 1 ]; then "$@"; return; fi
  while [ "$(jobs -rp | wc -l)" -ge "$JOBS" ]; do wait -n || true; done
  "$@" &
  pids+=($!)
}
barrier() {  # every cell started so far has ended; stop if one failed
  [ "$CELLS" != 0 ] || return 0
  local p failed=0
  for p in ${pids[@]+"${pids[@]}"}; do wait "$p" || failed=1; done
  pids=()
  [ "$failed" = 0 ] || { echo "run_all.sh: a stage failed (its messages are above)" >&2; exit 1; }
}
RUNS=0
run() {  # one process, torchrun on this node, or torchrun over NNODES nodes (c10d); every node
         # runs the same runs in the same order, each meeting on a port of its own (the last
         # run's rendezvous may still be closing on the first node)
  if [ "$NNODES" -gt 1 ]; then
    RUNS=$((RUNS + 1))
    torchrun --nnodes="$NNODES" --nproc_per_node="$NPROC" --rdzv_backend=c10d \
      --rdzv_endpoint="${RDZV%:*}:$(( ${RDZV##*:} + RUNS % 100 ))" --rdzv_id="$RDZV_ID" "$@"
  elif [ "$NPROC" -gt 1 ]; then torchrun --standalone --nproc_per_node="$NPROC" "$@"
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
  [ "$CELLS" != 0 ] && [ "$ABL_PRESET" = "$PRESET" ] && [ "$ABL_DATA" = "$PRE_DATA" ] &&
    [ ! -e "$OUT/pretrain/$1" ] &&
    ln -s "$2" "$OUT/pretrain/$1" || true
}
linear() {  # linear NAME "TASKS" [FLAGS...]: Table II-IV cells of one encoder, one process
  local name=$1 tasks=$2 todo="" t; shift 2
  for t in $tasks; do [ -f "$OUT/linear/${name}_$t.json" ] || todo="$todo${todo:+,}$t"; done
  [ -n "$todo" ] || return 0
  local extra="" run=${name%_concat}
  case $name in *_1s) extra="--chunk_seconds 1";; esac  # Table II: 1 s chunks downstream
  case $name in *_concat) extra="--frame_pool concat";; esac  # ASiT's band tokens side by side
  run linear_eval.py --ckpt "$OUT/pretrain/${run%_random}/ckpt.pt" --data "$todo" $extra \
    --out "$OUT/linear/${name}_{data}.json" --cache_dir "$OUT/cache" $LIN_ARGS "$@"
}
finetune() {  # finetune NAME SCRIPT TASK CKPT [FLAGS...]: Table V cells
  local name=$1 script=$2 task=$3 ckpt=$4; shift 4
  [ -f "$OUT/finetune/${name}_$task/result.json" ] && return
  run "$script" --ckpt "$ckpt" --data "$task" --out_dir "$OUT/finetune/${name}_$task" $FT_ARGS \
    "$@"
}
sed_run() {  # sed_run NAME CKPT MODE [FLAGS...]: Table VI cells
  local name=$1 ckpt=$2 mode=$3; shift 3
  [ -f "$OUT/sed/$name/result.json" ] && return
  run sed.py --ckpt "$ckpt" --data "$SED_DATA" --mode "$mode" --out_dir "$OUT/sed/$name" \
    $SED_ARGS "$@"
}

protocol() {  # every cell of the tables, in order
# ---- 1. pre-training: ATST-Clip (two 6 s segments) and ATST-Frame (config D) -------------
cell pretrain clip pretrain_clip.py "$PRESET" "$PRE_DATA"
cell pretrain frame pretrain_frame.py "$PRESET" "$PRE_DATA"
cell pretrain asit pretrain_asit.py "$PRESET" "$PRE_DATA"      # ASiT (REFERENCE.md R11-R19), same budget
barrier

# ---- 2. linear evaluation (Table IV), and the same encoders with random weights -----------
for name in clip frame asit; do
  cell linear $name "$LINEAR_TASKS"
  cell linear ${name}_random "$LINEAR_TASKS" --random_init true
done
cell linear asit_concat "$LINEAR_TASKS"            # ASiT's frames: its 8 band tokens side by side
cell linear asit_random_concat "$LINEAR_TASKS" --random_init true
barrier

# ---- 3. fine-tuning (Table V), then 4. C2F / F2C distillation (Table V) -----------------
for task in $FT_TASKS; do
  cell finetune clip finetune.py "$task" "$OUT/pretrain/clip/ckpt.pt"
  cell finetune frame finetune.py "$task" "$OUT/pretrain/frame/ckpt.pt"
  cell finetune asit finetune.py "$task" "$OUT/pretrain/asit/ckpt.pt"   # our protocol
done
barrier
for task in $FT_TASKS; do
  cell finetune c2f distill.py "$task" "$OUT/pretrain/frame/ckpt.pt" \
    --teacher "$OUT/finetune/clip_$task/best.pt"
  cell finetune f2c distill.py "$task" "$OUT/pretrain/clip/ckpt.pt" \
    --teacher "$OUT/finetune/frame_$task/best.pt"
done
barrier

# ---- 5. sound event detection (Table VI): linear, fine-tune, C2F, F2C --------------------
for kind in clip frame asit; do
  cell sed_run ${kind}_linear "$OUT/pretrain/$kind/ckpt.pt" linear
  cell sed_run ${kind}_finetune "$OUT/pretrain/$kind/ckpt.pt" finetune $SED_FT_ARGS
done
cell sed_run asit_linear_concat "$OUT/pretrain/asit/ckpt.pt" linear --frame_pool concat
barrier
cell sed_run c2f "$OUT/pretrain/frame/ckpt.pt" finetune $SED_FT_ARGS \
  --teacher "$OUT/sed/clip_finetune/best.pt"
cell sed_run f2c "$OUT/pretrain/clip/ckpt.pt" finetune $SED_FT_ARGS \
  --teacher "$OUT/sed/frame_finetune/best.pt"

# ---- 6. ablations (Tables II, III) at the ablation scale ------------------------------------
# Table II, ATST-Clip views: one or two segments of 1 s or 6 s
same clip_two_6s clip
for seg in single two; do
  for sec in 1 6; do
    cell pretrain clip_${seg}_${sec}s pretrain_clip.py "$ABL_PRESET" "$ABL_DATA" \
      --segments $seg --crop_sec $sec
  done
done
# Table III, ATST-Frame: A no augmentation, B random masking, C masked teacher, D the method,
# E both views augmented
cell pretrain frame_A pretrain_frame.py "$ABL_PRESET" "$ABL_DATA" --aug_views 0
cell pretrain frame_B pretrain_frame.py "$ABL_PRESET" "$ABL_DATA" --mask_mode random
cell pretrain frame_C pretrain_frame.py "$ABL_PRESET" "$ABL_DATA" --mask_teacher true
same frame_D frame
cell pretrain frame_D pretrain_frame.py "$ABL_PRESET" "$ABL_DATA"
cell pretrain frame_E pretrain_frame.py "$ABL_PRESET" "$ABL_DATA" --aug_views 2
barrier
for name in clip_single_1s clip_two_1s clip_single_6s clip_two_6s \
            frame_A frame_B frame_C frame_D frame_E; do
  cell linear $name "$ABL_TASKS"
done
barrier
}
protocol; CELLS=$CELL; CELL=0  # counted; now run
protocol

# ---- 7. tables and plots -----------------------------------------------------------------
if [ "$NODE_RANK" = 0 ]; then python tables.py --out "$OUT"; fi
