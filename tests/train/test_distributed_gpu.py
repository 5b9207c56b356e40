"""Data-parallel training on several GPUs (NCCL, one GPU per rank): DDP through ``swiftlora train`` and a user
script, FSDP2 through ``fully_shard`` and through accelerate. Needs 2 GPUs; skipped otherwise.

bf16 on the GPU: a different split of the batch rounds differently, so the comparisons with one GPU are at bf16
precision (the float32 equalities are the CPU tests' job, test_distributed.py).
"""
from __future__ import annotations

import json

import pytest
import torch

from tests.train.test_distributed import REPO, _adapters, _rel, _torchrun, job  # noqa: F401  (fixture)

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2,
                                 reason="needs 2 CUDA GPUs")]
pytest.importorskip("trl")

# fully_shard before torch 2.13 makes every sharded parameter require grad, which an integer tensor (NF4's packed
# uint8 weight) cannot: QLoRA under a hand-written fully_shard needs torch >= 2.13. accelerate's FSDP2 leaves the
# uint8 weights out of the sharding, so QLoRA through the Trainer also runs on older torch (2.11 on the H100s).
_TORCH = tuple(int(v) for v in torch.__version__.split("+")[0].split(".")[:2])
QLORA_FSDP2 = pytest.mark.skipif(_TORCH < (2, 13), reason="QLoRA under fully_shard needs torch >= 2.13")


def test_cli_on_two_gpus_matches_one_gpu(job):  # noqa: F811
    root, model_dir, data = job
    common = ["-m", "swiftlora", "train", "--model", str(model_dir), "--dataset", str(data), "--max-steps", "3",
              "--max-seq-length", "96", "--lora-r", "4", "--learning-rate", "5e-3", "--warmup-steps", "0",
              "--prompt", "Count to 2.", "--max-new-tokens", "4", "--save-merged", "merged_16bit", "--seed", "7"]
    _torchrun(1, common + ["--batch-size", "8", "--output-dir", str(root / "g1")], root, gpus=True)
    out = _torchrun(2, common + ["--batch-size", "2", "--grad-accum", "2", "--output-dir", str(root / "g2")], root,
                    gpus=True)
    assert out.count("Before training:") == 2
    one = json.loads((root / "g1" / "summary.json").read_text())
    two = json.loads((root / "g2" / "summary.json").read_text())
    assert two["world_size"] == 2
    assert torch.allclose(torch.tensor(two["losses"]), torch.tensor(one["losses"]), rtol=2e-2, atol=0)
    assert (root / "g2" / "merged-16bit" / "config.json").is_file()
    a, b = _adapters(root / "g2" / "lora"), _adapters(root / "g1" / "lora")
    assert max(_rel(a[k], b[k]) for k in a) < 0.25  # Adam's ±lr first steps on bf16 rounding: a coarse check


@pytest.mark.parametrize("bits,parallel", [(4, "ddp"), (16, "ddp"), (4, "fsdp2"), (16, "fsdp2")])
def test_user_script_on_two_gpus(job, bits, parallel):  # noqa: F811
    """TRL's SFTTrainer under DDP and under accelerate's FSDP2, QLoRA and 16-bit LoRA, vs one GPU."""
    root, model_dir, data = job
    script = str(REPO / "tests" / "train" / "ddp_user_script.py")
    one, two = root / f"u1-{bits}", root / f"u2-{bits}-{parallel}"
    if not (one / "rank0.json").is_file():  # the one-GPU run, shared by DDP and FSDP2
        _torchrun(1, [script, str(model_dir), str(data), str(one), "4", "1", str(bits)], root, gpus=True)
    _torchrun(2, [script, str(model_dir), str(data), str(two), "2", "1", str(bits), parallel], root, gpus=True)
    ref = json.loads((one / "rank0.json").read_text())
    ranks = [json.loads((two / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["world_size"] == 2 and ranks[0]["losses"] == ranks[1]["losses"]
    assert torch.allclose(torch.tensor(ranks[0]["losses"]), torch.tensor(ref["losses"]), rtol=2e-2, atol=0)
    a, b = _adapters(two / "lora"), _adapters(one / "lora")
    assert a.keys() == b.keys() and max(_rel(a[k], b[k]) for k in a) < 5e-2


@pytest.mark.parametrize("bits,checkpointing", [(16, "unsloth"), pytest.param(4, "unsloth", marks=QLORA_FSDP2),
                                                pytest.param(4, "false", marks=QLORA_FSDP2)])
def test_fsdp2_on_two_gpus_gives_the_full_batch_gradients(job, bits, checkpointing):  # noqa: F811
    root, model_dir, _ = job
    out = root / f"gpu-fsdp2-{bits}-{checkpointing}.json"
    _torchrun(2, [str(REPO / "tests" / "train" / "fsdp2_script.py"), str(model_dir), str(bits), checkpointing,
                  str(out)], root, gpus=True)
    result = json.loads(out.read_text())
    assert result["sharded"] == "DTensor" and not result["missing"] and len(result["errors"]) == 28
    assert max(result["errors"].values()) < 1e-4, result["errors"]


def test_ops_follow_their_tensors_device():
    """Each op launches on its inputs' GPU whatever the current device is (no global state, no device 0
    assumptions): results on cuda:1 with cuda:0 current equal those computed with cuda:1 current."""
    import swiftlora.ops as ops

    torch.cuda.set_device(0)
    dev = torch.device("cuda", 1)
    x = torch.randn(37, 256, device=dev, dtype=torch.bfloat16)
    w = torch.rand(256, device=dev, dtype=torch.bfloat16) + 0.5
    logits = torch.randn(29, 1000, device=dev, dtype=torch.bfloat16)
    labels = torch.randint(0, 1000, (29,), device=dev)
    weight = torch.randn(512, 256, device=dev, dtype=torch.bfloat16)

    def run():
        q = ops.nf4_quantize(weight, blocksize=64, compress_statistics=True)
        return [ops.rms_norm(x, w, 1e-6), ops.swiglu(x, x.flip(0)), ops.cross_entropy(logits, labels), q.packed,
                ops.nf4_dequantize(q.packed, q.absmax, q.absmax2, q.code2, q.offset, blocksize=64,
                                   shape=weight.shape),
                ops.fused_linear_cross_entropy(x[:29], weight, labels[:29] % 512)]

    elsewhere = run()
    torch.cuda.synchronize(dev)
    with torch.cuda.device(dev):
        here = run()
    for a, b in zip(elsewhere, here):
        assert a.device == dev and torch.equal(a, b)
