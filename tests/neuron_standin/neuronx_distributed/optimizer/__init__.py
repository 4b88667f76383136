from .zero_redundancy_optimizer import NeuronZero1Optimizer

__all__ = ["NeuronZero1Optimizer"]
