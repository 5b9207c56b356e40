"""Data-parallel training under torchrun, on CPU with the gloo backend and 2 processes: the losses and final
adapters equal a single-process run with the same global batch; only rank 0 writes; patched models pickle.

The GPU versions (NCCL, one GPU per rank) are in test_distributed_gpu.py. The single-process runs go through
torchrun too (one process), so both sides see the launcher's environment
(e.g. its one-thread default) and differ only in the data split.
"""
from __future__ import annotations

import copy
import io
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.models.helpers import save_tiny

pytest.importorskip("trl")
pytest.importorskip("torch.distributed")
if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)

REPO = Path(__file__).resolve().parents[2]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    model_dir = save_tiny(root / "tiny", "qwen2", dtype=torch.float32, seed=1)
    g = torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))
    rows = []
    for i in range(32):
        n = int(torch.randint(1, 12, (1,), generator=g))
        rows.append({"messages": [{"role": "user", "content": f"Count to {n}, item {i}."},
                                  {"role": "assistant", "content": " ".join(str(k) for k in range(1, n + 2))}]})
    data = root / "chats.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows))
    return root, model_dir, data


def _launch(launcher: list[str], args: list[str], cwd: Path, gpus: bool) -> str:
    """Runs ``python -m LAUNCHER ARGS``; on CPU (gloo, no GPU visible) unless ``gpus`` (one GPU per rank, NCCL)."""
    # the repository root for tests.*; swiftlora itself as this interpreter imports it (installed, or on PYTHONPATH)
    # (made absolute: the launch runs in another directory)
    path = [str(REPO)] + [os.path.abspath(p) for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path), "TOKENIZERS_PARALLELISM": "false"}
    if not gpus:
        env["CUDA_VISIBLE_DEVICES"] = ""
    result = subprocess.run([sys.executable, "-m", *launcher, *args], cwd=cwd, env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return result.stdout


def _torchrun(nproc: int, args: list[str], cwd: Path, gpus: bool = False) -> str:
    """``torchrun --nproc_per_node=nproc ARGS``."""
    return _launch(["torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"], args, cwd, gpus)


def _adapters(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(directory / "adapter_model.safetensors")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30))


def _accelerate(nproc: int, args: list[str], cwd: Path) -> str:
    """``accelerate launch --multi_gpu --num_processes nproc ARGS`` with no GPU visible: gloo ranks on CPU."""
    return _launch(["accelerate.commands.launch", "--multi_gpu", f"--num_processes={nproc}", "--num_machines=1",
                    "--mixed_precision=no", "--dynamo_backend=no"], args, cwd, gpus=False)


def test_cli_under_torchrun_matches_one_process_with_accumulation(job):
    """``swiftlora train`` (16-bit LoRA, float32): 2 ranks x batch 2 x accumulation 2 = 1 process x batch 8, under
    torchrun and under accelerate launch."""
    root, model_dir, data = job
    common = ["-m", "swiftlora", "train", "--model", str(model_dir), "--dataset", str(data), "--max-steps", "3",
              "--max-seq-length", "96", "--lora-r", "4", "--dtype", "float32", "--no-4bit", "--learning-rate",
              "5e-3", "--warmup-steps", "0", "--prompt", "Count to 2.", "--max-new-tokens", "4",
              "--save-merged", "none", "--seed", "7"]
    single = _torchrun(1, common + ["--batch-size", "8", "--output-dir", str(root / "one")], root)
    multi = _torchrun(2, common + ["--batch-size", "2", "--grad-accum", "2", "--output-dir", str(root / "two")],
                      root)
    assert single.count("Before training:") == 2  # (printed before and again after training)
    assert multi.count("Before training:") == 2, "only rank 0 may print the job's report"
    one = json.loads((root / "one" / "summary.json").read_text())
    two = json.loads((root / "two" / "summary.json").read_text())
    assert two["world_size"] == 2 and one["world_size"] == 1
    assert len(one["losses"]) == len(two["losses"]) == 3
    assert torch.allclose(torch.tensor(two["losses"]), torch.tensor(one["losses"]), rtol=1e-5, atol=0)
    a, b = _adapters(root / "two" / "lora"), _adapters(root / "one" / "lora")
    assert a.keys() == b.keys()
    worst = max(_rel(a[k], b[k]) for k in a)
    assert worst < 1e-4, worst
    assert sorted(p.name for p in (root / "two").iterdir()) == ["lora", "loss_curve.png", "summary.json", "trainer"]
    launched = _accelerate(2, common + ["--batch-size", "2", "--grad-accum", "2", "--output-dir", str(root / "acc")],
                           root)
    assert launched.count("Before training:") == 2
    acc = json.loads((root / "acc" / "summary.json").read_text())
    assert acc["world_size"] == 2
    assert torch.allclose(torch.tensor(acc["losses"]), torch.tensor(one["losses"]), rtol=1e-5, atol=0)


def test_user_script_qlora_under_torchrun_matches_one_process(job):
    """A plain user script (default trainer arguments, so DDP searches for unused parameters; "unsloth"
    checkpointing; every rank calls save_pretrained_merged): QLoRA on NF4. TRL's defaults train under bf16
    autocast and keep QLoRA adapters in bf16, so each half batch's gradients are rounded to bf16 before they are
    averaged: agreement to bf16 precision.
    (SGD: Adam's first steps move each weight by about ±lr whatever the gradient's size, so a bf16 rounding that
    flips a tiny gradient's sign changes the weight by a whole step — no way to compare adapters.)"""
    root, model_dir, data = job
    script = str(REPO / "tests" / "train" / "ddp_user_script.py")
    _torchrun(1, [script, str(model_dir), str(data), str(root / "q1"), "4", "1", "4"], root)
    _torchrun(2, [script, str(model_dir), str(data), str(root / "q2"), "2", "1", "4"], root)
    one = json.loads((root / "q1" / "rank0.json").read_text())
    ranks = [json.loads((root / "q2" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["world_size"] == 2 and ranks[0]["losses"] == ranks[1]["losses"]
    assert torch.allclose(torch.tensor(ranks[0]["losses"]), torch.tensor(one["losses"]), rtol=2e-3, atol=0)
    a, b = _adapters(root / "q2" / "lora"), _adapters(root / "q1" / "lora")
    worst = max(_rel(a[k], b[k]) for k in a)
    assert worst < 3e-2, worst
    assert not list((root / "q2").glob("lora.*")), "no temporary directories left by other ranks"


@pytest.mark.parametrize("bits,checkpointing", [(16, "unsloth"), (4, "unsloth"), (4, "false")])
def test_fsdp2_sharded_gradients_equal_the_full_batch(job, bits, checkpointing):
    """FSDP2 ``fully_shard`` over the patched model (each layer and the root), 16-bit LoRA and QLoRA: the gathered
    gradients of two ranks' half batches equal one unsharded copy's gradient on the whole batch."""
    root, model_dir, _ = job
    out = root / f"fsdp2-{bits}-{checkpointing}.json"
    _torchrun(2, [str(REPO / "tests" / "train" / "fsdp2_script.py"), str(model_dir), str(bits), checkpointing,
                  str(out)], root)
    result = json.loads(out.read_text())
    assert result["sharded"] == "DTensor" and result["world_size"] == 2 and not result["missing"]
    assert len(result["errors"]) == 28  # lora_A and lora_B of 7 projections x 2 layers
    assert max(result["errors"].values()) < 1e-5, result["errors"]


@pytest.mark.parametrize("bits", [4, 16])
def test_patched_model_pickles_and_deepcopies(job, bits, tmp_path):
    from swiftlora import FastLanguageModel

    _, model_dir, _ = job
    model, tok = FastLanguageModel.from_pretrained(str(model_dir), dtype=torch.float32, max_seq_length=96,
                                                   load_in_4bit=bits == 4)
    model = FastLanguageModel.get_peft_model(model, r=4, target_modules=TARGETS, random_state=0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05)  # so the adapters change the output
    ids = torch.randint(5, 90, (2, 11))
    labels = ids.clone()
    expected = model(input_ids=ids, labels=labels)
    expected.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()

    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    copies = {"deepcopy": copy.deepcopy(model), "pickle": pickle.loads(pickle.dumps(model)),
              "torch.save": torch.load(buffer, weights_only=False)}
    for how, clone in copies.items():
        assert type(clone) is type(model)
        assert type(clone.get_base_model()) is type(model.get_base_model()), how
        out = clone(input_ids=ids, labels=labels)
        assert torch.equal(out.loss, expected.loss), how
        out.loss.backward()
        got = {n: p.grad for n, p in clone.named_parameters() if p.grad is not None}
        assert got.keys() == grads.keys(), how
        assert all(torch.equal(got[n], grads[n]) for n in grads), how
        clone.save_pretrained_merged(tmp_path / how, tok, save_method="lora")  # methods survive the copy
        assert (tmp_path / how / "adapter_model.safetensors").is_file()


def test_saving_a_sharded_model_names_the_way_out(job, tmp_path):
    """Rank 0 cannot read FSDP2 shards alone: the saving methods say so (instead of a storage error)."""
    from torch.distributed.tensor import DTensor, Replicate, init_device_mesh

    from swiftlora import FastLanguageModel

    _, model_dir, _ = job
    model, tok = FastLanguageModel.from_pretrained(str(model_dir), dtype=torch.float32, max_seq_length=96,
                                                   load_in_4bit=False)
    model = FastLanguageModel.get_peft_model(model, r=4, random_state=0)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(29500 + os.getpid() % 1000))
    torch.distributed.init_process_group("gloo", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        name, p = next((n, p) for n, p in model.named_parameters() if "lora_A" in n)
        owner = model.get_submodule(name.rsplit(".", 1)[0])
        owner.weight = torch.nn.Parameter(DTensor.from_local(p.detach(), mesh, [Replicate()]))
        with pytest.raises(RuntimeError, match="FSDP2 shards.*trainer.save_model"):
            model.save_pretrained_merged(tmp_path / "out", tok, save_method="lora")
        assert not (tmp_path / "out").exists()
    finally:
        torch.distributed.destroy_process_group()


def test_launcher_environment_errors_and_placement(monkeypatch):
    """The launcher's variables: read before the process group exists; a malformed one is a clear error."""
    from swiftlora import distributed

    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "4")
    p = distributed.placement()
    assert (p.rank, p.local_rank, p.world_size, p.is_main) == (3, 1, 4, False)
    saved = distributed.on_main_process(lambda: "written")
    assert saved() is None  # rank 3 does not write
    monkeypatch.setenv("RANK", "0")
    assert saved() == "written"
    monkeypatch.setenv("LOCAL_RANK", "gpu1")
    with pytest.raises(ValueError, match="LOCAL_RANK must be an integer"):
        distributed.placement()


def test_shutdown_destroys_the_process_group(tmp_path):
    """distributed.shutdown(): a no-op without a process group; with one (a one-rank gloo group here), the group is
    destroyed after the barrier, so the process ends without the group's threads (the CLI calls it last)."""
    from swiftlora import distributed

    distributed.shutdown()
    assert not torch.distributed.is_initialized()
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        assert distributed.placement().world_size == 1 and torch.distributed.is_initialized()
        distributed.shutdown()
        assert not torch.distributed.is_initialized()
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
