"""
Cross-model distillation, C2F and F2C (REFERENCE.md R6, paper Table V): a fine-tuned model of
one kind (finetune.py's best.pt) teaches the fine-tuning of a pre-trained model of another kind
on the same task (any two of ATST-Clip, ATST-Frame, ASiT): loss = 0.5 task + 0.5 KD, KD =
BCE(s, sigmoid(t)) for multi-label or Mixup, else CE(s, softmax(t)), no temperature. The
teacher runs in eval mode without gradients, on the same augmented input as the student (across
front-ends, ASiT <-> ATST: its own view of the same waveforms with the same Mixup draws,
without RRC). The loop is finetune.train; every finetune.py flag (and its per-dataset TASKS
defaults) applies here too.

    # C2F: fine-tune ATST-Clip, then let it teach ATST-Frame
    python finetune.py --ckpt out/clip_tiny/ckpt.pt --data demo_events
    python distill.py --ckpt out/frame_tiny/ckpt.pt \
        --teacher out/finetune_demo_events_clip/best.pt --data demo_events
    torchrun --nproc_per_node=8 distill.py --ckpt atstframe_base.ckpt \
        --teacher CLIP_FT/best.pt --data as2m
"""
import finetune
from heads import load_classifier
from config import configure
from plumbing import user_errors

# -------------------------------------------------------------------------------- config
# distillation (every flag of finetune.py applies too)
teacher = ""                # fine-tuned checkpoint of another kind (finetune.py's best.pt)
kd_weight = 0.5             # loss = (1 - kd_weight) * task + kd_weight * KD

if __name__ == "__main__":
    g = {k: getattr(finetune, k) for k in finetune.CONFIG_KEYS}
    g.update(teacher=teacher, kd_weight=kd_weight, TASKS=finetune.TASKS, __file__=__file__,
             __doc__=__doc__)
    cfg = configure(g, finetune.TABLES, help_files=[finetune.__file__])
    if not cfg["teacher"]:
        raise SystemExit("distill.py needs --teacher (a fine-tuned checkpoint of finetune.py)")
    with user_errors():
        teacher_model = load_classifier(cfg["teacher"], expect=["atst-finetune"])
        finetune.train(cfg, teacher_model, cfg["kd_weight"], stage="distill")
