"""Stand-in for ``NeuronZero1Optimizer`` (tests only), modelled on torch-xla's ``ZeroRedundancyOptimizer`` that it
extends: every parameter is padded along dim 0 to a multiple of the sharding group's size and this rank keeps
chunk ``local_rank`` of it (in ``optimizer_dtype``) in ``base_optimizer``; ``step`` reduce-scatters the gradients
(averaged) over the sharding group, clips with the global norm (``grads.get_grad_norm`` over the shards, summed over
the tensor-parallel and sharding groups), updates the shards and all-gathers them into the parameters. gloo has
no reduce-scatter: an all-reduce followed by taking the chunk gives the same values."""

import torch
import torch.distributed as dist
import torch.nn.functional as F

from _standin_log import record

from ..parallel_layers import grads
from ..parallel_layers import parallel_state as ps


class NeuronZero1Optimizer(torch.optim.Optimizer):
    def __init__(self, params, optimizer_class, optimizer_dtype=None, grad_clipping=True, max_norm=None,
                 pin_layout=True, sharding_groups=None, grad_norm_groups=None, lazy_init=False,
                 bucket_cap_mb_all_gather=0, bucket_cap_mb_reduce_scatter=0, use_grad_acc_hook=False,
                 save_master_weights=False, higher_cc_precision=False, **defaults):
        if not ps.model_parallel_is_initialized():
            raise RuntimeError("initialize_model_parallel need to be called before creating NeuronZero1Optimizer")
        super().__init__(params, defaults)
        self.optimizer_class, self.defaults = optimizer_class, defaults
        self.optimizer_dtype = optimizer_dtype if optimizer_dtype is not None else torch.float32
        self.grad_clipping, self.max_norm = grad_clipping, max_norm if max_norm is not None else 1.0
        self._sharding_groups = sharding_groups or ps.get_data_parallel_replica_groups()
        self._grad_norm_groups = grad_norm_groups
        self._grad_norm = None
        self.inited = False
        record("NeuronZero1Optimizer", optimizer_class=optimizer_class.__name__, sharding_groups=self._sharding_groups,
               grad_norm_groups=grad_norm_groups, grad_clipping=grad_clipping, max_norm=self.max_norm)
        if not lazy_init:
            self.init_zero()

    @property
    def grad_norm(self):
        return self._grad_norm

    def init_zero(self):
        rank = dist.get_rank()
        group = next(g for g in self._sharding_groups if rank in g)
        self.local_world_size, self.local_rank = len(group), list(group).index(rank)
        sharded = []
        for param_group in self.param_groups:
            shards = [torch.nn.Parameter(self._shard(p.detach()).to(self.optimizer_dtype).clone(), p.requires_grad)
                      for p in param_group["params"]]
            sharded.append({**param_group, "params": shards})
        self.base_optimizer = self.optimizer_class(sharded, **self.defaults)
        self._sync(self.param_groups, self.base_optimizer.param_groups)
        self.inited = True

    def _shard(self, tensor):
        extra = -tensor.size(0) % self.local_world_size
        if extra:
            tensor = F.pad(tensor, [0, 0] * (tensor.dim() - 1) + [0, extra])
        return tensor.chunk(self.local_world_size)[self.local_rank]

    @staticmethod
    def _sync(src, dst):
        for s, d in zip(src, dst, strict=True):
            d.update({k: v for k, v in s.items() if k != "params"})

    def _pairs(self):
        for group, sharded in zip(self.param_groups, self.base_optimizer.param_groups, strict=True):
            yield from zip(group["params"], sharded["params"], strict=True)

    @torch.no_grad()
    def step(self, closure=None):
        assert self.inited, "must call init_zero() first"
        self._sync(self.param_groups, self.base_optimizer.param_groups)
        group = ps.get_data_parallel_group()
        record("zero1_reduce_scatter", group=ps.ranks_of(group))
        for param, shard in self._pairs():
            if param.grad is not None:
                full = param.grad.detach().clone()
                dist.all_reduce(full, group=group)
                shard.grad = self._shard(full / self.local_world_size).to(self.optimizer_dtype)
        if self.grad_clipping:
            shards = []
            for param, shard in self._pairs():
                if shard.grad is not None:
                    if getattr(param, "tensor_model_parallel", False):
                        shard.tensor_model_parallel = True
                    shards.append(shard)
            self._grad_norm = grads.get_grad_norm(shards, zero1_optimizer=True,
                                                  zero1_optimizer_groups=self._sharding_groups).detach().clone()
            grads.clip_grads_with_norm(shards, self._grad_norm, self.max_norm)
        self.base_optimizer.step()
        self.base_optimizer.zero_grad(set_to_none=True)
        for param, shard in self._pairs():
            if param.grad is not None:
                parts = [torch.empty_like(shard) for _ in range(self.local_world_size)]
                dist.all_gather(parts, shard.data.contiguous(), group=group)
                param.data.copy_(torch.cat(parts)[: param.size(0)].to(param.dtype))
        self._sync(self.base_optimizer.param_groups, self.param_groups)
