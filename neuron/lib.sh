# Shared argument handling for neuron/train_trn1_2xlarge.sh, neuron/train_trn1_32xlarge.sh and neuron/precompile.sh.
# Sourced, not run. The calling script sets SCRIPT (its name) and calls the functions below.
#
# Command line of every launcher:   SCRIPT [script options] [-- bmojo train arguments]
# Script options are parsed here; everything after `--` goes unchanged to `bmojo train`. An unknown script option
# is an error (rather than being passed on) so that a typo such as --node_rank fails here, before any compiling.

NEURON_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

# Exit statuses: 2 = bad arguments, 3 = environment not ready (neuron/check_env.py).
usage_error() {
    echo "$SCRIPT: error: $1 (see $SCRIPT --help)" >&2
    exit 2
}

is_uint() { [[ "$1" =~ ^[0-9]+$ ]]; }

# require_int NAME VALUE MIN [MAX]: VALUE is a decimal integer in [MIN, MAX].
require_int() {
    local name=$1 value=$2 min=$3 max=${4:-}
    is_uint "$value" || usage_error "$name expects an integer, got '$value'"
    ((${#value} <= 9)) || usage_error "$name is too large: $value"
    value=$((10#$value))
    ((value >= min)) || usage_error "$name must be at least $min, got $value"
    if [[ -n "$max" ]] && ((value > max)); then
        usage_error "$name must be at most $max, got $value"
    fi
}

# Launch options shared by all scripts; fills the variables below. Script-specific options are handled by the
# caller's `extra_option` function (returns 0 and sets SHIFT when it consumed the option, 1 otherwise).
NNODES=1
NODE_RANK=""
MASTER_ADDR_OPT=""
MASTER_PORT_OPT=29500
DRY_RUN=0
BF16=1
TP=1
ZERO1=0
PASSTHROUGH=()
SHIFT=1

# option_value NAME "$@": the value of `--name value` or `--name=value` at the front of "$@" (sets SHIFT).
option_value() {
    local name=$1 arg=$2
    if [[ "$arg" == "$name="* ]]; then
        VALUE=${arg#"$name="}
        SHIFT=1
    elif (($# >= 3)); then
        VALUE=$3
        SHIFT=2
    else
        usage_error "$name needs a value"
    fi
}

parse_args() {
    while (($# > 0)); do
        SHIFT=1
        case "$1" in
            --)
                shift
                PASSTHROUGH=("$@")
                break
                ;;
            --dry-run) DRY_RUN=1 ;;
            --fp32) BF16=0 ;;
            --zero1) ZERO1=1 ;;
            --tp | --tp=*)
                option_value --tp "$@"
                TP=$VALUE
                ;;
            --nnodes | --nnodes=*)
                option_value --nnodes "$@"
                NNODES=$VALUE
                ;;
            --node-rank | --node-rank=*)
                option_value --node-rank "$@"
                NODE_RANK=$VALUE
                ;;
            --master-addr | --master-addr=*)
                option_value --master-addr "$@"
                MASTER_ADDR_OPT=$VALUE
                ;;
            --master-port | --master-port=*)
                option_value --master-port "$@"
                MASTER_PORT_OPT=$VALUE
                ;;
            *)
                if ! extra_option "$@"; then
                    if [[ "$1" == -* ]]; then
                        usage_error "unknown option '$1' (bmojo train arguments go after --)"
                    fi
                    usage_error "unexpected argument '$1' (bmojo train arguments go after --)"
                fi
                ;;
        esac
        shift "$SHIFT"
    done
}

# Multi-node options: integers, node rank below the node count, a master address when there is more than one node.
validate_nodes() {
    local multi_node_ok=$1
    require_int --nnodes "$NNODES" 1
    NNODES=$((10#$NNODES))
    if ((NNODES > 1)) && [[ "$multi_node_ok" != 1 ]]; then
        usage_error "multi-node training needs trn1.32xlarge (EFA is not available on trn1.2xlarge); use train_trn1_32xlarge.sh"
    fi
    if [[ -n "$NODE_RANK" ]]; then
        require_int --node-rank "$NODE_RANK" 0
        NODE_RANK=$((10#$NODE_RANK))
        ((NODE_RANK < NNODES)) || usage_error "--node-rank must be less than --nnodes ($NNODES), got $NODE_RANK"
    fi
    require_int --master-port "$MASTER_PORT_OPT" 1 65535
    MASTER_PORT_OPT=$((10#$MASTER_PORT_OPT))
    if ((NNODES > 1)); then
        [[ -n "$NODE_RANK" ]] || usage_error "--node-rank is required when --nnodes is more than 1 (0 on the first node)"
        [[ -n "$MASTER_ADDR_OPT" ]] || usage_error "--master-addr is required when --nnodes is more than 1 (the address of node 0)"
    fi
}

# Values of `bmojo train` options that must be positive integers, checked here so that a typo fails before any
# process starts compiling (bmojo train checks them again, with the rest of its settings).
validate_passthrough() {
    local i=0 arg name value
    local n=${#PASSTHROUGH[@]}
    while ((i < n)); do
        arg=${PASSTHROUGH[i]}
        name=""
        case "$arg" in
            --steps | --batch-size | --seq-len)
                name=$arg
                ((i + 1 < n)) || usage_error "$name needs a value"
                value=${PASSTHROUGH[i + 1]}
                i=$((i + 1))
                ;;
            --steps=* | --batch-size=* | --seq-len=*)
                name=${arg%%=*}
                value=${arg#*=}
                ;;
        esac
        if [[ -n "$name" ]]; then
            require_int "$name" "$value" 1
        fi
        i=$((i + 1))
    done
}

# --tp: an integer that divides the processes of one node, so that a tensor-parallel group (neuronx-distributed forms
# it inside a node: adjacent ranks, or ranks strided across the node for tp 4 on trn1) never
# spans two nodes (its all-reduces run every layer; bmojo train checks the model's sizes against it).
validate_parallel() {
    local nproc=$1
    require_int --tp "$TP" 1 "$nproc"
    TP=$((10#$TP))
    ((nproc % TP == 0)) || usage_error "--tp must divide the $nproc NeuronCores of a node, got $TP"
}

# TORCHRUN: the torchrun command for NPROC processes on this node (plus the multi-node options).
build_torchrun() {
    local nproc=$1
    TORCHRUN=(torchrun "--nproc_per_node=$nproc")
    if ((NNODES > 1)); then
        TORCHRUN+=("--nnodes=$NNODES" "--node_rank=$NODE_RANK" "--master_addr=$MASTER_ADDR_OPT" "--master_port=$MASTER_PORT_OPT")
    fi
    # bf16 through `bmojo train --bf16` (autocast): trn1's TensorE runs bf16 matmuls at 4x its fp32 rate.
    TRAIN=(-m bmojo.cli train --device xla)
    if ((BF16)); then
        TRAIN+=(--bf16)
    fi
    # Tensor parallelism and ZeRO-1 through neuronx-distributed (bmojo.parallel.neuron.NeuronTraining; neuron/README.md,
    # "Tensor parallelism and ZeRO-1"). Run only on the CPU stand-ins so far, never on trn1.
    if ((TP > 1)); then
        TRAIN+=(--tp "$TP")
    fi
    if ((ZERO1)); then
        TRAIN+=(--zero1)
    fi
}

# Print a command the way a shell would read it back (each word quoted as needed).
print_command() {
    local out="" word
    for word in "$@"; do
        out+="$(printf '%q' "$word") "
    done
    echo "${out% }"
}

# check_environment PURPOSE CORES: neuron/check_env.py, whose one-line messages say what is missing (exit 3).
check_environment() {
    local python
    python=$(command -v python || command -v python3 || true)
    if [[ -z "$python" ]]; then
        echo "bmojo-neuron: python is not on PATH: activate the Neuron SDK 2.28 PyTorch 2.9 environment (source /opt/aws_neuronx_venv_pytorch_2_9/bin/activate)" >&2
        exit 3
    fi
    "$python" "$NEURON_DIR/check_env.py" --for "$1" --cores "$2"
}

# The launch options' help text, shared by the scripts.
LAUNCH_OPTIONS_HELP="Options:
  --dry-run            print the command (one line, shell-quoted) instead of running it; arguments are still
                       validated, the environment is not checked, so this works on any machine
  --fp32               leave out --bf16 (default: bmojo train --bf16, bfloat16 autocast)
  --tp N               tensor-parallel degree, passed as bmojo train --tp N (default 1); divides the NeuronCores
                       of a node. Recommended per preset: neuron/README.md, \"Tensor parallelism and ZeRO-1\"
  --zero1              shard the AdamW state over the data-parallel ranks (bmojo train --zero1)
  -h, --help           this help
Exit status: 0 done, 2 bad arguments, 3 environment not ready (one line per missing piece), else the job's own."
MULTI_NODE_HELP="Multi-node (every node runs the same command with its own --node-rank):
  --nnodes N           number of trn1.32xlarge nodes (default 1)
  --node-rank R        this node's rank, 0 <= R < N (required when N > 1)
  --master-addr ADDR   address of node 0 (required when N > 1)
  --master-port P      port on node 0 (default 29500)"

# help_requested ARGS...: true when -h/--help comes before `--` (help never needs the Neuron environment).
help_requested() {
    local arg
    for arg in "$@"; do
        [[ "$arg" == "--" ]] && return 1
        [[ "$arg" == "-h" || "$arg" == "--help" ]] && return 0
    done
    return 1
}

# launch_training NPROC MULTI_NODE_OK ARGS...: the whole of a training launcher after its usage text.
launch_training() {
    local nproc=$1 multi_node_ok=$2
    shift 2
    if help_requested "$@"; then
        usage
        exit 0
    fi
    parse_args "$@"
    validate_nodes "$multi_node_ok"
    validate_parallel "$nproc"
    validate_passthrough
    build_torchrun "$nproc"
    local command=("${TORCHRUN[@]}" "${TRAIN[@]}" "${PASSTHROUGH[@]}")
    source "$NEURON_DIR/env.sh"
    if ((DRY_RUN)); then
        print_command "${command[@]}"
        exit 0
    fi
    check_environment train "$nproc"
    exec "${command[@]}"
}
