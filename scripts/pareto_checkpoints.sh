#!/usr/bin/env bash
# Trains every checkpoint docs/pareto.md plots, with the method pages' own commands, then runs
# bench_vit.py (the image entries' timing) and scripts/pareto.py. About 70 min on a 2-core CPU.
#
#   bash scripts/pareto_checkpoints.sh [ROOT]      # ROOT defaults to /tmp/adacomp
#
# A run whose workdir already holds a finished checkpoint is skipped (train.py resumes a workdir,
# and one at its last step has nothing left to do), so an interrupted run picks up where it
# stopped. SKIP_PARETO=1 stops after training (to time the plot later, on a quiet machine).
set -euo pipefail
A=${1:-/tmp/adacomp}
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
train() { echo "== $(date +%T) train $*" >&2; "$PY" train.py "$@"; }

# Dense baseline, Duo stage 1 and its routers (adacomp/methods/duo/README.md).
train --gin_file=configs/dense.gin --workdir=$A/dense
train --gin_file=configs/duo.gin --workdir=$A/duo
train --gin_file=configs/duo_router.gin --workdir=$A/duo_router \
  --gin_bindings="train.init_checkpoint='$A/duo'"
train --gin_file=configs/duo_router.gin --workdir=$A/duo_router_b \
  --gin_bindings="train.init_checkpoint='$A/duo'" --gin_bindings="duo_ffn.budget=(0.25, 0.5, 0.25)"
# The two combinations (docs/pareto.md).
train --gin_file=configs/duo_skipdecode.gin --workdir=$A/duo_skip2x \
  --gin_bindings="train.init_checkpoint='$A/duo_router'"
train --gin_file=configs/tokenformer_duo.gin --workdir=$A/tokenformer_duo
# Informed routing and MoD (adacomp/methods/informed_routing/README.md).
train --gin_file=configs/informed_routing_lff.gin --workdir=$A/informed/lff \
  --gin_bindings="train.init_checkpoint='$A/dense'"
for s in 25 50 75; do
  train --gin_file=configs/informed_routing.gin --workdir=$A/informed/router_s$s \
    --gin_bindings="train.init_checkpoint='$A/informed/lff'" --gin_bindings="SPARSITY = 0.$s"
  train --gin_file=configs/mod.gin --workdir=$A/informed/mod_s$s \
    --gin_bindings="train.init_checkpoint='$A/dense'" --gin_bindings="SPARSITY = 0.$s"
done
# TokenFormer growth (adacomp/methods/tokenformer/README.md).
R=$A/tokenformer
train --gin_file=configs/tokenformer.gin --workdir=$R/small \
  --gin_bindings='train.num_steps=300' --gin_bindings='make_optimizer.decay_steps=600' \
  --gin_bindings='train.eval_every=100'
[ -d $R/grown ] || "$PY" scripts/grow.py --source=$R/small --target=$R/grown --factor=2
train --gin_file=$R/grown/config.gin --workdir=$R/grown \
  --gin_bindings='train.num_steps=600' --gin_bindings='train.eval_every=100'
[ -d $R/small_continued ] || cp -r $R/small $R/small_continued
train --gin_file=$R/small_continued/config.gin --workdir=$R/small_continued \
  --gin_bindings='train.num_steps=600' --gin_bindings='train.eval_every=100'
train --gin_file=configs/dense.gin --workdir=$R/dense_matched --gin_bindings='train.num_steps=600' \
  --gin_bindings='train.eval_every=100' --gin_bindings='DecoderConfig.d_ff=1280'
# SkipDecode (adacomp/methods/skipdecode/README.md).
train --gin_file=configs/dense.gin --gin_file=configs/sizes/tiny_deep.gin \
  --gin_bindings='train.num_steps = 1200' --workdir=$A/dense_deep
for s in 2 3 5; do
  train --gin_file=configs/skipdecode.gin --gin_bindings="train.init_checkpoint='$A/dense_deep'" \
    --gin_bindings="SPEEDUP = $s" --workdir=$A/skip${s}x
done
# AS-ViT (adacomp/methods/as_vit/README.md).
train --gin_file=configs/vit.gin --workdir=$A/vit/dense
for r in 0.65 0.5 0.35; do
  train --gin_file=configs/as_vit.gin --gin_bindings="RATIO = $r" \
    --gin_bindings="train.init_checkpoint='$A/vit/dense'" --workdir=$A/vit/as_$r
done
train --gin_file=configs/vit.gin --gin_bindings="train.init_checkpoint = '$A/vit/dense'" \
  --gin_bindings='train.num_steps = 300' --gin_bindings='train.eval_every = 150' \
  --gin_bindings='make_optimizer.learning_rate = 5e-4' --gin_bindings='make_optimizer.warmup_steps = 20' \
  --workdir=$A/vit/dense_ft
[ "${SKIP_PARETO:-0}" = 1 ] && exit 0

echo "== $(date +%T) bench_vit" >&2
"$PY" scripts/bench_vit.py --dense=$A/vit/dense_ft --pruned=$A/vit/as_0.65 --pruned=$A/vit/as_0.5 \
  --pruned=$A/vit/as_0.35 --repeats=10 --output=$A/vit/bench_vit.json
echo "== $(date +%T) pareto" >&2
"$PY" scripts/pareto.py --output_dir=$A/pareto --eval_batches=8 --rounds=5 \
  --image_bench=$A/vit/bench_vit.json \
  --entry "dense=$A/dense" \
  --entry "Duo all big=$A/duo;duo_ffn.mode='big';duo_ffn.compute='gather';duo_ffn.capacity=(0.0, 1.0)" \
  --entry "Duo all small=$A/duo;duo_ffn.mode='small';duo_ffn.compute='gather';duo_ffn.capacity=(1.0, 0.0)" \
  --entry "Duo router 0/.75/.25=$A/duo_router;duo_ffn.compute='gather';duo_ffn.capacity=(0.9, 0.3)" \
  --entry "Duo router .25/.5/.25=$A/duo_router_b;duo_ffn.compute='gather';duo_ffn.capacity=(0.8, 0.3)" \
  --entry "Duo+SkipDecode 2x=$A/duo_skip2x;duo_ffn.compute='gather';duo_ffn.capacity=(0.9, 0.3);ref=dense" \
  --entry "informed 25%=$A/informed/router_s25;routed_ffn.compute='gather'" \
  --entry "informed 50%=$A/informed/router_s50;routed_ffn.compute='gather'" \
  --entry "informed 75%=$A/informed/router_s75;routed_ffn.compute='gather'" \
  --entry "MoD 25%=$A/informed/mod_s25;routed_ffn.compute='gather'" \
  --entry "MoD 50%=$A/informed/mod_s50;routed_ffn.compute='gather'" \
  --entry "MoD 75%=$A/informed/mod_s75;routed_ffn.compute='gather'" \
  --entry "TokenFormer 0.82M=$A/tokenformer/small_continued" \
  --entry "TokenFormer grown 1.61M=$A/tokenformer/grown" \
  --entry "dense 1.61M (d_ff 1280)=$A/tokenformer/dense_matched" \
  --entry "TokenFormer+Duo small=$A/tokenformer_duo;duo_ffn.mode='small';duo_ffn.compute='gather';duo_ffn.capacity=(1.0, 0.0)" \
  --entry "TokenFormer+Duo random=$A/tokenformer_duo;duo_ffn.compute='gather';duo_ffn.capacity=(0.4, 0.6)" \
  --entry "dense 12 layers=$A/dense_deep" \
  --entry "SkipDecode 2x=$A/skip2x;ref=dense 12 layers" \
  --entry "SkipDecode 3x=$A/skip3x;ref=dense 12 layers" \
  --entry "SkipDecode 5x=$A/skip5x;ref=dense 12 layers" \
  --entry "ViT dense=$A/vit/dense_ft" \
  --entry "AS-ViT 0.65=$A/vit/as_0.65" \
  --entry "AS-ViT 0.5=$A/vit/as_0.5" \
  --entry "AS-ViT 0.35=$A/vit/as_0.35"
echo "== $(date +%T) done: $A/pareto/pareto.png" >&2
