"""ZeRO stage 3 inside real DeepSpeed engines on 2 gloo processes (CPU): the gathered weights
(trainer/zero.py, full_state_dict), the backward through a head's output, and the check for
non-finite weights, which at stage 3 each rank makes on its own partitions."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from trainer.models.output import HeadOutput


class Head(torch.nn.Module):
    """Returns a HeadOutput as every head of trainer/models does; its weights are partitioned."""

    def __init__(self):
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Linear(6, 9), torch.nn.BatchNorm1d(9), torch.nn.Tanh())
        self.W = torch.nn.Parameter(torch.randn(9, 4))

    def forward(self, x):
        h = self.body(x)
        return HeadOutput(scores=h @ self.W, global_scores=h.mean(dim=0, keepdim=True) @ self.W)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker(rank: int, world: int, port: int, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    os.environ.update(LOCAL_RANK=str(rank), DS_ACCELERATOR="cpu")
    import deepspeed
    import deepspeed.ops

    from trainer.loop import NonFiniteLoss, check_weights_finite
    from trainer.optim import RMSpropTF
    from trainer.zero import full_state_dict

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend="gloo")
    torch.manual_seed(0)
    model = Head()
    config = {
        "train_micro_batch_size_per_gpu": 4,
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
        "zero_allow_untested_optimizer": True,
        "gradient_clipping": 0.0,
        "steps_per_print": 10**9,
    }
    engine, *_ = deepspeed.initialize(model=model, optimizer=RMSpropTF(model.parameters(), lr=0.01), config=config)
    partitioned = all(p.numel() == 0 for p in engine.module.parameters())
    out = engine(torch.randn(4, 6, generator=torch.Generator().manual_seed(rank)))
    engine.backward(out.scores.square().mean() + out.global_scores.mean())  # needs W again: gathered
    engine.step()
    whole = full_state_dict(engine.module)
    kept = full_state_dict(engine.module, keep=False)
    consolidated = engine._zero3_consolidated_16bit_state_dict()  # DeepSpeed's own gathering, to rank 0
    check_weights_finite(engine.module, 1)
    if rank == 1:
        engine.module.W.ds_tensor.data[0] = float("nan")  # one element of rank 1's partition
    try:
        check_weights_finite(engine.module, 2)
        caught = ""
    except NonFiniteLoss as exc:
        caught = str(exc)
    results[rank] = (partitioned, whole, kept, consolidated, caught)
    # a process that exits with its gloo group open may abort ("terminate called without an active exception")
    torch.distributed.destroy_process_group()


@pytest.mark.integration
def test_stage_3_gathers_whole_weights_trains_through_head_outputs_and_checks_every_partition():
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(worker, args=(2, free_port(), results), nprocs=2)
        results = dict(results)
    for rank in (0, 1):
        partitioned, whole, kept, _, caught = results[rank]
        assert partitioned, "every parameter partitioned (threshold 0), else the test shows nothing"
        assert kept == {}
        assert whole["W"].shape == (9, 4) and whole["body.0.weight"].shape == (9, 6)
        assert "running_mean" in "".join(whole)  # the buffers too
        assert "not finite at step 2" in caught, "both ranks stop, not only the one holding the NaN"
    params = ["W", "body.0.weight", "body.0.bias", "body.1.weight", "body.1.bias"]  # buffers are each rank's own
    assert all(torch.equal(results[0][1][k], results[1][1][k]) for k in params), "the same on every rank"
    consolidated = results[0][3]
    assert consolidated.keys() == results[0][1].keys()
    assert all(torch.equal(consolidated[k], v) for k, v in results[0][1].items())
