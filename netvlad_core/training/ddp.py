"""torchrun plumbing shared by the recipes: the model in DistributedDataParallel with gradients *summed* over the
ranks (each rank's loss is already scaled by the global batch's size), and one optimiser step."""

from __future__ import annotations

import torch


def wrap_ddp(model: torch.nn.Module, device: torch.device):
    """``model`` in DistributedDataParallel with gradients summed over the ranks (:func:`sum_gradients`); buffers
    are not synced (eval mode: BatchNorm is frozen)."""
    import inspect

    from torch.nn.parallel import DistributedDataParallel

    no_buffer_sync = {"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(
        DistributedDataParallel.__init__).parameters else {"broadcast_buffers": False}  # torch < 2.14
    ddp_model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                        **no_buffer_sync)
    ddp_model.register_comm_hook(None, sum_gradients)
    return ddp_model


def sum_gradients(state, bucket):
    """DistributedDataParallel communication hook: all-reduce a gradient bucket as a *sum* (the default hook
    averages); each rank's loss is already scaled by the global batch's size."""
    import torch.distributed as torch_dist

    return torch_dist.all_reduce(bucket.buffer(), async_op=True).get_future().then(lambda fut: fut.value()[0])


def backward_and_step(loss: torch.Tensor, optimizer, scaler) -> None:
    """Backpropagate ``loss`` and take one optimiser step (through the fp16 gradient scaler when there is one)."""
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        optimizer.step()
