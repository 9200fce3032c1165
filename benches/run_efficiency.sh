#!/usr/bin/env bash
# The peer benches in one run (docs/benchmarks.md, "Peers"): training step, prefill and beam ranking per
# user; tiny preset and SmolLM2-135M (the GGUF in ../shared/models); L = 20 / 50 / 100 (prefill also 350);
# patchrec vanilla / PFT-I / PFT-S against transformers packed, transformers padded, transformers with
# full logits and the authors' code. Every case checks its loss / log-probs / ranked titles equal to
# patchrec's before it is timed, then times PATCHREC_PEER_ROUNDS rounds (>= 5).
#
# Usage: [PATCHREC_EFFICIENCY_PARTS="train prefill beam profile"] benches/run_efficiency.sh [OUT_DIR]
#            [extra pytest arguments, e.g. -k "tiny-vanilla-20-"]
#   PATCHREC_EFFICIENCY_PARTS picks the parts to run (default: all four), for a suite run in several parts;
#   run.txt records it.
#   OUT_DIR defaults to benches/results/efficiency-cpu. Writes peers_train.json, peers_prefill.json,
#   peers_beam.json (pytest-benchmark JSON: min / median per case, load average, peak memory, the pytest
#   command in machine_info) and run.txt (this script's command, the commit, the machine's load before and
#   after each part), and profile-tiny-step.txt / .json (benches/profile_step.py: the tiny step's fixed
#   cost, torch.profiler tables before / after the fixed-cost changes). Run it with nothing else on the machine: the timings are side by side, but a busy
#   core still adds noise.
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=${1:-benches/results/efficiency-cpu}
case "$OUT" in
    -*) echo "the first argument is the output directory (got $OUT); pytest arguments come after it" >&2
        exit 2 ;;
esac
shift || true
export PATCHREC_PEER_ROUNDS=${PATCHREC_PEER_ROUNDS:-5}
PARTS=${PATCHREC_EFFICIENCY_PARTS:-train prefill beam profile}
for part in $PARTS; do
    case "$part" in
        train|prefill|beam|profile) ;;
        *) echo "PATCHREC_EFFICIENCY_PARTS: unknown part '$part' (train, prefill, beam, profile)" >&2
           exit 2 ;;
    esac
done
if [ "$PATCHREC_PEER_ROUNDS" -lt 5 ]; then
    echo "PATCHREC_PEER_ROUNDS=$PATCHREC_PEER_ROUNDS: the efficiency run needs >= 5 rounds" >&2
    exit 2
fi
mkdir -p "$OUT"
RUN="$OUT/run.txt"
# Read before run.txt is opened: rewriting a committed run.txt would itself make the tree look dirty.
COMMIT="$(git rev-parse HEAD 2>/dev/null || echo unknown)$(git diff --quiet 2>/dev/null || echo ' (dirty)')"
{
    echo "command: PATCHREC_EFFICIENCY_PARTS=\"$PARTS\" benches/run_efficiency.sh $(printf '%q ' "$OUT" "$@")"
    echo "commit: $COMMIT"
    echo "started: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "parts: $PARTS"
    echo "env: PATCHREC_PEER_ROUNDS=$PATCHREC_PEER_ROUNDS PATCHREC_PEER_BATCH=${PATCHREC_PEER_BATCH:-4}" \
         "PATCHREC_PEER_USERS=${PATCHREC_PEER_USERS:-2} PATCHREC_PEER_BEAM_USERS=${PATCHREC_PEER_BEAM_USERS:-4}"
} > "$RUN"

status=0
for part in train prefill beam; do
    case " $PARTS " in *" $part "*) ;; *) continue ;; esac
    cmd=(python -m pytest "benches/bench_peers_$part.py" -q -p no:cacheprovider
         "--benchmark-json=$OUT/peers_$part.json" "$@")
    echo "$part: load average before: $(cut -d' ' -f1-3 /proc/loadavg)" >> "$RUN"
    echo "$part: ${cmd[*]}" >> "$RUN"
    start=$(date +%s)
    rc=0
    "${cmd[@]}" || rc=$?  # a failed equality check fails its case; the other parts still run
    [ "$rc" -eq 0 ] || status=$rc
    echo "$part: exit $rc, $(( $(date +%s) - start )) s; load average after: $(cut -d' ' -f1-3 /proc/loadavg)" \
        >> "$RUN"
done
case " $PARTS " in *" profile "*)
    cmd=(python benches/profile_step.py --out "$OUT/profile-tiny-step")
    echo "profile: ${cmd[*]}" >> "$RUN"
    rc=0
    "${cmd[@]}" || rc=$?
    [ "$rc" -eq 0 ] || status=$rc
    echo "profile: exit $rc; load average after: $(cut -d' ' -f1-3 /proc/loadavg)" >> "$RUN" ;;
esac
echo "finished: $(date -u +%Y-%m-%dT%H:%M:%SZ)" >> "$RUN"
echo "wrote $OUT (parts: $PARTS; run.txt)"
exit "$status"
