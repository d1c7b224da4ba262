#!/usr/bin/env bash
# Everything GPU-side in one device call (what benchmarks/results/gpu.md was measured with):
#   bash benchmarks/gpu_run.sh tests|smollm2|decode|gemv_ab|float_ab|mma_m1|mma_ab|dense|memory|steps|trace|prologue|prefill_graphs|prefill|kernels|profile ...   (from the repository root, results under $OUT)
set -u
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}src PYTHONUNBUFFERED=1
# Compiled kernels kept in the working tree (git-ignored), so later calls on a still-warm device machine, which
# keeps ignored files, skip Triton's compiles (most of a GPU test run's time).
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-$PWD/.triton-cache}
OUT=${OUT:-benchmarks/results}
for stage in "$@"; do
  case $stage in
    tests)  # kernels on the GPU (awkward shapes, poisoned outputs) and the fast path end to end vs the reference
      timeout "${TESTS_SECONDS:-200}" python3 -m pytest -p no:cacheprovider --maxfail=20 -v ${TESTS:-\
        tests/kernels/test_norm_rope.py tests/kernels/test_attention.py tests/model/test_linear_backends.py \
        tests/engine/test_cuda_graphs.py tests/kernels/test_embedding.py tests/model/test_host_embedding.py \
        tests/engine/test_prefill.py tests/kernels/test_mma.py tests/kernels/test_dense.py \
        tests/kernels/test_qmatmul.py::test_qmatmul_gpu_awkward_shapes \
        tests/kernels/test_qmatmul.py::test_accumulate_adds_to_a_float32_out \
        tests/kernels/test_qmatmul.py::test_accumulate_places_gate_and_up_for_an_act_order_down_proj \
        tests/kernels/test_qmatmul.py::test_swiglu_input_is_silu_mul_then_the_matmul} \
        > "$OUT/pytest_gpu.txt" 2>&1; grep -E "PASSED|FAILED|ERROR|passed|failed" "$OUT/pytest_gpu.txt" | tail -n 60 ;;
    smollm2)  # greedy tokens of the trained SmolLM2 (float, 4-bit RTN, 4-bit GPTQ act-order) vs the CPU reference
      if [ -f /tmp/smol/hf/config.json ] && [ -z "${LOWBIT_TEST_CACHE:-}" ]; then  # staged by .dev-smolB/finish.sh
        mkdir -p /tmp/tc/models && ln -sfn /tmp/smol/hf /tmp/tc/models/SmolLM2-135M-Instruct && export LOWBIT_TEST_CACHE=/tmp/tc
      fi
      timeout "${SMOL_SECONDS:-300}" python3 -m pytest -v -p no:cacheprovider tests/engine/test_gpu_smollm2.py \
        > "$OUT/pytest_smollm2.txt" 2>&1; grep -E "PASSED|FAILED|ERROR|passed|failed|diverges" "$OUT/pytest_smollm2.txt" | tail -n 20 ;;
    decode)  # whole-model decode table, LLaMA-7B shape
      timeout "${DECODE_SECONDS:-200}" python3 benchmarks/gpu_decode.py --shape llama-7b --tuned "$OUT/tuned.json" ${DECODE_ARGS:-} \
        > "$OUT/decode_log.txt" 2>&1; tail -n 12 "$OUT/decode_log.txt" ;;
    gemv_ab)  # whole-model b=1 decode, the M=1 GEMV's default config against $GEMV_AB (JSON keywords), one call
      echo "[[1, \"gemv\", ${GEMV_AB:?set GEMV_AB to a GEMV config}]]" > "$OUT/gemv_ab.json"
      for t in default ab; do
        extra=(); [ "$t" = ab ] && extra=(--tuned "$OUT/gemv_ab.json")
        timeout "${DECODE_SECONDS:-120}" python3 benchmarks/gpu_decode.py --shape llama-7b \
          --variants gptq-4bit-g128,gptq-4bit-g128-act --batches 1 "${extra[@]}" --out "$OUT/decode_gemv_$t.md" \
          > "$OUT/decode_gemv_$t.txt" 2>&1
        echo "$t"; grep "^| gptq" "$OUT/decode_gemv_$t.txt" | sort -u
      done ;;
    float_ab)  # whole-model fp16 decode, batch 1: cuBLAS linears (LOWBIT_FLOAT_GEMV=0) against the float GEMV (1, the default), one call
      for t in 0 1; do
        LOWBIT_FLOAT_GEMV=$t timeout "${DECODE_SECONDS:-120}" python3 benchmarks/gpu_decode.py --shape llama-7b \
          --variants fp16 --batches 1 --out "$OUT/decode_float_$t.md" > "$OUT/decode_float_$t.txt" 2>&1
        echo "LOWBIT_FLOAT_GEMV=$t"; grep "^| fp16" "$OUT/decode_float_$t.txt" | sort -u
      done ;;
    mma_m1)  # M=1 adding into float32: the mma kernel's tiles against the slots GEMV, each launch alone
      GEMV_SWEEP_SECONDS=${MMA_SECONDS:-200} python3 benchmarks/gemv_sweep.py --mma > "$OUT/gemv_sweep_mma_log.txt" 2>&1
      grep -E "^## |^\| 1 \||slots GEMV" "$OUT/gemv_sweep_mma_log.txt" | grep -v ": [0-9.]* us$" ;;
    mma_ab)  # whole-model decode, 4-bit g128: the slots layout (LOWBIT_MMA=0) against the mma layout (1), one call
      # ($MMA_M1, JSON keywords: the mma kernel's config at M=1 instead of its M<=16 row)
      tuned=(); [ -n "${MMA_M1:-}" ] && echo "[[1, \"mma\", $MMA_M1]]" > "$OUT/mma_m1.json" && tuned=(--tuned "$OUT/mma_m1.json")
      for t in ${MMA_AB_LAYOUTS:-0 1}; do
        LOWBIT_MMA=$t timeout "${DECODE_SECONDS:-120}" python3 benchmarks/gpu_decode.py --shape llama-7b "${tuned[@]}" \
          --variants gptq-4bit-g128 --batches ${MMA_BATCHES:-1,16} --out "$OUT/decode_mma_$t.md" > "$OUT/decode_mma_$t.txt" 2>&1
        echo "LOWBIT_MMA=$t"; grep -E "^\| (gptq|lowbit)" "$OUT/decode_mma_$t.txt" | sort -u
      done ;;
    dense)  # the float GEMV's tile sweep against cuBLAS, one 7B block's four fp16 launches each alone
      timeout "${DENSE_SECONDS:-150}" python3 benchmarks/dense_sweep.py > "$OUT/dense_sweep_log.txt" 2>&1
      grep -E "^###|^\| (default|cuBLAS)" "$OUT/dense_sweep_log.txt" ;;
    memory)  # 13B 4-bit at 2048 context, batch 1: "peak GB (b=1: load, prefill, decode)" against the 9 GB target
      timeout "${MEMORY_SECONDS:-120}" python3 benchmarks/gpu_decode.py --shape llama-13b --variants gptq-4bit-g128 --tuned "$OUT/tuned.json" \
        --batches 1 --context 2048 --new-tokens 64 --prefill-len 2047 --embeddings-on-host --prefill-chunk 256 ${MEMORY_ARGS:-} > "$OUT/memory_log.txt" 2>&1
      tail -n 4 "$OUT/memory_log.txt" ;;
    steps)  # the GPU time of each kernel in one captured decode step, PDL on and off
      timeout "${STEPS_SECONDS:-200}" python3 benchmarks/profile_decode.py ${STEPS_ARGS:-} > "$OUT/profile_decode_log.txt" 2>&1
      tail -n 40 "$OUT/profile_decode_log.txt" ;;
    trace)  # when each program of one captured decode step starts, stops waiting and ends (one layer's launches)
      timeout "${TRACE_SECONDS:-200}" python3 benchmarks/trace_step.py ${TRACE_ARGS:-} > "$OUT/trace_step_log.txt" 2>&1
      tail -n 14 "$OUT/trace_step_log.txt" ;;
    prologue)  # one-row down_proj / o_proj computing their x rows (SwiGLU, attention's merge) x_steps steps at a
      # time instead of a load-store round trip a step, in the whole step; then act-order with o_proj merging
      # partials placed in its order (LOWBIT_PLACED_PARTIALS=1) against attention merging its own splits
      rows=${PROLOGUE_SHAPES:-'[{"11008x4096": {"x_steps": 2}}, {"11008x4096": {"x_steps": 4}}, {"11008x4096": {"x_steps": 8}}, {"4096x4096": {"x_steps": 2}}, {"4096x4096": {"x_steps": 4}}, {"11008x4096": {"x_steps": 8}, "4096x4096": {"x_steps": 2}}]'}
      timeout "${PROLOGUE_SECONDS:-200}" python3 benchmarks/decode_sweep.py --variant gptq-4bit-g128 --shapes "$rows" \
        > "$OUT/prologue_plain.txt" 2>&1; tail -n 10 "$OUT/prologue_plain.txt"
      timeout "${PROLOGUE_SECONDS:-200}" python3 benchmarks/decode_sweep.py --variant gptq-4bit-g128-act \
        --env '[{"LOWBIT_PLACED_PARTIALS": "1"}]' > "$OUT/prologue_act.txt" 2>&1; tail -n 5 "$OUT/prologue_act.txt" ;;
    prefill_graphs)  # 7B 4-bit g128 at batch 1: TTFT (128 tokens) and decode, prefill graphs off against up to 256
      for t in 0 256; do
        timeout "${DECODE_SECONDS:-150}" python3 benchmarks/gpu_decode.py --shape llama-7b --variants gptq-4bit-g128 \
          --batches 1 --prefill-graphs $t --out "$OUT/decode_prefill_graphs_$t.md" > "$OUT/decode_prefill_graphs_$t.txt" 2>&1
        echo "--prefill-graphs $t"; grep -E "^\| (gptq|lowbit)" "$OUT/decode_prefill_graphs_$t.txt" | sort -u
      done ;;
    prefill)  # where a 128-token prefill's time goes (TTFT): wall against GPU busy, launches, host ops
      timeout "${PREFILL_SECONDS:-150}" python3 benchmarks/prefill_profile.py ${PREFILL_ARGS:-} > "$OUT/prefill_profile_log.txt" 2>&1
      grep -A 3 "^| wall" "$OUT/prefill_profile_log.txt"; tail -n 30 "$OUT/prefill_profile_log.txt" | cut -c1-160 ;;
    kernels)  # one 7B block of linears: tile sweep, then fp16 / ours / tinygemm
      timeout "${KERNELS_SECONDS:-300}" python3 benchmarks/kernels.py ${KERNELS_ARGS:-} > "$OUT/kernels_log.txt" 2>&1
      tail -n 14 "$OUT/kernels_log.txt" ;;
    profile)  # Nsight Compute on M=1 GEMV launches (config per $GEMV_CONFIGS entry, ';'-separated JSON): what bounds it
      cfg_list=${GEMV_CONFIGS:-"{}"}; IFS=';' read -ra cfgs <<< "$cfg_list"
      for i in "${!cfgs[@]}"; do
        GEMV_CONFIG="${cfgs[$i]}" timeout "${PROFILE_SECONDS:-90}" ncu --kernel-name regex:'_gemv_kernel|_dot_kernel' --launch-skip 5 \
          --launch-count 1 --section SpeedOfLight --section MemoryWorkloadAnalysis --section WarpStateStats \
          --section Occupancy --section LaunchStats --section SchedulerStats --section SourceCounters \
          python3 benchmarks/profile_gemv.py > "$OUT/ncu_gemv_$i.txt" 2>&1
        echo "config ${cfgs[$i]}"; grep -E "DRAM Throughput|Memory Throughput|Duration|Stall|Achieved Occupancy|Registers Per|Warp Cycles Per Issued|Issued Ipc|Eligible Warps|No Eligible" "$OUT/ncu_gemv_$i.txt" | head -n 16
      done ;;
  esac
done
