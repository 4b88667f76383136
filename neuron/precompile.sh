#!/usr/bin/env bash
# Pre-compile every graph of a training run with neuron_parallel_compile, so the real run finds them in the cache.
#
# neuron_parallel_compile runs the same torchrun command as a short trial in which graphs are only extracted
# (NEURON_EXTRACT_GRAPHS_ONLY: the numbers it computes are garbage), then compiles all of them in parallel into
# NEURON_COMPILE_CACHE_URL. The graphs depend on the model, the shapes (batch, sequence length), bf16 and the
# number of processes, and on --tp and --zero1 (other collectives, other shapes), so give it the same instance size, node count and bmojo train arguments as the real run.
set -euo pipefail

SCRIPT=$(basename "$0")
source "$(dirname "$0")/lib.sh"

INSTANCE=""
TRIAL_STEPS=10

usage() {
    cat <<EOF
Usage: $SCRIPT --instance trn1.2xlarge|trn1.32xlarge [options] [-- bmojo train arguments of the real run]

Runs, after sourcing neuron/env.sh and checking the environment (neuron/check_env.py):
  neuron_parallel_compile torchrun --nproc_per_node=2|32 [multi-node options] \\
      -m bmojo.cli train --device xla --bf16 [bmojo train arguments] --steps STEPS --warmup-steps 0 --out SCRATCH

The trial run's --steps, --warmup-steps and --out come last, so they override those of the real run (bmojo train
keeps the last value of an option; a warmup longer than --steps is refused, and the learning rate is a graph input,
so the warmup does not change what is compiled): it trains for STEPS steps (which compiles the first steps, evaluation and saving) into a
fresh temporary directory SCRATCH (mktemp -d), deleted afterwards because what it holds is garbage.

Example:
  $SCRIPT --instance trn1.32xlarge -- --preset 370m --data corpus.bin --out runs/370m --steps 20000 --batch-size 64
  neuron/train_trn1_32xlarge.sh -- --preset 370m --data corpus.bin --out runs/370m --steps 20000 --batch-size 64

Options:
  --instance TYPE      trn1.2xlarge (2 processes) or trn1.32xlarge (32 processes per node); required
  --trial-steps N      steps of the trial run (default $TRIAL_STEPS)
$MULTI_NODE_HELP
  (multi-node options only with --instance trn1.32xlarge)
$LAUNCH_OPTIONS_HELP
EOF
}

extra_option() {
    case "$1" in
        --instance | --instance=*)
            option_value --instance "$@"
            INSTANCE=$VALUE
            ;;
        --trial-steps | --trial-steps=*)
            option_value --trial-steps "$@"
            TRIAL_STEPS=$VALUE
            ;;
        *) return 1 ;;
    esac
}

if help_requested "$@"; then
    usage
    exit 0
fi

parse_args "$@"
case "$INSTANCE" in
    trn1.2xlarge) NPROC=2 MULTI_NODE_OK=0 ;;
    trn1.32xlarge) NPROC=32 MULTI_NODE_OK=1 ;;
    "") usage_error "--instance is required (trn1.2xlarge or trn1.32xlarge): the graphs depend on the number of processes" ;;
    *) usage_error "--instance must be trn1.2xlarge or trn1.32xlarge, got '$INSTANCE'" ;;
esac
validate_nodes "$MULTI_NODE_OK"
validate_parallel "$NPROC"
require_int --trial-steps "$TRIAL_STEPS" 1
TRIAL_STEPS=$((10#$TRIAL_STEPS))
validate_passthrough
for arg in "${PASSTHROUGH[@]}"; do
    # A resumed run compiles the same graphs as a fresh one; the trial run cannot resume (its --out is empty).
    [[ "$arg" == "--resume" ]] && usage_error "leave out --resume: pre-compile with the arguments of a fresh run"
done
build_torchrun "$NPROC"

source "$NEURON_DIR/env.sh"
if ((DRY_RUN)); then
    SCRATCH="${TMPDIR:-/tmp}/bmojo-precompile.XXXXXX" # the mktemp template; the real run creates it
    print_command neuron_parallel_compile "${TORCHRUN[@]}" "${TRAIN[@]}" "${PASSTHROUGH[@]}" --steps "$TRIAL_STEPS" --warmup-steps 0 --out "$SCRATCH"
    exit 0
fi
check_environment compile "$NPROC"
SCRATCH=$(mktemp -d "${TMPDIR:-/tmp}/bmojo-precompile.XXXXXX")
trap 'rm -rf -- "$SCRATCH"' EXIT
echo "$SCRIPT: compiling into ${NEURON_COMPILE_CACHE_URL} (trial run in $SCRATCH, deleted afterwards)" >&2
neuron_parallel_compile "${TORCHRUN[@]}" "${TRAIN[@]}" "${PASSTHROUGH[@]}" --steps "$TRIAL_STEPS" --warmup-steps 0 --out "$SCRATCH"
