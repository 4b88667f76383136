"""Stand-in for ``neuronx_distributed.parallel_layers.parallel_state`` (tests only): the groups of
``initialize_model_parallel`` as gloo process groups.

NxD arranges the world as ``[pp, dp, tp]`` with the tensor-parallel dimension contiguous (adjacent ranks form a
tensor-parallel group), except for tp 4 on trn1, where its groups are strided across the node; with
``BMOJO_STANDIN_NXD_LAYOUT=strided`` the stand-in strides them the same way for any tp (tensor-parallel group
``i`` = ranks ``i, i + dp, i + 2 dp, ...``), so that a test can show the loop takes its ranks from here.
"""

import os

import torch.distributed as dist

from _standin_log import record

_STATE: dict = {}


def initialize_model_parallel(
    tensor_model_parallel_size=1,
    pipeline_model_parallel_size=1,
    context_parallel_size=1,
    expert_model_parallel_size=1,
    skip_collective_init=False,
    lnc_size=1,
    mesh_only=False,
):
    assert dist.is_initialized()
    if (pipeline_model_parallel_size, context_parallel_size, expert_model_parallel_size) != (1, 1, 1):
        raise NotImplementedError("the stand-in models tensor and data parallelism only")
    world, rank = dist.get_world_size(), dist.get_rank()
    tp = min(tensor_model_parallel_size, world)
    if world % tp:
        raise RuntimeError(f"invalid implied data parallel degree: `world_size` ({world}) is not divisible by {tp}")
    dp = world // tp
    layout = os.environ.get("BMOJO_STANDIN_NXD_LAYOUT", "contiguous")
    if layout == "strided":
        tp_groups = [[i + k * dp for k in range(tp)] for i in range(dp)]
        dp_groups = [list(range(j * dp, (j + 1) * dp)) for j in range(tp)]
    else:
        tp_groups = [[k * tp + i for i in range(tp)] for k in range(dp)]
        dp_groups = [[k * tp + i for k in range(dp)] for i in range(tp)]
    # Every rank takes part in creating every group (NxD's CPU mode does the same with gloo).
    tp_pgs = [dist.new_group(g, backend="gloo") for g in tp_groups]
    dp_pgs = [dist.new_group(g, backend="gloo") for g in dp_groups]
    mine_tp = next(i for i, g in enumerate(tp_groups) if rank in g)
    mine_dp = next(i for i, g in enumerate(dp_groups) if rank in g)
    _STATE.update(
        tp_groups=tp_groups, dp_groups=dp_groups, tp_group=tp_pgs[mine_tp], dp_group=dp_pgs[mine_dp],
        tp_ranks=tp_groups[mine_tp], dp_ranks=dp_groups[mine_dp],
    )
    record("initialize_model_parallel", tensor_model_parallel_size=tensor_model_parallel_size, world=world,
           tp_groups=tp_groups, dp_groups=dp_groups)


def model_parallel_is_initialized():
    return bool(_STATE)


def get_tensor_model_parallel_group(as_list=False):
    return _STATE["tp_groups"] if as_list else _STATE["tp_group"]


def get_tensor_model_parallel_replica_groups():
    return _STATE["tp_groups"]


def get_tensor_model_parallel_size():
    return len(_STATE["tp_ranks"])


def get_tensor_model_parallel_rank():
    return _STATE["tp_ranks"].index(dist.get_rank())


def get_data_parallel_group(as_list=False):
    return _STATE["dp_groups"] if as_list else _STATE["dp_group"]


def get_data_parallel_replica_groups():
    return _STATE["dp_groups"]


def get_data_parallel_size():
    return len(_STATE["dp_ranks"])


def get_data_parallel_rank():
    return _STATE["dp_ranks"].index(dist.get_rank())


def get_pipeline_model_parallel_size():
    return 1


def get_context_model_parallel_size():
    return 1


def get_expert_model_parallel_size():
    return 1


def is_global_rank_zero():
    return dist.get_rank() == 0


def ranks_of(group) -> list:
    """The global ranks of a gloo group made here (for the call log)."""
    return dist.get_process_group_ranks(group)
