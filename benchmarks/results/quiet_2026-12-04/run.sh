#!/bin/bash
# Quiet benchmark sitting: one job at a time, nothing else running.
cd /work/main
O=/work/main/benchmarks/results/quiet_2026-12-04
mkdir -p $O
export TRANSFORMERS_VERBOSITY=error
{ date -u; uptime; git rev-parse HEAD; lscpu | grep -E 'Model name|^CPU\(s\)|Vendor'; grep -q avx512f /proc/cpuinfo && echo "AVX-512: yes" || echo "AVX-512: no (AVX2)"; } > $O/sitting.txt
step() { echo "$(date -u +%H:%M:%S) $*" >> $O/sitting.txt; }
step forward;   .venv/bin/python benchmarks/bench_forward.py --reps 5 > $O/forward.jsonl 2> $O/forward.err
step train_step; .venv/bin/python benchmarks/bench_train_step.py --reps 5 > $O/train_step.jsonl 2> $O/train_step.err
step peer_step; /tmp/peers/bin/python ../shared/peers/lucidrains_calm_step.py 2 > $O/peer_step.txt 2>&1
step train_step2; .venv/bin/python benchmarks/bench_train_step.py --reps 5 > $O/train_step2.jsonl 2> $O/train_step2.err
step decode;    .venv/bin/python benchmarks/bench_decode.py --reps 5 > $O/decode.jsonl 2> $O/decode.err
step peer_decode; /tmp/peers/bin/python ../shared/peers/lucidrains_calm_decode.py > $O/peer_decode.txt 2>&1
step packing;   .venv/bin/python benchmarks/bench_packing.py > $O/packing.jsonl 2> $O/packing.err
step long_context; .venv/bin/python benchmarks/bench_long_context.py > $O/long_context.jsonl 2> $O/long_context.err
step end; uptime >> $O/sitting.txt
