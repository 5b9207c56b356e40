"""FSDP2 (``fully_shard``) over a patched model, run under torchrun by test_distributed.py: each decoder layer and
the root are sharded, each rank takes its slice of one batch, and rank 0 compares the gathered gradients with an
unsharded copy of the model run on the whole batch in its own process. The LM head is a unit of its own, never
called as a module (the fused head reads its weight), so its weight stays a shard until the head gathers it.

    python fsdp2_script.py MODEL_DIR BITS CHECKPOINTING OUT_JSON
"""
import copy
import json
import sys

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard

from swiftlora import FastLanguageModel


def main(model_dir, bits, checkpointing, out_json):
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    model, _ = FastLanguageModel.from_pretrained(model_dir, dtype=torch.float32, max_seq_length=96,
                                                 load_in_4bit=bits == "4")
    checkpointing = {"true": True, "false": False}.get(checkpointing, checkpointing)
    model = FastLanguageModel.get_peft_model(model, r=4, random_state=0, use_gradient_checkpointing=checkpointing)
    g = torch.Generator().manual_seed(1234)  # the same on every rank: ranks must start from the same weights
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    ids = torch.randint(5, 90, (2 * world, 23), generator=g).to(device)
    reference = None
    if rank == 0:
        full = copy.deepcopy(model)
        full(input_ids=ids, labels=ids).loss.backward()
        reference = {n: p.grad.double().cpu() for n, p in full.named_parameters() if p.grad is not None}
        del full
    base = model.get_base_model()
    fully_shard(base.lm_head)  # in its own unit, as accelerate may shard it: the fused head gathers its weight
    for layer in base.model.layers:
        fully_shard(layer)
    fully_shard(model)
    mine = ids[2 * rank:2 * rank + 2]
    loss = model(input_ids=mine, labels=mine).loss  # equal token counts per rank: the mean of means is the mean
    loss.backward()
    grads = {n: p.grad.full_tensor().double().cpu() for n, p in model.named_parameters() if p.grad is not None}
    if rank == 0:
        errors = {n: float((grads[n] - r).norm() / r.norm()) for n, r in reference.items() if n in grads}
        with open(out_json, "w") as f:
            json.dump({"errors": errors, "missing": sorted(set(reference) - set(grads)),
                       "sharded": type(next(model.parameters())).__name__, "world_size": world}, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
