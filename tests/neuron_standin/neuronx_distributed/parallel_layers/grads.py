"""Stand-in for ``neuronx_distributed.parallel_layers.grads`` (tests only): NxD's data-parallel gradient
all-reduce and its tensor-parallel-aware global norm, on gloo."""

import torch
import torch.distributed as dist

from _standin_log import record

from . import parallel_state as ps


def bucket_allreduce_gradients(grads_list):
    """Average ``grads_list`` over the data-parallel group (NxD: divide by the dp size, then sum-all-reduce)."""
    group = ps.get_data_parallel_group()
    record("bucket_allreduce_gradients", group=ps.ranks_of(group), count=len(grads_list))
    for grad in grads_list:
        grad.data /= ps.get_data_parallel_size()
        dist.all_reduce(grad.data, group=group)


def get_grad_norm(parameters, norm_type=2, zero1_optimizer=False, zero1_optimizer_groups=None, force_spmd=True):
    """NxD's global 2-norm: squares of tensor-parallel gradients count on every rank, those of replicated ones are
    divided by the tp size (force_spmd), the sum is all-reduced over the tensor-parallel group and, for ZeRO-1
    shards, over the data-parallel (sharding) group."""
    assert float(norm_type) == 2.0
    params = list(parameters)
    dtype, device = params[0].dtype, params[0].device
    sharded = torch.zeros(1, dtype=dtype, device=device)
    replicated = torch.zeros(1, dtype=dtype, device=device)
    for p in params:
        if p.grad is None:
            continue
        if getattr(p, "tensor_model_parallel", False):
            sharded += torch.norm(p.grad.detach(), 2.0) ** 2
        else:
            replicated += torch.norm(p.grad.detach(), 2.0) ** 2
    total = replicated / ps.get_tensor_model_parallel_size() + sharded
    groups = {"tp": ps.ranks_of(ps.get_tensor_model_parallel_group())}
    if ps.get_tensor_model_parallel_size() > 1:
        dist.all_reduce(total, group=ps.get_tensor_model_parallel_group())
    if zero1_optimizer_groups is not None:
        groups["zero1"] = ps.ranks_of(ps.get_data_parallel_group())
        dist.all_reduce(total, group=ps.get_data_parallel_group())
    record("get_grad_norm", groups=groups)
    return torch.pow(total, 0.5)


def clip_grads_with_norm(parameters, total_norm, max_norm):
    coeff = max_norm / (total_norm + 1.0e-6)
    one = torch.tensor(1.0, dtype=total_norm.dtype, device=total_norm.device)
    for p in parameters:
        if p.grad is not None:
            p.grad.detach().mul_(torch.where(coeff < 1, coeff.to(total_norm.dtype), one))
    return total_norm


def clip_grad_norm(parameters, max_norm, norm_type=2, zero1_optimizer=False, zero1_optimizer_groups=None,
                   force_spmd=True):
    params = list(parameters)
    total = get_grad_norm(params, norm_type, zero1_optimizer, zero1_optimizer_groups, force_spmd)
    return clip_grads_with_norm(params, total, max_norm)
