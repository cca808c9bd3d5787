"""FSDP2 on CPU processes (gloo): parity with one process, bit-exact resume, LoRA under sharding,
consolidation + ONNX export, a two-node launch on 127.0.0.1; the memory planner."""
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from edgevlm import load_model
from edgevlm.runtime.configio import dump_yaml
from edgevlm.runtime.errors import EdgeVLMError
from edgevlm.train.loop import run
from edgevlm.train.recipe import FsdpConfig, LoraConfig, StageConfig, TrainConfig

from conftest import REPO, SMALL

# 160 tokens = the 144 visual tokens + 16 text tokens; long_captions keeps the captions that are
# longer, so every sample has the same number of label tokens and the mean of two ranks' losses is
# the loss of their 4 samples together
CAPTION_TOKENS = 160
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def long_captions(shapes_dir, tmp_path_factory) -> Path:
    """The ShapesVQA captions truncated at CAPTION_TOKENS (all with equally many label tokens)."""
    from edgevlm.runtime.processor import Processor
    from edgevlm.train.batches import VQADataset
    from edgevlm.train.data.llava import load_llava_records

    model = load_model("tiny", **SMALL)
    ds = VQADataset(load_llava_records(str(shapes_dir / "captions.json")).records,
                    Processor.create(model.tokenizer, "plain", model.cfg.preprocess), CAPTION_TOKENS,
                    model.n_visual_tokens, "conversation")
    n_labels = [int((ds[i].labels != -100).sum()) for i in range(len(ds))]
    records = json.loads((shapes_dir / "captions.json").read_text())
    keep = [dict(r, image=str(shapes_dir / r["image"])) for r, n in zip(records, n_labels) if n == max(n_labels)]
    assert len(keep) >= 16
    out = tmp_path_factory.mktemp("long_captions") / "captions.json"
    out.write_text(json.dumps(keep))
    return out


def one_stage(data: Path, out: Path, **kw) -> TrainConfig:
    stage = dict(name="pretrain", data=str(data), template="plain",
                 train=["vision_tower", "integrator", "llm"], lr=1e-3, max_steps=4, batch_size=2,
                 max_length=CAPTION_TOKENS, save_every=2, log_every=1, warmup_ratio=0.0, strategy="fsdp")
    stage.update(kw)
    return TrainConfig(model="tiny", model_overrides=dict(SMALL), output_dir=str(out), threads=1,
                       stages=[StageConfig(**stage)])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(cfg: TrainConfig, tmp_path: Path, *extra: str, env=ENV) -> None:
    recipe = tmp_path / f"{Path(cfg.output_dir).name}.yaml"
    dump_yaml(cfg, recipe)
    args = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
            str(REPO / "train/train.py"), "--recipe", str(recipe), *extra]
    done = subprocess.run(args, env=env, timeout=600, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]


def losses(out: Path, stage: str = "pretrain") -> dict[int, float]:
    log = [json.loads(line) for line in (out / stage / "log.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in log if "loss" in r}


def test_fsdp_matches_one_process_and_resumes_bit_exactly(long_captions, tmp_path):
    """2 ranks x 2 samples == 1 process x 4 samples (float tolerance); kill at a checkpoint + --resume
    == the uninterrupted FSDP run, bit for bit (activation checkpointing on in every FSDP run)."""
    ac = ["stages.0.fsdp.activation_checkpointing=true"]
    ref = one_stage(long_captions, tmp_path / "single", batch_size=4, strategy="ddp")
    run(ref)
    full = one_stage(long_captions, tmp_path / "full")
    torchrun(full, tmp_path, *ac)
    ref_loss, fsdp_loss = losses(tmp_path / "single"), losses(tmp_path / "full")
    assert sorted(fsdp_loss) == [1, 2, 3, 4] and fsdp_loss[4] < fsdp_loss[1]
    for step in ref_loss:
        assert fsdp_loss[step] == pytest.approx(ref_loss[step], rel=1e-4, abs=1e-4), step
    a, b = load_model(tmp_path / "single" / "final").state_dict(), load_model(tmp_path / "full" / "final").state_dict()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-3, atol=1e-5, msg=k)

    killed = one_stage(long_captions, tmp_path / "killed")
    torchrun(killed, tmp_path, *ac, "--stop-at-step", "2")
    assert not (tmp_path / "killed" / "final").exists()
    assert sorted(losses(tmp_path / "killed")) == [1, 2]
    torchrun(killed, tmp_path, *ac, "--resume")
    assert losses(tmp_path / "killed") == fsdp_loss  # steps 3-4 came from the sharded checkpoint
    c = load_file(str(tmp_path / "killed" / "final" / "model.safetensors"))
    d = load_file(str(tmp_path / "full" / "final" / "model.safetensors"))
    assert c.keys() == d.keys() and all(torch.equal(c[k], d[k]) for k in c)


def test_two_nodes_lora_under_fsdp_consolidates_and_exports(long_captions, tmp_path):
    """Two torchrun "nodes" on 127.0.0.1 (c10d rendezvous), LoRA on the LLM + the integrator: only
    they get optimizer state and change; the consolidated model loads and exports to ONNX."""
    from edgevlm.export.to_onnx import export_onnx
    from edgevlm.runtime.manifest import read_manifest
    from edgevlm.train.sharded_ckpt import saved_optimizer_keys

    cfg = one_stage(long_captions, tmp_path / "lora", train=["integrator"], lora=LoraConfig(enabled=True, r=4),
                    max_steps=2, save_every=0)
    port = free_port()
    nodes = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(r),
         "--nproc_per_node", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}",
         "--rdzv-id", "edgevlm-test", str(REPO / "train/train.py"), "--recipe", str(_dump(cfg, tmp_path))],
        env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
        for r in (0, 1)]
    try:
        errs = [n.communicate(timeout=600)[1] for n in nodes]
    finally:
        for n in nodes:  # one node failing leaves the other waiting at the rendezvous
            if n.poll() is None:
                os.killpg(n.pid, signal.SIGKILL)  # torchrun and its worker
    assert [n.returncode for n in nodes] == [0, 0], errs[0][-3000:] + errs[1][-3000:]
    log = [json.loads(line) for line in (tmp_path / "lora" / "pretrain" / "log.jsonl").read_text().splitlines()]
    assert log[0]["world_size"] == 2 and set(log[0]["trainable_by_group"]) == {"integrator", "lora"}
    ids = [{i for line in (tmp_path / "lora" / "pretrain" / f"rank{r}.jsonl").read_text().splitlines()
            for i in json.loads(line).get("ids", [])} for r in (0, 1)]
    assert ids[0] and ids[1] and not ids[0] & ids[1]  # each node trained on its own samples

    keys = saved_optimizer_keys(tmp_path / "lora" / "pretrain" / "checkpoints" / "step-000002")
    fqns = {k.split(".", 2)[2].rsplit(".", 1)[0] for k in keys}  # optim.state.<fqn>.<exp_avg|...>
    assert fqns and all("lora_" in f or f.startswith("integrator.") for f in fqns), sorted(fqns)[:5]
    assert any("lora_A" in f for f in fqns) and any("lora_B" in f for f in fqns)
    assert sum(f.startswith("integrator.") for f in fqns) == len(dict(load_model("tiny", **SMALL).integrator.named_parameters()))

    start, final = load_model("tiny", **SMALL).state_dict(), load_model(tmp_path / "lora" / "final")
    after = final.state_dict()
    assert after.keys() == start.keys()  # adapters merged: a plain model again
    changed = {k for k in start if not torch.equal(start[k], after[k])}
    assert any(k.startswith("integrator.") for k in changed)
    assert "llm.model.layers.0.self_attn.q_proj.weight" in changed  # an adapter merged into its target
    frozen = [k for k in start if k.startswith(("vision_tower.", "llm.model.embed_tokens", "llm.lm_head"))
              or "norm" in k]
    assert frozen and not changed & set(frozen)

    bundle = export_onnx(final, tmp_path / "bundle", progress=False, token_check=0)
    assert read_manifest(bundle).target == "onnx"


def _dump(cfg: TrainConfig, tmp_path: Path) -> Path:
    path = tmp_path / "recipe.yaml"
    dump_yaml(cfg, path)
    return path


def test_fsdp_refuses_text_only_records_and_mixed_checkpoints(shapes_dir, tmp_path):
    data = json.loads((shapes_dir / "train.json").read_text())[:4]
    del data[1]["image"]
    data[1]["conversations"][0]["value"] = data[1]["conversations"][0]["value"].replace("<image>", "").strip()
    for rec in data:
        if "image" in rec:
            rec["image"] = str(shapes_dir / rec["image"])
    (tmp_path / "mixed.json").write_text(json.dumps(data))
    cfg = one_stage(tmp_path / "mixed.json", tmp_path / "t", template="", max_length=320)
    with pytest.raises(EdgeVLMError, match="strategy fsdp needs an image in every record .1 are text-only"):
        run(cfg)
    if not torch.cuda.is_available():
        with pytest.raises(EdgeVLMError, match="fsdp.cpu_offload needs CUDA GPUs"):
            run(one_stage(shapes_dir / "captions.json", tmp_path / "o", fsdp=FsdpConfig(cpu_offload=True)))
    # a ddp checkpoint is not resumed as fsdp (nor the other way round)
    ddp = one_stage(shapes_dir / "captions.json", tmp_path / "d", strategy="ddp", max_steps=2, save_every=1)
    run(ddp, stop_at_step=1)
    ddp.stages[0].strategy = "fsdp"
    with pytest.raises(EdgeVLMError, match="written by a ddp run; resume it with stages.N.strategy=ddp"):
        run(ddp, resume=True)


# --- the memory planner ----------------------------------------------------------------------------


def _saved_bytes_per_token(layer, call, skip: set[int], tokens: int) -> float:
    """Bytes autograd keeps for backward (distinct storages, weights and ``skip`` excluded) per token."""
    skip = skip | {p.untyped_storage().data_ptr() for p in layer.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in skip:
            seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        call()
    return sum(seen.values()) / tokens


def test_activation_formulas_match_real_layers():
    """The planner's bytes per token equal what a bf16 LLaMA layer / CLIP block keeps for backward,
    at shapes the formulas were not derived from (inputs shared by all layers excluded)."""
    from transformers import CLIPVisionConfig, LlamaConfig
    from transformers.models.clip.modeling_clip import CLIPEncoderLayer
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    from edgevlm.model.config import LLMConfig, VisionConfig
    from edgevlm.train.memory_plan import clip_block_bytes_per_token, llama_layer_bytes_per_token

    bf16, n = torch.bfloat16, 48
    llm = LLMConfig(hidden_size=320, intermediate_size=864, num_attention_heads=5, num_key_value_heads=5)
    hf = LlamaConfig(hidden_size=320, intermediate_size=864, num_attention_heads=5, num_key_value_heads=5,
                     attn_implementation="sdpa")
    layer = LlamaDecoderLayer(hf, 0).to(bf16)
    x = torch.randn(1, n, 320, dtype=bf16, requires_grad=True)
    pos = torch.arange(n)[None]
    cos, sin = (t.to(bf16) for t in LlamaRotaryEmbedding(hf)(x, pos))
    mask = torch.full((1, 1, n, n), float("-inf"), dtype=bf16).triu(1)
    shared = {t.untyped_storage().data_ptr() for t in (pos, cos, sin, mask)}
    got = _saved_bytes_per_token(layer, lambda: layer(x, attention_mask=mask, position_ids=pos,
                                                      position_embeddings=(cos, sin)), shared, n)
    assert got == pytest.approx(llama_layer_bytes_per_token(llm), rel=0.02)

    vision = VisionConfig(hidden_size=192, intermediate_size=640, num_attention_heads=3)
    block = CLIPEncoderLayer(CLIPVisionConfig(hidden_size=192, intermediate_size=640, num_attention_heads=3,
                                              attn_implementation="sdpa")).to(bf16)
    v = torch.randn(1, n, 192, dtype=bf16, requires_grad=True)
    got = _saved_bytes_per_token(block, lambda: block(v, None, None), set(), n)
    assert got == pytest.approx(clip_block_bytes_per_token(vision), rel=0.02)


def test_planner_counts_are_the_models(shapes_dir):
    from edgevlm.train.lora import set_trainable
    from edgevlm.train.memory_plan import lora_parameters, measure_sizes

    stage = StageConfig(data="x.json", train=["vision_tower", "integrator"], lora=LoraConfig(enabled=True, r=4))
    model = load_model("tiny", **SMALL)
    sizes = measure_sizes(model.cfg, stage)
    assert sizes.total == sum(model.parameter_counts().values())
    groups = dict(set_trainable(model, stage))  # the real trainable set, with peft's adapters
    assert sizes.trainable == sum(p.numel() for g in ("vision_tower", "integrator") for p in groups[g])
    assert lora_parameters(model.cfg.llm, stage.lora) == sum(p.numel() for p in groups["lora"])
    assert sizes.lora_trainable == sum(p.numel() for ps in groups.values() for p in ps)


def test_plan_cli_prints_the_table(capsys):
    from edgevlm.cli import main

    recipe = str(REPO / "train/configs/mobilevlm_finetune.yaml")
    assert main(["train", "--plan", recipe, "--gpus", "8", "model=mobilevlm-3b"]) == 0
    out = capsys.readouterr().out
    assert "model mobilevlm-3b, 8 GPU(s)" in out and "| fits 24 GB | fits 40 GB | fits 80 GB |" in out
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in out.splitlines() if line.startswith("| ") and "strategy" not in line}
    assert set(rows) == {"ddp", "fsdp", "fsdp + cpu offload", "lora r=16 (ddp)"}
    ddp, fsdp, off = rows["ddp"], rows["fsdp"], rows["fsdp + cpu offload"]
    assert float(fsdp[2]) == pytest.approx(float(ddp[2]) / 8, abs=0.06)  # AdamW moments sharded 8 ways
    assert float(off[2]) == 0 and float(off[5]) > 0  # offloaded: the moments live in CPU memory
    assert ddp[6] == "no" and fsdp[6] == "yes"  # 16 bytes x 3B parameters replicated: no 24 GB GPU
    assert float(ddp[0]) * 2**30 / 4 > 3e9  # fp32 parameters of a 3B model
    assert main(["train", "--plan", recipe, "--gpus", "0"]) == 2
    assert main(["train", "stages.0.lr=1"]) == 2  # neither --recipe nor --plan: one line, status 2
    assert "give --recipe RECIPE" in capsys.readouterr().err


def test_deepspeed_zero2_on_cpu_processes_matches_one_process(long_captions, tmp_path):
    """Opt-in (deepspeed is in no extra): DeepSpeed ZeRO-2 on its CPU accelerator, 2 gloo ranks x 2
    samples == 1 process x 4 samples. Its first run JIT-builds DeepSpeed's shared-memory comm op."""
    pytest.importorskip("deepspeed")
    run(one_stage(long_captions, tmp_path / "single", batch_size=4, strategy="ddp", max_steps=3, save_every=0))
    (tmp_path / "ds.json").write_text('{"zero_optimization": {"stage": 2}}')
    cfg = one_stage(long_captions, tmp_path / "ds", strategy="deepspeed", max_steps=3, save_every=0)
    cfg.deepspeed = str(tmp_path / "ds.json")
    torchrun(cfg, tmp_path, env={**ENV, "DS_ACCELERATOR": "cpu"})
    ref, got = losses(tmp_path / "single"), losses(tmp_path / "ds")
    assert sorted(got) == [1, 2, 3] and all(got[s] == pytest.approx(ref[s], rel=1e-4, abs=1e-4) for s in ref), (got, ref)
