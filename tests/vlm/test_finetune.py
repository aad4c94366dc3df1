"""Full / LoRA / QLoRA set-up (peft + bitsandbytes), the merge back into a plain PaliGemma, the adapter format."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from torch import nn

from genlab.train.optim import set_train_mode
from genlab.vlm import finetune as ft
from genlab.vlm.paligemma import PaliGemma, PaliGemmaConfig
from genlab.vlm.recipes import init_weights, tiny_text, tiny_vision

torch.set_num_threads(1)
CFG = PaliGemmaConfig(vision=replace(tiny_vision(), num_hidden_layers=1),
                      text=replace(tiny_text(), vocab_size=64, pad_token_id=0, bos_token_id=2, eos_token_id=1),
                      image_token_id=63).validate()


def base(seed: int = 0) -> PaliGemma:
    torch.manual_seed(seed)
    m = PaliGemma(CFG)
    init_weights(m, 0.05)
    return m


def batch(seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 60, (2, 24), generator=g)
    ids[:, :16] = CFG.image_token_id
    return {"input_ids": ids, "pixel_values": torch.randn(2, 3, 32, 32, generator=g)}


def perturb(model: nn.Module) -> None:
    """Non-zero adapters (LoRA's B starts at zero, which would make every merge trivially right)."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=g))


def test_lora_trains_r_times_in_plus_out_per_adapted_layer():
    lora = ft.LoraSettings(r=4, alpha=8, dropout=0.0)
    model = ft.adapt(base(), "lora", lora, ft.QuantSettings())
    linears = [m for n, m in base().language_model.named_modules() if n.rsplit(".", 1)[-1] in ft.DECODER_LINEARS]
    expected = sum(4 * (m.in_features + m.out_features) for m in linears)  # A: r x in, B: out x r
    assert len(linears) == 7 * CFG.text.num_hidden_layers
    assert ft.parameter_report(model)["trainable_parameters"] == expected
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert all("lora_" in n and "language_model" in n for n in trained)


def test_full_mode_freezes_the_vision_tower_and_projector_unless_asked():
    model = ft.adapt(base(), "full", ft.LoraSettings(), ft.QuantSettings())
    assert not any(p.requires_grad for p in model.vision_tower.parameters())
    assert not any(p.requires_grad for p in model.multi_modal_projector.parameters())
    assert all(p.requires_grad for p in model.language_model.parameters())
    set_train_mode(model, True)  # what the engine calls
    assert not model.vision_tower.training and model.language_model.training  # frozen parts stay in eval mode
    opened = ft.adapt(base(), "full", ft.LoraSettings(), ft.QuantSettings(), train_vision=True, train_projector=True)
    assert all(p.requires_grad for p in opened.parameters())


def test_qlora_puts_peft_4bit_layers_on_every_decoder_linear():
    import bitsandbytes as bnb
    from peft.tuners.lora.bnb import Linear4bit as LoraLinear4bit

    model = ft.adapt(base(), "qlora", ft.LoraSettings(r=4, dropout=0.0), ft.QuantSettings())
    adapted = [m for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in ft.DECODER_LINEARS
               and "language_model" in n]
    assert len(adapted) == 7 * CFG.text.num_hidden_layers
    assert not any(hasattr(m, "lora_A") for m in model.vision_tower.modules())  # the vision tower stays plain
    assert all(isinstance(m, LoraLinear4bit) and isinstance(m.get_base_layer(), bnb.nn.Linear4bit) for m in adapted)
    report = ft.parameter_report(model)
    # Packed NF4: half a byte per weight plus the (double-quantised) block constants.
    n4 = sum(m.in_features * m.out_features for m in adapted)
    assert n4 / 2 <= report["weight_bytes"]["nf4"] <= n4 / 2 * 1.2


def test_a_plain_lora_layer_over_4bit_weights_is_refused():
    model = base()
    ft.quantize_decoder(model, ft.QuantSettings())
    model.is_loaded_in_4bit = False  # peft would then wrap the 4-bit layers with its plain LoRA layer
    import peft

    wrapped = peft.get_peft_model(model, ft.lora_config(ft.LoraSettings(r=4)))
    with pytest.raises(RuntimeError, match="4-bit LoRA"):
        ft.check_4bit_adapters(wrapped, ft.DECODER_LINEARS)


def test_qlora_gradients_equal_lora_on_the_dequantised_weights_even_after_an_eval_forward():
    """The 4-bit model's LoRA gradients match a plain model holding the de-quantised weights; an
    eval-mode forward in between (as evaluation during training does) changes nothing (bitsandbytes
    would otherwise repack the weights on AVX512-BF16 CPUs into a layout with no backward)."""
    lora = ft.LoraSettings(r=4, dropout=0.0)
    q = ft.adapt(base(), "qlora", lora, ft.QuantSettings())
    perturb(q)
    plain = ft.merged_model(q, "qlora")  # plain weights = dequantised + merged adapters; re-split below
    ref = ft.adapt(base(), "lora", lora, ft.QuantSettings())
    with torch.no_grad():  # the reference: de-quantised base weights, the same adapters
        for (name, layer), (_, ref_layer) in zip(
                [(n, m) for n, m in q.named_modules() if hasattr(m, "lora_A") and hasattr(m, "get_base_layer")],
                [(n, m) for n, m in ref.named_modules() if hasattr(m, "lora_A") and hasattr(m, "get_base_layer")]):
            ref_layer.get_base_layer().weight.copy_(ft.dequantized(layer.get_base_layer()).weight)
            ref_layer.lora_A["default"].weight.copy_(layer.lora_A["default"].weight)
            ref_layer.lora_B["default"].weight.copy_(layer.lora_B["default"].weight)
    q.eval()
    with torch.no_grad():
        q(**batch())  # an eval-mode forward first
    grads = []
    for m in (q, ref):
        m.train()
        m.zero_grad()
        m(**batch()).float().logsumexp(-1).mean().backward()
        grads.append({n: p.grad.clone() for n, p in m.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], rtol=1e-4, atol=1e-6, msg=n)
    with torch.no_grad():
        torch.testing.assert_close(plain(**batch()), ref.eval()(**batch()), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("mode, embeddings", [("full", False), ("lora", False), ("qlora", False), ("lora", True),
                                              ("qlora", True)])
def test_merged_model_computes_what_the_trained_model_computes(mode, embeddings):
    model = ft.adapt(base(), mode, ft.LoraSettings(r=4, dropout=0.0, train_embeddings=embeddings),
                     ft.QuantSettings(), train_projector=mode == "lora")
    perturb(model)
    model.eval()
    with torch.no_grad():
        want = model(**batch())
        merged = ft.merged_model(model, mode)
        got = merged(**batch())
        assert type(merged) is PaliGemma
        assert not any(hasattr(m, "lora_A") for m in merged.modules())
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)  # (float rounding of W + B A)
        torch.testing.assert_close(model(**batch()), want)  # the trained model is left as it was


def test_adapter_folder_is_peft_format_and_loads_back(tmp_path):
    import peft

    model = ft.adapt(base(), "lora", ft.LoraSettings(r=4, dropout=0.0), ft.QuantSettings(), train_projector=True)
    perturb(model)
    ft.save_adapter(model, tmp_path / "adapter")
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir() if p.suffix in (".json", ".safetensors")) == \
        ["adapter_config.json", "adapter_model.safetensors"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".adapter-")]  # no scratch folder left
    loaded = peft.PeftModel.from_pretrained(base(), str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch()), model.eval()(**batch()))


def test_vision_targets_put_adapters_in_the_siglip_layers_too():
    lora = ft.LoraSettings(r=4, dropout=0.0, vision_targets=("q_proj", "fc1"))
    model = ft.adapt(base(), "lora", lora, ft.QuantSettings())
    plain = base()
    vis = [m for n, m in plain.vision_tower.named_modules() if n.rsplit(".", 1)[-1] in ("q_proj", "fc1")]
    dec = [m for n, m in plain.language_model.named_modules() if n.rsplit(".", 1)[-1] in ft.DECODER_LINEARS]
    expected = sum(4 * (m.in_features + m.out_features) for m in vis + dec)
    assert len(vis) == 2 * CFG.vision.num_hidden_layers
    assert ft.parameter_report(model)["trainable_parameters"] == expected
    assert not any(p.requires_grad for n, p in model.named_parameters() if "vision_tower" in n and "lora_" not in n)


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_gradient_checkpointing_gives_the_same_gradients(mode):
    grads = []
    for on in (False, True):
        model = ft.adapt(base(), mode, ft.LoraSettings(r=4, dropout=0.0), ft.QuantSettings())
        perturb(model)
        ft.base_of(model).language_model.gradient_checkpointing = on
        set_train_mode(model, True)
        labels = batch()["input_ids"].masked_fill(torch.arange(24) < 18, -100)
        out = model(**batch(), labels=labels)
        out.loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], msg=n)
