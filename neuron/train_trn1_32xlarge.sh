#!/usr/bin/env bash
# Train bmojo on trn1.32xlarge: 16 Trainium devices = 32 NeuronCores per node, one torchrun process per NeuronCore;
# several nodes join through torchrun's --nnodes/--node_rank/--master_addr (inter-node traffic goes over EFA).
set -euo pipefail

SCRIPT=$(basename "$0")
source "$(dirname "$0")/lib.sh"

NPROC=32

usage() {
    cat <<EOF
Usage: $SCRIPT [options] [-- bmojo train arguments]

Runs, after sourcing neuron/env.sh and checking the environment (neuron/check_env.py):
  torchrun --nproc_per_node=$NPROC [--nnodes=N --node_rank=R --master_addr=ADDR --master_port=P] \\
      -m bmojo.cli train --device xla --bf16 [bmojo train arguments]

Examples:
  $SCRIPT -- --preset 370m --data corpus.bin --out runs/370m --steps 20000 --batch-size 64 --seq-len 2048
  # two nodes: the same command on both, --node-rank 0 on 10.0.0.1 and --node-rank 1 on the other
  $SCRIPT --nnodes 2 --node-rank 0 --master-addr 10.0.0.1 -- --preset 370m --data corpus.bin --out /fsx/runs/370m

$MULTI_NODE_HELP
$LAUNCH_OPTIONS_HELP
EOF
}

extra_option() { return 1; }

launch_training "$NPROC" 1 "$@"
