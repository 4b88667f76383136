"""Stand-in for ``neuronx_distributed.trainer`` (tests only): ``neuronx_distributed_config``,
``initialize_parallel_model`` and ``initialize_parallel_optimizer`` with NxD's signatures and defaults."""

import torch

import torch_xla.core.xla_model as xm
from _standin_log import record

from ..optimizer import NeuronZero1Optimizer
from ..parallel_layers import grads
from ..parallel_layers import parallel_state as ps


def neuronx_distributed_config(tensor_parallel_size=1, pipeline_parallel_size=1, expert_parallel_size=1,
                               context_parallel_size=1, pipeline_config=None, optimizer_config=None,
                               activation_checkpoint_config=None, pad_model=False, sequence_parallel=False,
                               model_init_config=None, lora_config=None, mixed_precision_config=None,
                               sequential_move_factor=11, lnc_size=1):
    optimizer_config = dict(optimizer_config or {"zero_one_enabled": False, "grad_clipping": True,
                                                 "max_grad_norm": 1.0})
    optimizer_config.setdefault("zero_one_enabled", False)
    optimizer_config.setdefault("grad_clipping", True)
    if optimizer_config["grad_clipping"]:
        optimizer_config.setdefault("max_grad_norm", 1.0)
    config = {
        "tensor_parallel_size": tensor_parallel_size, "pipeline_parallel_size": pipeline_parallel_size,
        "expert_parallel_size": expert_parallel_size, "context_parallel_size": context_parallel_size,
        "optimizer_config": optimizer_config, "sequence_parallel": sequence_parallel,
        "activation_checkpoint_config": activation_checkpoint_config, "pad_model": pad_model,
        "mixed_precision_config": mixed_precision_config or {
            "use_master_weights": optimizer_config["zero_one_enabled"],
            "use_fp32_grad_acc": optimizer_config["zero_one_enabled"], "use_master_weights_in_ckpt": False},
    }
    record("neuronx_distributed_config", tensor_parallel_size=tensor_parallel_size,
           optimizer_config=optimizer_config, sequence_parallel=sequence_parallel)
    if torch.distributed.is_initialized():
        ps.initialize_model_parallel(tensor_model_parallel_size=tensor_parallel_size)
    return config


class NxDModel(torch.nn.Module):
    def __init__(self, module, nxd_config):
        super().__init__()
        self.module, self.nxd_config = module, nxd_config
        self.train()

    def original_module(self):
        return self.module

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)


def initialize_parallel_model(nxd_config, model_fn, include_buffers=False, *model_args, **model_kwargs):
    if not ps.model_parallel_is_initialized():
        ps.initialize_model_parallel(tensor_model_parallel_size=nxd_config["tensor_parallel_size"])
    model = model_fn(*model_args, **model_kwargs)
    # NxD moves the model to the XLA device keeping the tensor-parallel attributes; the stand-in's device is the CPU.
    tp_params = sorted(n for n, p in model.named_parameters() if getattr(p, "tensor_model_parallel", False))
    missing = [n for n, p in model.named_parameters() if getattr(p, "tensor_model_parallel", False)
               and not hasattr(p, "num_partitions")]
    if missing:  # NxD's preserve_parallel_attributes reads num_partitions and would fail
        raise AttributeError(f"tensor-parallel parameters without num_partitions: {missing}")
    model.to(xm.xla_device())
    record("initialize_parallel_model", tensor_parallel_parameters=len(tp_params))
    return NxDModel(model, nxd_config)


class NxDOptimizer(torch.optim.Optimizer):
    def __init__(self, optimizer, nxd_config):
        self.optimizer, self.nxd_config = optimizer, nxd_config
        self._grad_norm = None
        self.params = [p for g in self.param_groups for p in g["params"]]

    @property
    def grad_norm(self):
        return self._grad_norm

    @property
    def state(self):
        return self.optimizer.state

    @property
    def param_groups(self):
        return self.optimizer.param_groups

    @property
    def defaults(self):
        return self.optimizer.defaults

    def state_dict(self):
        return self.optimizer.state_dict()

    def load_state_dict(self, state_dict):
        self.optimizer.load_state_dict(state_dict)

    def zero_grad(self, set_to_none=False):
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def step(self, closure=None):
        config = self.nxd_config["optimizer_config"]
        record("NxDOptimizer.step", zero_one_enabled=config["zero_one_enabled"])
        if not config["zero_one_enabled"]:
            grads.bucket_allreduce_gradients([p.grad.data for p in self.params if p.grad is not None])
            if config["grad_clipping"]:
                self._grad_norm = grads.clip_grad_norm(self.params, config["max_grad_norm"])
        result = self.optimizer.step(closure=closure)
        if config["zero_one_enabled"]:
            self._grad_norm = self.optimizer.grad_norm
        return result


def initialize_parallel_optimizer(nxd_config, optimizer_class, parameters, **defaults):
    config = nxd_config["optimizer_config"]
    if config["zero_one_enabled"]:
        optimizer = NeuronZero1Optimizer(
            parameters, optimizer_class, grad_clipping=config["grad_clipping"], pin_layout=False,
            sharding_groups=ps.get_data_parallel_replica_groups(),
            grad_norm_groups=ps.get_tensor_model_parallel_replica_groups(), **defaults,
        )
    else:
        optimizer = optimizer_class(parameters, **defaults)
    record("initialize_parallel_optimizer", optimizer_class=optimizer_class.__name__,
           wrapper=type(optimizer).__name__, defaults=sorted(defaults))
    return NxDOptimizer(optimizer, nxd_config)
