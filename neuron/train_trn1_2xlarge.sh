#!/usr/bin/env bash
# Train bmojo on one trn1.2xlarge: 1 Trainium device = 2 NeuronCores, one torchrun process per NeuronCore.
set -euo pipefail

SCRIPT=$(basename "$0")
source "$(dirname "$0")/lib.sh"

NPROC=2

usage() {
    cat <<EOF
Usage: $SCRIPT [options] [-- bmojo train arguments]

Runs, after sourcing neuron/env.sh and checking the environment (neuron/check_env.py):
  torchrun --nproc_per_node=$NPROC -m bmojo.cli train --device xla --bf16 [bmojo train arguments]

Example:
  $SCRIPT -- --preset 130m --data corpus.bin --out runs/130m --steps 10000 --batch-size 16 --seq-len 1024

$LAUNCH_OPTIONS_HELP
trn1.2xlarge has no EFA, so it trains on one node only; for several nodes use train_trn1_32xlarge.sh.
EOF
}

# No script-specific options; multi-node options are parsed (to give a clear error) but refused below.
extra_option() { return 1; }

launch_training "$NPROC" 0 "$@"
