#!/usr/bin/env bash
# The main job on the embedded phantom, on CPU: write the phantom, plan it with stock nnU-Net, apply the CPU
# preset, train nnUNetTrainerVoxShield briefly with stock nnUNetv2_train, export the protected copy and verify it.
# Everything goes to $1, else $VOXSHIELD_DEMO_DIR, else a new temporary folder (never into the checkout).
# Took 2.5 minutes on 2 idle cores.
set -euo pipefail
OUT=$(realpath -m "${1:-${VOXSHIELD_DEMO_DIR:-$(mktemp -d -t voxshield_demo.XXXXXX)}}")
echo "voxshield demo: writing to $OUT"
export nnUNet_raw="$OUT/nnUNet_raw" nnUNet_preprocessed="$OUT/nnUNet_preprocessed" nnUNet_results="$OUT/nnUNet_results"
export nnUNet_def_n_proc=1 nnUNet_compile=false OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
mkdir -p "$nnUNet_raw" "$nnUNet_preprocessed" "$nnUNet_results"
TRAINER=${VOXSHIELD_DEMO_TRAINER:-nnUNetTrainerVoxShield_1epochs}

[ -d "$nnUNet_raw/Dataset990_VoxShieldPhantom" ] || voxshield_phantom -d 990 -n 12
nnUNetv2_plan_and_preprocess -d 990 -c 3d_fullres -np 1
voxshield_plans -d 990 --preset cpu
nnUNet_n_proc_DA=0 nnUNetv2_train 990 3d_fullres 0 -p nnUNetPlans_cpu -tr "$TRAINER" -device cpu
voxshield_export -d 990 -o 991 -tr "$TRAINER" -p nnUNetPlans_cpu -c 3d_fullres -f 0 -device cpu --overwrite
voxshield_verify "$nnUNet_raw/Dataset990_VoxShieldPhantom" "$nnUNet_raw/Dataset991_VoxShieldPhantomProtected" \
    -o "$OUT/verify_report.json"

FOLD="$nnUNet_results/Dataset990_VoxShieldPhantom/${TRAINER}__nnUNetPlans_cpu__3d_fullres/fold_0"
echo
echo "checkpoint:        $FOLD/checkpoint_final.pth"
echo "training log:      $(ls "$FOLD"/training_log_*.txt | tail -n 1)"
echo "protected dataset: $nnUNet_raw/Dataset991_VoxShieldPhantomProtected"
echo "verify report:     $OUT/verify_report.json"
echo "(all under $OUT; delete it when done)"
