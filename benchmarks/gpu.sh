#!/usr/bin/env bash
# Every registered model at full size with random weights, 720p output, bf16, 33 LR frames: eager vs
# compiled, through `zoo bench --model`. Writes $OUT/gpu.json (every run's record, plus ms per output frame and
# TFLOP/s over the whole timed stream) and $OUT/gpu.md (one table: ms/frame, first-frame latency, warm-up incl.
# compilation, peak VRAM, TFLOP/s, FLOPs / bound).
#
# Budget on one H100/H200, in one call: under 8 minutes. Each run is a fresh process with its own time limit,
# EAGER_S (45 s) and COMPILED_S (70 s) per model, so 4 models take at most 4 x 115 s = 460 s plus the table;
# a run past its limit is recorded as "timeout" and the script goes on with the next one.
#
# Settings (environment): MODELS (default: every registered model), SIZE (full), HEIGHT (720), WIDTH (1280),
# FRAMES (33), DTYPE (bf16), DEVICE (auto), EAGER_S, COMPILED_S, OUT (benchmarks/results), PYTHON (python),
# COMPILE_FLAGS (--compile: inductor; a CPU check can pass "--option compile={'backend':'eager'}"),
# BENCH_FLAGS (more `zoo bench` flags for every run, e.g. "--busy-ok" on a shared CPU).
# CPU check of the script itself, tiny networks on small frames:
#   SIZE=tiny DEVICE=cpu HEIGHT=64 WIDTH=64 FRAMES=3 EAGER_S=300 COMPILED_S=300 BENCH_FLAGS=--busy-ok \
#     COMPILE_FLAGS="--option compile={'backend':'eager'}" benchmarks/gpu.sh
set -euo pipefail

cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
SIZE=${SIZE:-full}
HEIGHT=${HEIGHT:-720}
WIDTH=${WIDTH:-1280}
FRAMES=${FRAMES:-33}
DTYPE=${DTYPE:-bf16}
DEVICE=${DEVICE:-auto}
EAGER_S=${EAGER_S:-45}
COMPILED_S=${COMPILED_S:-70}
COMPILE_FLAGS=${COMPILE_FLAGS:---compile}
read -ra bench_flags <<<"${BENCH_FLAGS:-}"
OUT=${OUT:-benchmarks/results}
MODELS=${MODELS:-$("$PYTHON" -c 'import zoo.hub; print(" ".join(zoo.hub.list_models()))')}
mkdir -p "$OUT/runs"

for model in $MODELS; do
  for run in eager compiled; do
    if [[ $run == eager ]]; then limit=$EAGER_S; flags=(); else limit=$COMPILED_S; read -ra flags <<<"$COMPILE_FLAGS"; fi
    json="$OUT/runs/$model-$run.json"
    rm -f "$json"
    echo "== $model $run (limit ${limit}s)" >&2
    status=0
    timeout --kill-after=5 "$limit" "$PYTHON" -m zoo bench --model "$model" --size "$SIZE" --height "$HEIGHT" \
      --width "$WIDTH" --frames "$FRAMES" --dtype "$DTYPE" --device "$DEVICE" "${flags[@]}" "${bench_flags[@]}" --json "$json" \
      >"$OUT/runs/$model-$run.log" 2>&1 || status=$?
    if [[ $status -ne 0 ]]; then
      tail -n 3 "$OUT/runs/$model-$run.log" >&2
      if [[ $status -eq 124 || $status -eq 137 ]]; then reason=timeout; else reason="exit $status"; fi
      printf '{"model": "%s", "failed": "%s"}\n' "$model" "$reason" >"$json"
    fi
  done
done

"$PYTHON" - "$OUT" "$MODELS" <<'EOF'
import json
import sys
from pathlib import Path

out, models = Path(sys.argv[1]), sys.argv[2].split()
records = {f"{m}/{run}": json.loads((out / "runs" / f"{m}-{run}.json").read_text())
           for m in models for run in ("eager", "compiled")}
(out / "gpu.json").write_text(json.dumps(records, indent=2) + "\n")


def cell(value, fmt):
    return "-" if value is None else format(value, fmt)


# Chunked models (osdenhancer, pssr) yield a whole chunk at once, so the gaps between outputs after the first
# are ~0 and a per-gap median measures nothing there: ms/frame is the whole timed stream over its output frames
# (first frame included), and TFLOP/s follows from it. The per-gap median is kept for the per-frame models.
rows = ["| model | run | ms/frame | steady gap median ms | first frame ms | warm-up s (incl. compile) "
        "| peak VRAM GiB | TFLOP/s | FLOPs / bound |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
for key, r in records.items():
    model, run = key.split("/")
    if "failed" in r:
        rows.append(f"| {model} | {run} | {r['failed']} | | | | | | |")
        continue
    total_ms = r["first_frame_ms"] + r["ms_per_frame"]["mean"] * (r["frames_out"] - 1)
    ms = total_ms / r["frames_out"]
    r["ms_per_output_frame"] = ms
    r["tflops_all_frames"] = r["flops_per_frame"]["total"] / ms / 1e9
    vram = None if r["peak_device_bytes"] is None else r["peak_device_bytes"] / 2**30
    rows.append(f"| {model} | {run} | {cell(ms, '.1f')} | {cell(r['ms_per_frame']['median'], '.1f')} "
                f"| {cell(r['first_frame_ms'], '.1f')} | {cell(r['warmup_s'], '.1f')} | {cell(vram, '.2f')} "
                f"| {cell(r['tflops_all_frames'], '.1f')} | {cell(r['ratio_to_bound'], '.3f')} |")
(out / "gpu.json").write_text(json.dumps(records, indent=2) + "\n")
first = next((r for r in records.values() if "failed" not in r), {})
title = (f"`zoo bench` {first.get('size', '?')} size, {first.get('output', ['?', '?'])[0]}x"
         f"{first.get('output', ['?', '?'])[1]} output, {first.get('dtype', '?')}, {first.get('frames_in', '?')} "
         f"LR frames, {first.get('device', '?')}")
(out / "gpu.md").write_text(title + "\n\n" + "\n".join(rows) + "\n")
print((out / "gpu.md").read_text())
EOF
