# Environment for bmojo on trn1 (Neuron SDK 2.28: torch 2.9 + torch-xla 2.9 + torch-neuronx).
# Sourced by neuron/train_trn1_*.sh and neuron/precompile.sh; `source neuron/env.sh` gives an interactive shell
# the same settings. Values already set in the environment win (except PJRT_DEVICE, see below), so a job can
# override any of them: NEURON_CC_FLAGS="..." neuron/train_trn1_32xlarge.sh -- ...
# Sources: the Neuron SDK documentation for torch-neuronx training: the environment variables page
# (torch-neuron-envvars), neuron_parallel_compile, and the training troubleshooting guide.

if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
    echo "env.sh: source this file (source neuron/env.sh), do not run it" >&2
    exit 2
fi

# torch-xla's runtime is the NeuronCores. Forced, not defaulted: a PJRT_DEVICE=CPU left over from the CPU XLA test tier
# would otherwise run the whole job on the host CPU without an error.
export PJRT_DEVICE=NEURON

# Persistent cache of compiled graphs (Neuron's default location): the first run compiles for minutes, later runs
# and neuron_parallel_compile share it. Use shared storage or s3://bucket/prefix when several nodes train.
export NEURON_COMPILE_CACHE_URL="${NEURON_COMPILE_CACHE_URL:-/var/tmp/neuron-compile-cache}"

# neuronx-cc flags: --model-type=transformer and -O1 are what NxD's Mamba-2 training example uses;
# --auto-cast=none keeps the dtypes the model chose (bf16 through autocast, the SSM decay and norm math in fp32),
# as Neuron's autocast recipe asks; --cache_dir names the same cache as NEURON_COMPILE_CACHE_URL.
export NEURON_CC_FLAGS="${NEURON_CC_FLAGS:---model-type=transformer -O1 --auto-cast=none --cache_dir=${NEURON_COMPILE_CACHE_URL}}"

# Off: with autocast the weights, gradients and AdamW state stay fp32, so no bf16 weight update needs stochastic
# rounding, and runs stay reproducible (NxD's Mamba-2 example, which keeps fp32 master weights, also sets 0).
export NEURON_RT_STOCHASTIC_ROUNDING_EN="${NEURON_RT_STOCHASTIC_ROUNDING_EN:-0}"

# int64 tensors become int32 on the device: the model's only integer tensors are token ids (< vocab_size) and
# positions (< 2^31), and Neuron's troubleshooting guide names this as the fix for int64 compile errors
# ("Expect ap datatype..."). Anything counted on the device must therefore stay below 2^31.
export XLA_USE_32BIT_LONG="${XLA_USE_32BIT_LONG:-1}"

# Deliberately not set:
# - XLA_USE_BF16 / XLA_DOWNCAST_BF16: deprecated since torch-neuronx 2.5; bf16 comes from `bmojo train --bf16`.
# - MALLOC_ARENA_MAX, OMP_NUM_THREADS and the EFA FI_* variables: not covered by our reference notes; multi-node
#   EFA setup follows Neuron's "prepare trn1.32xlarge for multi-node execution" guide (see neuron/README.md).
