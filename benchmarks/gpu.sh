#!/usr/bin/env bash
# Every registered model at full size with random weights, 720p output, bf16, 33 output frames (33 LR frames;
# 17 for OSDEnhancer, which doubles the frame rate: one chunk of each chunked model): eager vs compiled, through
# `zoo bench --model`. Writes $OUT/gpu.json (every run's record, with ms per output frame and TFLOP/s over the
# whole timed stream) and $OUT/gpu.md (one table: ms/frame, first-frame latency, warm-up incl.
# compilation, peak VRAM measured and as the count estimates it, TFLOP/s, FLOPs / bound, the count's roofline).
#
# Eager runs also time each module group during their timed pass (`zoo bench --breakdown`).
#
# Budget on one H100/H200, in one call: BUDGET_S (470 s) in all. The eager runs come first (every model, with
# OSDEnhancer also without VAE tiles, its FLOP-bound setting, PS-SR also with its whole VAE in float32, and the 2-D
# pipelines also in PyTorch's default memory format), the compiled ones after them, cheapest compilation first.
# Each run is a fresh process limited to its own EAGER_S (120 s) or COMPILED_S (240 s) and to what is left of the
# budget; a run past its limit is recorded as "timeout" with the last progress line of its log (build, warm-up,
# frames timed so far), one the budget leaves no time for as "skipped".
#
# FLOPs, launches, the memory estimate and the roofline are not counted here: counting 33 frames of 720p on fake
# tensors takes minutes of CPU per model, and the count depends on neither device, compilation nor memory format.
# Each run reuses $COUNTS/<model>[-<option>].json (a `channels_last` run its model's), written by `zoo bench --model
# NAME --size full --height 720 --width 1280 --frames 33 (17) --dtype bf16 --count-only --json FILE` (with
# `--option KEY=VALUE` where the run has one); without it the run counts itself.
#
# Settings (environment): MODELS (default: every registered model), SIZE (full), HEIGHT (720), WIDTH (1280),
# FRAMES (LR frames of every model; unset: 33, and 17 for osdenhancer), DTYPE (bf16), DEVICE (auto), EAGER_S,
# COMPILED_S, BUDGET_S, COUNTS (benchmarks/counts), OUT (benchmarks/results), PYTHON (python), COMPILE_FLAGS
# (--compile: inductor, each network compiled on its own; "--option compile={'scope':'step'}" compiles whole steps;
# a CPU check can pass "--option compile={'backend':'eager'}"), BENCH_FLAGS (more `zoo
# bench` flags for every run, e.g. "--busy-ok" on a shared CPU).
# CPU check of the script itself, tiny networks on small frames:
#   SIZE=tiny DEVICE=cpu HEIGHT=64 WIDTH=64 FRAMES=3 BUDGET_S=900 EAGER_S=300 COMPILED_S=300 BENCH_FLAGS=--busy-ok \
#     COUNTS=/nonexistent COMPILE_FLAGS="--option compile={'backend':'eager'}" benchmarks/gpu.sh
set -euo pipefail

cd "$(dirname "$0")/.."
start=$SECONDS
PYTHON=${PYTHON:-python}
SIZE=${SIZE:-full}
HEIGHT=${HEIGHT:-720}
WIDTH=${WIDTH:-1280}
frames_of() {  # LR frames giving 33 output frames, unless FRAMES sets them all
  if [[ -n ${FRAMES:-} ]]; then echo "$FRAMES"; elif [[ $1 == osdenhancer ]]; then echo 17; else echo 33; fi
}
DTYPE=${DTYPE:-bf16}
DEVICE=${DEVICE:-auto}
EAGER_S=${EAGER_S:-120}
COMPILED_S=${COMPILED_S:-240}
BUDGET_S=${BUDGET_S:-470}
COUNTS=${COUNTS:-benchmarks/counts}
COMPILE_FLAGS=${COMPILE_FLAGS:---compile}
read -ra bench_flags <<<"${BENCH_FLAGS:-}"
OUT=${OUT:-benchmarks/results}
MODELS=${MODELS:-$("$PYTHON" -c 'import zoo.hub; print(" ".join(zoo.hub.list_models()))')}
mkdir -p "$OUT/runs"

# Runs as "model[:KEY=VALUE]/eager|compiled". Compiled ones by expected compilation cost: one SD UNet call,
# four UNet + ControlNet calls, then the video transformers.
runs=()
for model in $MODELS; do
  [[ $model == osdenhancer ]] && runs+=("osdenhancer:vae_tiling=False/eager")
  runs+=("$model/eager")
  [[ $model == pssr ]] && runs+=("pssr:float32_vae=all/eager")
done
# The 2-D pipelines' eager runs in PyTorch's default layout too: channels-last saves cuDNN's transposes, but
# PyTorch's CUDA group norm transposes its input back (`VideoUpscaler._set_memory_format`); which wins is untimed.
for model in osdiffvsr stream_diffvsr; do
  [[ " $MODELS " == *" $model "* ]] && runs+=("$model:channels_last=False/eager")
done
for model in osdiffvsr stream_diffvsr pssr osdenhancer; do
  [[ " $MODELS " == *" $model "* ]] && runs+=("$model/compiled")
done

keys=()
for spec in "${runs[@]}"; do
  run=${spec##*/}; target=${spec%/*}; model=${target%%:*}; option=""
  [[ $target == *:* ]] && option=${target#*:}
  key=$model${option:+-${option//[^A-Za-z0-9]/_}}-$run
  keys+=("$key")
  json="$OUT/runs/$key.json"
  rm -f "$json"
  if [[ $run == eager ]]; then limit=$EAGER_S; flags=(--breakdown); else limit=$COMPILED_S; read -ra flags <<<"$COMPILE_FLAGS"; fi
  left=$((BUDGET_S - (SECONDS - start) - 10))  # 10 s for the table
  if ((left < 20)); then
    echo "== $key: skipped, ${left}s of the budget left" >&2
    printf '{"model": "%s", "run": "%s", "options": "%s", "failed": "skipped"}\n' "$model" "$run" "$option" >"$json"
    continue
  fi
  ((limit > left)) && limit=$left
  [[ -n $option ]] && flags+=(--option "$option")
  frames=$(frames_of "$model")
  counted=$option
  [[ $option == channels_last=* ]] && counted=""  # the count is the same in either layout (zoo.bench.pipeline)
  count="$COUNTS/$model${counted:+-$counted}.json"
  [[ -f $count ]] && flags+=(--counts "$count")
  echo "== $key (limit ${limit}s, $((SECONDS - start))s in)" >&2
  status=0
  timeout --kill-after=5 "$limit" "$PYTHON" -m zoo bench --model "$model" --size "$SIZE" --height "$HEIGHT" \
    --width "$WIDTH" --frames "$frames" --dtype "$DTYPE" --device "$DEVICE" "${flags[@]}" "${bench_flags[@]}" \
    --json "$json" >"$OUT/runs/$key.log" 2>&1 || status=$?
  if [[ $status -ne 0 ]]; then
    tail -n 3 "$OUT/runs/$key.log" >&2
    if [[ $status -eq 124 || $status -eq 137 ]]; then reason=timeout; else reason="exit $status"; fi
    last=$(grep '^zoo bench: ' "$OUT/runs/$key.log" | tail -n 1 | sed 's/^zoo bench: //; s/["\\]//g' || true)
    [[ -n $last ]] && reason="$reason after: $last"
    printf '{"model": "%s", "run": "%s", "options": "%s", "failed": "%s"}\n' "$model" "$run" "$option" "$reason" \
      >"$json"
  fi
done

"$PYTHON" - "$OUT" "${keys[@]}" <<'EOF'
import json
import sys
from pathlib import Path

out, keys = Path(sys.argv[1]), sys.argv[2:]
records = {key: json.loads((out / "runs" / f"{key}.json").read_text()) for key in keys}


def cell(value, fmt):
    return "-" if value is None else format(value, fmt)


# Chunked models (osdenhancer, pssr) yield a whole chunk at once, so the gaps between outputs after the first
# are ~0 and a per-gap median measures nothing there: ms/frame is `zoo bench`'s `ms_per_output_frame` (the whole
# timed stream over its output frames, first frame included), and TFLOP/s follows from it. The per-gap median is
# kept for the per-frame models.
# The count's memory estimate (weights + the peak of the storages the fake stream made) stands next to the measured
# peak, so that each GPU run also checks the estimate that `zoo upscale` plans with.
# The count's roofline time (each operator at the H200's peaks) is the eager run's floor: ms/frame over it says how
# far from those peaks the run is.
rows = ["| model | options | run | ms/frame | roofline ms/frame | steady gap median ms | first frame ms "
        "| warm-up s (incl. compile) | peak VRAM GiB | estimated GiB | TFLOP/s | FLOPs / bound |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
for key, r in records.items():
    options = r["options"] if isinstance(r.get("options"), str) else ", ".join(
        f"{k}={v}" for k, v in r.get("options", {}).items())
    if "failed" in r:
        rows.append(f"| {r['model']} | {options} | {r['run']} | {r['failed']} | | | | | | | | |")
        continue
    run = key.rsplit("-", 1)[1]
    ms = r["ms_per_output_frame"]
    vram = None if r["peak_device_bytes"] is None else r["peak_device_bytes"] / 2**30
    estimate = (r["weight_bytes"] + r["peak_activation_bytes"]) / 2**30
    rows.append(f"| {r['model']} | {options} | {run} | {cell(ms, '.1f')} | {cell(r['roofline_ms_per_frame'], '.1f')} "
                f"| {cell(r['ms_per_frame']['median'], '.1f')} "
                f"| {cell(r['first_frame_ms'], '.1f')} | {cell(r['warmup_s'], '.1f')} | {cell(vram, '.2f')} "
                f"| {cell(estimate, '.2f')} | {cell(r['tflops'], '.1f')} | {cell(r['ratio_to_bound'], '.3f')} |")
(out / "gpu.json").write_text(json.dumps(records, indent=2) + "\n")
rows += ["", "Where an eager frame's time goes (`--breakdown`: device ms per output frame by module group, over the "
         "timed pass):", "", "| model | options | ms per output frame by group |", "|---|---|---|"]
for r in records.values():
    if r.get("ms_by_group"):
        options = ", ".join(f"{k}={v}" for k, v in r["options"].items())
        split = ", ".join(f"{k} {v:.1f}" for k, v in sorted(r["ms_by_group"].items(), key=lambda kv: -kv[1]))
        rows.append(f"| {r['model']} | {options} | {split} |")
first = next((r for r in records.values() if "failed" not in r), {})
frames = sorted({f"{r['frames_in']} -> {r['frames_out']}" for r in records.values() if "failed" not in r})
title = (f"`zoo bench` {first.get('size', '?')} size, {first.get('output', ['?', '?'])[0]}x"
         f"{first.get('output', ['?', '?'])[1]} output, {first.get('dtype', '?')}, frames {', '.join(frames)}, "
         f"{first.get('device_name') or first.get('device', '?')}, torch {first.get('torch', '?')}")
(out / "gpu.md").write_text(title + "\n\n" + "\n".join(rows) + "\n")
print((out / "gpu.md").read_text())
EOF
