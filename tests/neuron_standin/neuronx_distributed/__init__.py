"""Stand-in for neuronx-distributed (NxD Core 0.18; tests only; see tests/neuron_standin/README.md)."""

from .trainer import initialize_parallel_model, initialize_parallel_optimizer, neuronx_distributed_config

__all__ = ["initialize_parallel_model", "initialize_parallel_optimizer", "neuronx_distributed_config"]
