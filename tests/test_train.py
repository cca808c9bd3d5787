"""Training: recipes, resume equivalence, DDP (2 processes, gloo), LoRA/DoRA merge."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from edgevlm import load_model
from edgevlm.runtime.chat import DEFAULT_TEMPLATE
from edgevlm.runtime.errors import EdgeVLMError
from edgevlm.train.loop import run
from edgevlm.train.recipe import LoraConfig, StageConfig, TrainConfig, load_recipe

from conftest import REPO, SMALL


def recipe(shapes_dir: Path, out: Path, **stage_kw) -> TrainConfig:
    s1 = StageConfig(name="pretrain", data=str(shapes_dir / "captions.json"), template="plain",
                     train=["integrator"], lr=1e-3, max_steps=3, batch_size=4)
    kw = dict(name="instruct", data=str(shapes_dir / "train.json"), train=["integrator", "llm"], lr=1e-3,
              max_steps=6, batch_size=4, save_every=3)
    kw.update(stage_kw)
    return TrainConfig(model="tiny", model_overrides=dict(SMALL), output_dir=str(out),
                       stages=[s1, StageConfig(**kw)])


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_model(path).state_dict()


def test_two_stage_trains_only_what_the_stage_says(shapes_dir, tmp_path):
    final = run(recipe(shapes_dir, tmp_path / "r"))
    start = load_model("tiny", **SMALL).state_dict()
    after1 = weights(tmp_path / "r" / "pretrain" / "model")
    changed1 = {k.split(".")[0] for k in start if not torch.equal(start[k], after1[k])}
    assert changed1 == {"integrator"}  # stage 1: vision tower and LLM frozen
    after2 = weights(final)
    changed2 = {k.split(".")[0] for k in start if not torch.equal(after1[k], after2[k])}
    assert changed2 == {"integrator", "llm"}
    log = [json.loads(l) for l in (tmp_path / "r" / "instruct" / "log.jsonl").read_text().splitlines()]
    model = load_model(final)
    counts = model.parameter_counts()
    assert log[0]["trainable_by_group"] == {"integrator": counts["integrator"], "llm": counts["llm"]}
    assert log[0]["trainable_params"] == counts["integrator"] + counts["llm"]
    assert log[-1]["event"] == "end" and log[-1]["peak_rss_mb"] > 0 and log[-1]["peak_rss_scope"] == "stage"
    assert model.cfg.chat_template == DEFAULT_TEMPLATE  # a stage without a template trains the model's


def test_a_chat_stage_makes_its_template_the_models(shapes_dir, tmp_path):
    """The runtime and every bundle prompt with the model's chat template: the one it was trained with."""
    final = run(recipe(shapes_dir, tmp_path / "r", template="vicuna_v1", max_steps=1, save_every=0))
    assert load_model(tmp_path / "r" / "pretrain" / "model").cfg.chat_template == DEFAULT_TEMPLATE  # plain: kept
    assert load_model(final).cfg.chat_template == "vicuna_v1"


def test_fresh_integrator_on_a_trained_model(shapes_dir, tmp_path):
    """Paradigm starting point: a trained vision tower + LLM, a new (differently shaped) integrator."""
    final = run(recipe(shapes_dir, tmp_path / "base"))
    with pytest.raises(EdgeVLMError, match="integrator.*shape mismatch|missing|unexpected"):
        load_model(final, integrator="mlp2x_gelu")  # the trained ldpv2 weights do not fit
    base = load_model(final)
    swapped = load_model(final, fresh=["integrator"], integrator="mlp2x_gelu")
    a, b = base.state_dict(), swapped.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a if not k.startswith("integrator."))
    assert swapped.cfg.integrator.name == "mlp2x_gelu" and swapped.n_visual_tokens == 576
    with pytest.raises(EdgeVLMError, match="fresh: unknown module"):
        load_model(final, fresh=["projector"])
    cfg = TrainConfig(model=str(final), fresh=["integrator"], model_overrides={"integrator": "mlp2x_gelu"},
                      output_dir=str(tmp_path / "single"),
                      stages=[StageConfig(name="single", data=str(shapes_dir / "captions.json"), template="plain",
                                          train=["integrator"], lr=1e-3, max_steps=2, batch_size=2)])
    with pytest.raises(EdgeVLMError, match="max_length 512 leaves no room for text after the image's 576"):
        run(cfg)
    cfg.stages[0].max_length = 700
    out = load_model(run(cfg))
    c = out.state_dict()
    assert all(torch.equal(a[k], c[k]) for k in a if not k.startswith("integrator."))
    assert out.cfg.integrator.name == "mlp2x_gelu"


def test_resume_after_kill_matches_uninterrupted(shapes_dir, tmp_path):
    full = run(recipe(shapes_dir, tmp_path / "full"))
    cfg = recipe(shapes_dir, tmp_path / "killed")
    assert run(cfg, stop_at_step=3) == tmp_path / "killed" / "instruct"  # "killed" after checkpoint 3
    assert not (tmp_path / "killed" / "final").exists()
    resumed = run(cfg, resume=True)
    a, b = weights(full), weights(resumed)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)


@pytest.mark.parametrize("dora", [False, True])
def test_lora_merges_into_plain_llama(shapes_dir, tmp_path, dora):
    cfg = recipe(shapes_dir, tmp_path / "lora", train=["integrator"], lora=LoraConfig(enabled=True, r=4, dora=dora),
                 max_steps=2, save_every=0)
    final = run(cfg)
    m = load_model(final)
    assert not any("lora" in k for k in m.state_dict())
    before = weights(tmp_path / "lora" / "pretrain" / "model")
    q = "llm.model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(before[q], m.state_dict()[q])  # adapters were merged into the base weight


def test_recipe_overrides_and_validation(tmp_path):
    cfg = load_recipe(str(REPO / "train/configs/tiny.yaml"), ["stages.1.lr=0.01", "output_dir=x"])
    assert cfg.stages[1].lr == 0.01 and cfg.output_dir == "x"
    assert load_recipe(str(REPO / "train/configs/tiny.yaml"), ["stages.1.lr=1e-3"]).stages[1].lr == 1e-3
    with pytest.raises(EdgeVLMError, match="expected float"):
        load_recipe(str(REPO / "train/configs/tiny.yaml"), ["stages.1.lr=fast"])
    with pytest.raises(EdgeVLMError, match="unknown key"):
        load_recipe(str(REPO / "train/configs/tiny.yaml"), ["stages.0.nope=1"])
    with pytest.raises(EdgeVLMError, match="LoRA"):
        load_recipe(str(REPO / "train/configs/tiny.yaml"), ["stages.1.lora.enabled=true"])
    with pytest.raises(EdgeVLMError, match="unknown module"):
        load_recipe(str(REPO / "train/configs/tiny.yaml"), ["stages.0.train=[vision]"])
    with pytest.raises(EdgeVLMError, match="template 'vicuna'; valid: vicuna_v1, llamacpp_vicuna, plain"):
        load_recipe(str(REPO / "train/configs/tiny.yaml"), ["stages.1.template=vicuna"])
    with pytest.raises(EdgeVLMError, match="strategy 'zero3'; valid: auto, ddp, fsdp, deepspeed"):
        load_recipe(str(REPO / "train/configs/tiny.yaml"), ["stages.1.strategy=zero3"])
    with pytest.raises(EdgeVLMError, match="strategy deepspeed needs the recipe's deepspeed=CONFIG.json"):
        load_recipe(str(REPO / "train/configs/tiny.yaml"), ["stages.1.strategy=deepspeed"])
    with pytest.raises(EdgeVLMError, match="deepspeed=CONFIG applies to every stage"):
        load_recipe(str(REPO / "train/configs/tiny.yaml"), ["deepspeed=ds.json", "stages.1.strategy=fsdp"])
    fsdp = load_recipe(str(REPO / "train/configs/tiny.yaml"), ["stages.1.strategy=fsdp", "stages.1.fsdp.cpu_offload=true"])
    assert fsdp.stages[1].fsdp.cpu_offload and not fsdp.stages[0].fsdp.cpu_offload


def test_ddp_two_processes_gloo(shapes_dir, tmp_path):
    """torchrun with 2 CPU ranks: disjoint data per rank, identical weights at the end."""
    out = tmp_path / "ddp"
    args = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
            str(REPO / "train/train.py"), "--recipe", str(REPO / "train/configs/tiny.yaml"),
            f"output_dir={out}", "model_overrides={vision__num_hidden_layers: 3, llm__num_hidden_layers: 2}",
            f"stages.0.data={shapes_dir / 'captions.json'}", "stages.0.max_steps=2", "stages.0.batch_size=2",
            f"stages.1.data={shapes_dir / 'train.json'}", "stages.1.max_steps=3", "stages.1.batch_size=2",
            "threads=1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(args, check=True, env=env, timeout=600, capture_output=True)
    ranks = [[json.loads(l) for l in (out / "instruct" / f"rank{r}.jsonl").read_text().splitlines()] for r in (0, 1)]
    ids = [{i for rec in log if "ids" in rec for i in rec["ids"]} for log in ranks]
    assert ids[0] and ids[1] and not (ids[0] & ids[1])
    assert ranks[0][-1]["trainable_sha256"] == ranks[1][-1]["trainable_sha256"]
    assert (out / "final" / "model.safetensors").is_file()


def test_deepspeed_config_without_deepspeed_is_a_clear_error(shapes_dir, tmp_path):
    pytest.importorskip("torch")
    try:
        import deepspeed  # noqa: F401
        pytest.skip("deepspeed is installed here; this checks the message when it is not")
    except ImportError:
        pass
    (tmp_path / "ds.json").write_text('{"zero_optimization": {"stage": 2}}')
    cfg = recipe(shapes_dir, tmp_path / "ds")
    cfg.deepspeed = str(tmp_path / "ds.json")
    with pytest.raises(EdgeVLMError, match="deepspeed is not installed"):
        run(cfg)
