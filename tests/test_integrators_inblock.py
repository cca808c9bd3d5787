"""Integrators that act inside the LLM (vlora, bottleneck_adapter, gated_prefix): exact zero-init,
image dependence after training, GQA shapes, KV-cache generation, checkpoints, LoRA, training
stages, export refusals and the listing. Real tiny models and data throughout."""
import copy
import re

import pytest
import torch
from transformers import LlamaForCausalLM

from conftest import SMALL
from edgevlm import load_model
from edgevlm.runtime.errors import EdgeVLMError

KWARGS = {"vlora": dict(dim=32, depth=1, rank=4, every=1),  # every layer: both tiny layers get deltas
          "bottleneck_adapter": dict(rank=8),
          "gated_prefix": dict(prompt_len=4)}
NAMES = sorted(KWARGS)
QUESTION = "What colour is the circle?"


def build(name):
    return load_model("tiny", integrator=name, integrator_kwargs=KWARGS[name], **SMALL)


def plain_llm(model) -> LlamaForCausalLM:
    """The same LLM weights without any hook: the LLM's keys must be exactly the plain LLaMA's."""
    llm = LlamaForCausalLM(model.llm.config)
    llm.load_state_dict(model.llm.state_dict(), strict=True)
    return llm.eval()


def logits(model, pixels, ids):
    with torch.no_grad():
        return model(pixels, [torch.tensor(ids)]).logits[0]  # [T, V]


@pytest.fixture(scope="module")
def batch(shapes_dir):
    from edgevlm.runtime.processor import Processor
    from edgevlm.train.batches import VQADataset, collate
    from edgevlm.train.data.llava import load_llava_records

    records = load_llava_records(str(shapes_dir / "train.json")).records[:4]
    model = build("gated_prefix")  # tokenizer and preprocessing are the same for every integrator
    ds = VQADataset(records, Processor.create(model.tokenizer, "vicuna_v1", model.cfg.preprocess), 256, 0)
    return collate([ds[i] for i in range(len(ds))]), records


@pytest.fixture(scope="module", params=NAMES)
def trained(request, batch):
    """(name, model) after a few AdamW steps on a real batch with only the integrator trainable."""
    name, (data, _) = request.param, batch
    model = build(name)
    for p in model.parameters():
        p.requires_grad_(False)
    params = list(model.integrator.parameters())
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=1e-2)
    model.train()
    for _ in range(3):
        opt.zero_grad()
        model(data["pixel_values"], data["input_ids"], data["labels"]).loss.backward()
        opt.step()
    return name, model.eval()


# --- initialisation ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_zero_init_is_exactly_the_plain_llm(name, batch):
    model = build(name).eval()
    llm = plain_llm(model)
    text = model.prompt_ids(QUESTION, with_image=False)
    ones = torch.ones(1, len(text), dtype=torch.long)
    with torch.no_grad():
        ref = llm(input_ids=torch.tensor([text]), attention_mask=ones).logits[0]
    assert torch.equal(logits(model, None, text), ref)
    pixels = batch[0]["pixel_values"][:1]
    with_image = model.prompt_ids(QUESTION, with_image=True)
    with torch.no_grad():
        embeds = model.embed_with_images(torch.tensor(with_image), model.encode_images(pixels))[None]
        ref = llm(inputs_embeds=embeds, attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long)).logits[0]
    assert torch.equal(logits(model, pixels, with_image), ref)  # vlora / gated_prefix: 0 visual tokens
    assert embeds.shape[1] == len(with_image) - 1 + model.n_visual_tokens


def test_placement_and_touched_modules():
    from edgevlm.model.integrators import INTEGRATORS
    from edgevlm.model.integrators.base import placement

    assert placement(INTEGRATORS.get("ldpv2")) == "tokens"
    assert {n: placement(INTEGRATORS.get(n)) for n in NAMES} == {
        "vlora": "weights", "bottleneck_adapter": "in_block", "gated_prefix": "in_block"}
    m = build("vlora")
    assert "model.layers.1.self_attn.k_proj" in m.integrator.touched_modules()
    assert m.n_visual_tokens == 0 and build("bottleneck_adapter").n_visual_tokens == 144


# --- after training ------------------------------------------------------------------------------


def test_outputs_depend_on_the_image_and_grads_reach_the_integrator(trained, batch):
    name, model = trained
    data, _ = batch
    ids = model.prompt_ids(QUESTION, with_image=True)
    px = data["pixel_values"]
    a, b = logits(model, px[0:1], ids), logits(model, px[1:2], ids)
    assert (a - b).abs().max() > 1e-4, "two different images gave the same logits"
    model.integrator.requires_grad_(True)
    model.zero_grad()
    model(px, data["input_ids"], data["labels"]).loss.backward()
    model.integrator.requires_grad_(False)
    trainable = {"vlora": ["generators.q.head.weight", "generators.k.blocks.0.linear1.weight", "lora_b.v_1"],
                 "bottleneck_adapter": ["attn.0.down.weight", "mlp.1.up.weight", "tokens.mlp.mlp.0.weight"],
                 "gated_prefix": ["prompts", "gates", "image_proj.weight"]}[name]
    grads = {n: p.grad for n, p in model.integrator.named_parameters()}
    for n in trainable:
        assert grads[n] is not None and grads[n].abs().sum() > 0, n
    assert all(p.grad is None for p in model.llm.parameters())  # frozen LLM


def test_batch_rows_are_conditioned_per_sample(trained, batch):
    _, model = trained
    px = batch[0]["pixel_values"]
    ids = model.prompt_ids(QUESTION, with_image=True)
    text = model.prompt_ids(QUESTION, with_image=False)
    with torch.no_grad():
        out = model(px[0:2], [torch.tensor(ids), torch.tensor(ids)]).logits  # [2, T, V]
        mixed = model(px[1:2], [torch.tensor(text), torch.tensor(ids)]).logits  # text-only row first
    torch.testing.assert_close(out[0], logits(model, px[0:1], ids), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[1], logits(model, px[1:2], ids), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mixed[0, :len(text)], logits(model, None, text), atol=1e-5, rtol=1e-5)


def test_grouped_kv_shapes():
    model = build("vlora")
    c = model.cfg.llm
    kv_dim = c.num_key_value_heads * c.hidden_size // c.num_attention_heads
    assert c.num_key_value_heads < c.num_attention_heads and kv_dim == 128
    b = model.integrator.lora_b
    assert b["k_0"].shape == b["v_1"].shape == (kv_dim, 4) and b["q_0"].shape == b["o_1"].shape == (256, 4)
    w = model.image_weights(torch.zeros(2, 3, 336, 336))
    assert w.shape == (2, 5, 2, 256, 4)  # [images, targets, layers, d_in, rank]
    prefix = build("gated_prefix")
    attn = prefix.llm.model.layers[0].self_attn
    k, v = prefix.integrator._prompt_kv(0, attn, 3, torch.float32)
    assert k.shape == v.shape == (1, c.num_attention_heads, 4, 64)  # KV heads repeated over query groups


# --- generation, checkpoints, LoRA --------------------------------------------------------------


def test_generate_matches_full_sequence_greedy(trained, batch):
    from edgevlm.model.torch_backend import TorchBackend
    from edgevlm.runtime.generate import split_segments

    _, model = trained
    image = batch[1][0].image_path
    ids = model.prompt_ids(QUESTION, with_image=True)
    px = model.preprocess(image)
    result = model.generate(image, QUESTION, max_new_tokens=6, ignore_eos=True)
    seq, manual, last = list(ids), [], []
    for _ in range(6):
        step = logits(model, px, seq)[-1]
        last.append(step)
        manual.append(int(step.argmax()))
        seq.append(manual[-1])
    assert result.token_ids == manual
    backend = TorchBackend(model)  # the cache path, logits compared with the full-sequence forward
    visual = backend.encode_image(px.numpy())
    assert visual.shape[1] == model.n_visual_tokens
    got = [backend.prefill(split_segments(ids, visual))] + [backend.decode(t) for t in manual[:-1]]
    for g, ref in zip(got, last):
        torch.testing.assert_close(torch.from_numpy(g), ref, atol=1e-4, rtol=1e-4)


def test_save_load_round_trip(trained, batch, tmp_path):
    from edgevlm.model.checkpoint import save_model

    _, model = trained
    ids = model.prompt_ids(QUESTION, with_image=True)
    px = batch[0]["pixel_values"][:1]
    loaded = load_model(save_model(model, tmp_path / "m"))
    assert torch.equal(logits(loaded, px, ids), logits(model, px, ids))


def test_hooks_survive_lora_wrap_merge_and_deepcopy(trained, batch):
    from edgevlm.train.lora import apply_lora, merge_lora
    from edgevlm.train.recipe import LoraConfig, StageConfig

    _, model = trained
    ids = model.prompt_ids(QUESTION, with_image=True)
    px = batch[0]["pixel_values"][:1]
    ref = logits(model, px, ids)
    twin = copy.deepcopy(model)
    apply_lora(twin, StageConfig(lora=LoraConfig(enabled=True, r=4)))
    torch.testing.assert_close(logits(twin, px, ids), ref, atol=1e-6, rtol=1e-6)  # LoRA B starts at 0
    merge_lora(twin)
    assert type(twin.llm) is LlamaForCausalLM
    torch.testing.assert_close(logits(twin, px, ids), ref, atol=1e-6, rtol=1e-6)
    with torch.no_grad():
        for p in twin.integrator.parameters():
            p.add_(0.05)
    assert not torch.allclose(logits(twin, px, ids), ref)  # the copy's hooks read the copy's weights
    assert torch.equal(logits(model, px, ids), ref)


def test_fresh_in_llm_integrator_on_a_trained_token_model(tiny_model, tmp_path):
    """A new vlora between a trained tower and LLM starts exactly as that LLM (zero deltas)."""
    from edgevlm.model.checkpoint import save_model

    src = save_model(tiny_model, tmp_path / "ldpv2")
    model = load_model(src, fresh=["integrator"], integrator="vlora", integrator_kwargs=KWARGS["vlora"])
    text = model.prompt_ids(QUESTION, with_image=False)
    assert torch.equal(logits(model, None, text), logits(tiny_model, None, text))
    assert model.n_visual_tokens == 0 and model.integrator.touched_modules()


@pytest.mark.parametrize("name", NAMES)
def test_training_stages_integrator_only_then_lora(name, shapes_dir, tmp_path):
    from edgevlm.train.loop import run
    from edgevlm.train.recipe import LoraConfig, StageConfig, TrainConfig

    kw = dict(data=str(shapes_dir / "train.json"), lr=1e-3, max_steps=2, batch_size=4, log_every=1000,
              max_records=8)
    cfg = TrainConfig(model="tiny", model_overrides={**SMALL, "integrator": name, "integrator_kwargs": KWARGS[name]},
                      output_dir=str(tmp_path), threads=1, stages=[
                          StageConfig(name="integrator", train=["integrator"], **kw),
                          StageConfig(name="lora", train=["integrator"], lora=LoraConfig(enabled=True, r=4), **kw)])
    final = load_model(run(cfg))
    start, first = build(name), load_model(tmp_path / "integrator" / "model")
    changed = lambda a, b, prefix: any(not torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items()
                                       if k.startswith(prefix))
    assert changed(first, start, "integrator.") and not changed(first, start, "llm.")
    assert changed(final, first, "integrator.") and changed(final, first, "llm.")  # LoRA merged into the LLM
    assert {k for k in final.state_dict() if k.startswith("llm.")} == {k for k in start.state_dict()
                                                                       if k.startswith("llm.")}


# --- exports and listing -------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_every_export_target_is_refused_with_its_reason(name, tmp_path):
    from edgevlm.export.common import require_exportable
    from edgevlm.export.to_coreml import export_coreml
    from edgevlm.export.to_gguf import export_gguf
    from edgevlm.export.to_onnx import export_onnx
    from edgevlm.model.integrators import EXPORT_TARGETS, export_refusal

    model = build(name)
    for target in EXPORT_TARGETS:
        reason = export_refusal(name, target)
        assert reason and len(reason) > 40, target
        with pytest.raises(EdgeVLMError, match=re.escape(f"cannot be exported to {target}: {reason}")):
            require_exportable(model, target)
    for target, export in (("onnx", export_onnx), ("gguf", export_gguf), ("coreml", export_coreml)):
        with pytest.raises(EdgeVLMError, match=f"cannot be exported to {target}"):
            export(model, tmp_path / target)
    assert not any(tmp_path.iterdir())


def test_listing_shows_placement_and_zero_tokens(capsys):
    from edgevlm.cli import main
    from edgevlm.train.listing import integrator_rows

    rows = {r["integrator"]: r for r in integrator_rows("tiny")}
    assert rows["vlora"]["visual_tokens"] == rows["gated_prefix"]["visual_tokens"] == 0
    assert rows["bottleneck_adapter"]["visual_tokens"] == 144 and rows["vlora"]["placement"] == "weights"
    assert main(["list", "integrators"]) == 0
    line = next(l for l in capsys.readouterr().out.splitlines() if l.startswith("vlora "))
    assert line.split()[1:3] == ["weights", "0"]


def test_vlora_cost_accounting_matches_torch_flop_counter():
    from torch.utils.flop_counter import FlopCounterMode

    from edgevlm.model.config import IntegratorConfig, preset_config
    from edgevlm.model.integrators import build_integrator

    cfg = preset_config("mobilevlm-1.7b")
    with torch.device("meta"):
        m = build_integrator(IntegratorConfig("vlora"), 1024, 2048, 24, llm=cfg.llm)
        x = torch.empty(1, 576, 1024)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        m.image_weights(x)
    cost = m.cost()
    assert cost["generator_flops_per_image"] == counter.get_total_flops()
    assert cost["generator_params"] + cost["b_params"] == sum(p.numel() for p in m.parameters())
    assert cost["prefill_flops_saved"] > cost["generator_flops_per_image"] > 0
    assert 0 < cost["delta_overhead_per_token"] < 0.01
