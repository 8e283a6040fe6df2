#!/usr/bin/env bash
# The detection zoo of issue #5: per architecture 5 clean models (seeds 0-4) and 6 backdoored
# ones (BadNets x2, Blended, SIG, WaNet, BadNets all-to-all), each scanned once with the
# shipped scan options. Models and scan results are cached, so a re-run only fills the gaps.
#
#   bash benchmarks/scan_zoo.sh RESULTS_JSON ARCH [ARCH ...]
#
# Scan options other than the defaults go in SCAN_OPTIONS, as calibrate_scan.py's
# --scan-option values, e.g. SCAN_OPTIONS="batchnorm:eps=0.75" (the shipped budgets).
#
# Run two of these side by side on different architectures (each is single-threaded) and
# calibrate on the union with:
#   python benchmarks/calibrate_scan.py --archs resnet18 --attacks none --seeds 0 --rescore \
#       --results RESULTS_A --include RESULTS_B ...
set -u
results=$1
shift
common=(--epochs 3 --train-size 2000 --results "$results" --no-write --threads 1)
for option in ${SCAN_OPTIONS:-}; do
    common+=(--scan-option "$option")
done
for arch in "$@"; do
    for spec in "none 0,1,2,3,4" "badnets@patch_size=6 0,1" "blended 2" "sig@epochs=5 3" \
        "wanet@epochs=10 4" "badnets@patch_size=6@mode=all-to-all@epochs=8 0"; do
        read -r attack seeds <<<"$spec"
        # a one-attack run cannot fit thresholds (it exits non-zero after storing its rows)
        python benchmarks/calibrate_scan.py --archs "$arch" --attacks "$attack" --seeds "$seeds" \
            "${common[@]}" || true
    done
done
