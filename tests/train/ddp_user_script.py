"""A user's training script as it runs under torchrun (used by test_distributed.py): FastLanguageModel +
get_peft_model + TRL's SFTTrainer with default trainer arguments, then every rank calls the saving methods.

    python ddp_user_script.py MODEL_DIR DATA_JSONL OUT_DIR PER_DEVICE_BATCH GRAD_ACCUM BITS [fsdp2]
"""
import json
import sys

import torch
from datasets import Dataset
from trl import SFTConfig, SFTTrainer

from swiftlora import FastLanguageModel
from swiftlora.distributed import barrier, placement


# accelerate's FSDP2 (GPUs only: on CPU accelerate falls back to DDP): each decoder layer and the root sharded
FSDP2 = {"fsdp": "full_shard auto_wrap",
         "fsdp_config": {"version": 2, "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
                         "transformer_layer_cls_to_wrap": ["Qwen2DecoderLayer"], "reshard_after_forward": True,
                         "activation_checkpointing": False}}


def main(model_dir, data_path, out_dir, batch, accum, bits, parallel="ddp"):
    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    model, tok = FastLanguageModel.from_pretrained(model_dir, dtype=dtype, max_seq_length=96,
                                                   load_in_4bit=bits == "4")
    model = FastLanguageModel.get_peft_model(model, r=4, lora_alpha=8, random_state=0)  # "unsloth" checkpointing
    rows = [json.loads(line) for line in open(data_path)]
    data = Dataset.from_list([{"messages": r["messages"]} for r in rows])
    args = SFTConfig(output_dir=f"{out_dir}/trainer", max_steps=3, per_device_train_batch_size=int(batch),
                     gradient_accumulation_steps=int(accum), learning_rate=0.05, warmup_steps=0, optim="sgd", lr_scheduler_type="constant", logging_steps=1,
                     save_strategy="no", report_to=[], seed=0, max_length=96, use_cpu=not torch.cuda.is_available(),
                     gradient_checkpointing=True, **(FSDP2 if parallel == "fsdp2" else {}))
    trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tok)
    trainer.train()
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    if parallel == "fsdp2":  # sharded parameters: the trainer gathers the full state dict on every rank
        trainer.save_model(f"{out_dir}/lora")
    else:
        model.save_pretrained_merged(f"{out_dir}/lora", tok, save_method="lora")  # every rank calls; rank 0 writes
    barrier()
    p = placement()
    with open(f"{out_dir}/rank{p.rank}.json", "w") as f:
        json.dump({"losses": losses, "world_size": p.world_size}, f)


if __name__ == "__main__":
    main(*sys.argv[1:])
