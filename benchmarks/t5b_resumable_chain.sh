# Table 5b, arithmetic with brackets at the paper's 10^4 steps per stage (40k steps), resumable
# across device calls. Run from the repo root on the GPU with runs/ carried (git-ignored):
#   PAUSE=520 bash benchmarks/t5b_resumable_chain.sh      (each call resumes from runs/t5b_ck)
#   SPECS="2e-3:1 2e-3:2 3e-3:2" PAUSE=520 bash benchmarks/t5b_resumable_chain.sh   (lr:seed pairs)
# Everything comes back as ONE archive, $OUT/chain.tgz (the device returns at most 8 files); unpack
# it into runs/ before the next call: tar xzf chain.tgz -C runs t5b_ck
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
PAUSE=${PAUSE:-520}
mkdir -p runs/t5b_ck $OUT/ck
SPECS=${SPECS:-"1e-3:0 3e-3:0 2e-3:0 3e-3:1"}
for spec in $SPECS; do
  set -- ${spec/:/ }
  name=br_lr$1_s$2
  python -m mamba3.cli eval synthetic --task modular_brackets --mixer mamba3 --d-model 64 --lr $1 --seed $2 \
    --device cuda --dt-range 0.1,1.0 --matmul-precision high --steps 10000 --evals-per-stage 4 \
    --eval-examples 4096 --test-examples 8192 --checkpoint runs/t5b_ck/$name.pt --pause-after-seconds $PAUSE \
    --out $OUT/$name.jsonl > $OUT/$name.log 2>&1 &
done
wait
grep -h "val acc\|paused" $OUT/*.log | tail -n 12
tar czf $OUT/chain.tgz -C runs t5b_ck -C $OUT $(cd $OUT && ls *.log *.jsonl) && (cd $OUT && rm -rf ck *.log *.jsonl)
