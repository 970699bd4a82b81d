#!/usr/bin/env bash
# One device call (~6 min) of ncu data for the kernels that stop the open issues: the SSD
# backward chunk kernel (chunk: bwd_chunk.cuh, chunkwg: the sm_90a one, chunkwg576: the same
# at msc's b32 L576 h32) and states walk (issue 5), the SSD forward wgmma kernel (issue 4),
# the conv1d channel-last forward (issue 3), the warp-specialized forward (ws: b4 L2048,
# ws576: b32 L576) and the msc forward's scan kernel (msc: the ws kernel, mscwg: the
# one-warpgroup one; issue 8), the conv1d l-contiguous forward and F.silu on the same tensor
# (convl: the streaming l-contiguous forward, convone: the one-shot one (the default), silu:
# a plain elementwise kernel on the same tensor), the one-shot l-contiguous backward at b4 L2048
# (convbwd, one tile a row) and b1 L16384 (convbwd1, 8 tiles a row), the one-shot kernels on
# rows off 16-byte boundaries (convoneodd, convbwdodd: b4 L2047), msc's rows-mode conv
# backward and the same kernel on gathered rows (convrows, convgath: b32 24x24 d2304). Per kernel: the headline metrics and the
# SASS lines with the most stall samples (ncu_top.py); the source CSVs come back as
# $OUT/ncu_src.tgz (the device returns at most 8 files), the reports stay in /tmp/ncu there.
#   scripts/dev/profile_call.sh [chunk,chunkwg,chunkwg576,states,stateswg,fwd,conv,convl,convone,silu,ws,ws576,msc,mscwg,convbwd,convbwd1,convoneodd,convbwdodd,convrows,convgath] > $OUT/profile.log 2>&1
set -uo pipefail
cd "$(dirname "$0")/../.."
export MAX_JOBS="${MAX_JOBS:-$(nproc)}" MLMAMBA_CUDA_ARCHS="${MLMAMBA_CUDA_ARCHS:-90a}" COLUMNS=400
PY="${PYTHON:-python3}"
OUTD=/tmp/ncu
mkdir -p "$OUTD"
ONLY="${1:-chunk,states,fwd,conv,ws,msc}"
$PY setup.py build_ext --inplace > /tmp/build.log 2>&1 || { tail -20 /tmp/build.log; exit 1; }
SECTIONS="--section SpeedOfLight --section Occupancy --section LaunchStats --section SchedulerStats
  --section WarpStateStats --section InstructionStats --section SourceCounters
  --section MemoryWorkloadAnalysis"
KEYS="Duration|DRAM Throughput|L2 Hit Rate|Mem Busy|Max Bandwidth|Mem Pipes Busy|Compute \(SM\) Throughput|Registers Per|Achieved Occupancy|Issue Slots Busy|No Eligible|Issued Warp Per|Warp Cycles Per Issued|Executed Instructions|Block Limit"
prof() {  # name, kernel regex, launches to skip, command...
  local name=$1 re=$2 skip=$3; shift 3
  case ",$ONLY," in *",$name,"*) ;; *) return ;; esac
  echo "== $name ($re): $*"
  timeout 150 ncu --kernel-name "regex:$re" --launch-skip "$skip" --launch-count 1 $SECTIONS \
    -f -o "$OUTD/$name" "$@" > "$OUTD/$name.log" 2>&1 || { tail -5 "$OUTD/$name.log"; return; }
  ncu --import "$OUTD/$name.ncu-rep" --page details --csv 2>/dev/null \
    | $PY -c "import csv,re,sys
rows = list(csv.reader(sys.stdin)); h = rows[0] if rows else []
n, u, v = (h.index(k) for k in ('Metric Name', 'Metric Unit', 'Metric Value'))
for r in rows[1:]:
    if len(r) > v and re.search(r'''$KEYS''', r[n]): print(f'  {r[n]:<44} {r[v]:>14} {r[u]}')"
  ncu --import "$OUTD/$name.ncu-rep" --page source --csv --print-source sass \
    > "$OUTD/${name}_source.csv" 2>/dev/null && $PY scripts/dev/ncu_top.py "$OUTD/${name}_source.csv" 20
}
MLMAMBA_SSD_BWD_CHUNK=mma prof chunk chunk_kernel 2 $PY scripts/dev/ssd_prof.py bwd 4 2048 80
prof chunkwg chunk_wg_kernel 2 $PY scripts/dev/ssd_prof.py bwd 4 2048 80
prof chunkwg576 chunk_wg_kernel 2 $PY scripts/dev/ssd_prof.py bwd 32 576 32
MLMAMBA_SSD_BWD_STATES=s2 prof states states_kernel 2 $PY scripts/dev/ssd_prof.py bwd 4 2048 80
MLMAMBA_SSD_BWD_STATES=wgmma prof stateswg states_wg_kernel 2 $PY scripts/dev/ssd_prof.py bwd 4 2048 80
MLMAMBA_SSD_FWD_WS=0 prof fwd ssd_fwd_wgmma 2 $PY scripts/dev/ssd_prof.py fwd 4 2048 80
prof ws ssd_fwd_ws 2 $PY scripts/dev/ssd_prof.py fwd 4 2048 80
prof msc ssd_fwd_ws_msc 2 $PY scripts/dev/msc_prof.py cross
MLMAMBA_MSC_WS=0 prof mscwg ssd_fwd_wgmma 2 $PY scripts/dev/msc_prof.py cross
prof ws576 ssd_fwd_ws 2 $PY scripts/dev/ssd_prof.py fwd 32 576 32
export PROF_ONLY="fwd default"
prof conv fwd_chlast 0 $PY scripts/dev/conv1d_dev.py prof
PROF_ONLY="fwd pipe" prof convl fwd_lcontig_pipe 0 $PY scripts/dev/conv1d_dev.py prof
prof convone fwd_lcontig_oneshot 0 $PY scripts/dev/conv1d_dev.py prof
PROF_ONLY="bwd oneshot" prof convbwd bwd_lcontig_oneshot 0 $PY scripts/dev/conv1d_dev.py prof
PROF_ONLY="bwd oneshot" PROF_SHAPE=1x16384 prof convbwd1 bwd_lcontig_oneshot 0 $PY scripts/dev/conv1d_dev.py prof
PROF_ONLY=silu prof silu vectorized_elementwise 0 $PY scripts/dev/conv1d_dev.py prof
PROF_SHAPE=4x2047 prof convoneodd fwd_lcontig_oneshot 0 $PY scripts/dev/conv1d_dev.py prof
PROF_ONLY="bwd oneshot" PROF_SHAPE=4x2047 prof convbwdodd bwd_lcontig_oneshot 0 $PY scripts/dev/conv1d_dev.py prof
prof convrows bwd_chlast_kernel 0 $PY scripts/dev/conv_rows_time.py prof rows
prof convgath bwd_chlast_kernel 0 $PY scripts/dev/conv_rows_time.py prof gathered
if [ -n "${OUT:-}" ]; then tar czf "$OUT/ncu_src.tgz" --exclude='*.ncu-rep' -C /tmp ncu; fi
