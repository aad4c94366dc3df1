"""Make a PaliGemma trainable in one of three modes, and turn the trained model back into a plain one.

* ``full``: every parameter of the decoder trains (the vision tower and projector by option);
* ``lora``: peft's LoRA on the decoder's linear layers (q/k/v/o and gate/up/down by default);
  only the low-rank factors (and, by option, the vision tower / projector) train;
* ``qlora``: the same LoRA over a base whose decoder linears are stored in 4 bits (NF4 with double
  quantisation, bitsandbytes' ``Linear4bit``); peft puts its 4-bit LoRA layers on them, which
  ``adapt`` checks (peft only picks them when the model says it is loaded in 4 bits).

The memory story (docs/theory/vlm.md): full fine-tuning keeps fp32 weights, gradients and two AdamW
moments for every parameter (16 bytes each); LoRA keeps the frozen weights alone (4 bytes) plus the
small adapters; QLoRA stores the frozen decoder linears in ~0.52 bytes (4.127 bits) each.

``merged_model`` folds the adapters into the weights (for QLoRA into the de-quantised NF4 weights, so
the exported model computes exactly what was trained), giving a plain PaliGemma that
``hf_io.save_paligemma`` writes as a Hugging Face folder; ``save_adapter`` writes peft's adapter
format (adapter_config.json + adapter_model.safetensors) beside it.

Only this module imports peft and bitsandbytes, and only when a mode needs them.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Literal

import torch
from torch import nn

from genlab.config import Check, positive
from genlab.errors import ConfigError
from genlab.train.optim import freeze
from genlab.vlm.paligemma import PaliGemma

Mode = Literal["full", "lora", "qlora"]
MODES: tuple[str, ...] = ("full", "lora", "qlora")
DECODER_LINEARS: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
VISION_LINEARS: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoraSettings:
    """peft LoRA on the decoder (``W x + (alpha / r) B A x``, B starts at zero)."""

    r: int = 16
    alpha: int = 32
    dropout: float = 0.0  # peft's default; > 0 keeps a dropped-out copy of every adapted layer's input
    targets: tuple[str, ...] = DECODER_LINEARS  # linear layers of the decoder (Gemma) that get adapters
    # Also train the token embeddings (tied to the LM head) fully, as peft modules_to_save. Needed when
    # the base never learned the answer words (the tiny caption model never says "yes"): a frozen tied
    # head cannot give an untrained word a confident logit, whatever the adapters do. Off for real
    # checkpoints (Gemma's table is 257k x 2048 = 0.5 B parameters).
    train_embeddings: bool = False
    # SigLIP linears that get adapters too (e.g. q_proj k_proj v_proj out_proj fc1 fc2); none by default
    vision_targets: tuple[str, ...] = ()

    def checks(self) -> Iterable[Check]:
        yield from positive("r", "alpha", cfg=self)
        yield "dropout", 0 <= self.dropout < 1, "must be in [0, 1)"
        unknown = [t for t in self.targets if t not in DECODER_LINEARS]
        yield "targets", bool(self.targets) and not unknown, f"choose from {list(DECODER_LINEARS)}"
        unknown = [t for t in self.vision_targets if t not in VISION_LINEARS]
        yield "vision_targets", not unknown, f"choose from {list(VISION_LINEARS)}"


@dataclass
class QuantSettings:
    """How QLoRA stores the frozen decoder linears (bitsandbytes ``Linear4bit``)."""

    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = True  # quantise the per-block absmax constants too (8 bit, blocks of 256)
    compute_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # auto: bf16 on CUDA, fp32 on CPU

    def dtype(self, device: torch.device) -> torch.dtype:
        if self.compute_dtype == "auto":
            return torch.bfloat16 if device.type == "cuda" else torch.float32
        return DTYPES[self.compute_dtype]


def _quiet_import(name: str):
    """Import peft / bitsandbytes. bitsandbytes' CPU backend warns that it cannot fetch an optional
    kernel from the Hub (genlab never downloads); that warning is silenced, real errors are not."""
    import importlib

    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    try:
        return importlib.import_module(name)
    except ImportError as e:
        pkg = name.split(".")[0]
        raise ConfigError(f"this mode needs the {pkg} package: pip install {pkg} ({e})") from e


def target_pattern(targets: Iterable[str], vision_targets: Iterable[str] = ()) -> str:
    """peft ``target_modules`` regex: the named linears of every decoder layer (and of every SigLIP
    layer for ``vision_targets``); peft matches it against the whole module name."""
    pattern = r"language_model\.layers\.\d+\.(self_attn|mlp)\.(" + "|".join(targets) + ")"
    if vision_targets:
        pattern += r"|vision_tower\.encoder\.layers\.\d+\.(self_attn|mlp)\.(" + "|".join(vision_targets) + ")"
    return pattern


def _linears(model: nn.Module, targets: Iterable[str], kind: type = nn.Linear) -> list[tuple[nn.Module, str, nn.Module]]:
    """(parent, attribute name, layer) for each decoder layer named in ``targets`` of type ``kind``."""
    wanted = set(targets)
    return [(parent, name, child) for parent in base_of(model).language_model.layers.modules()
            for name, child in parent.named_children() if name in wanted and isinstance(child, kind)]


def to_4bit(lin: nn.Linear, quant: QuantSettings, device: torch.device) -> nn.Module:
    """A bitsandbytes ``Linear4bit`` holding ``lin``'s weight in 4 bits (quantised when moved to ``device``)."""
    bnb = _quiet_import("bitsandbytes")
    q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None,
                          compute_dtype=quant.dtype(device), compress_statistics=quant.double_quant,
                          quant_type=quant.quant_type, device="meta")
    q.weight = bnb.nn.Params4bit(lin.weight.data.detach().to("cpu", torch.float32), requires_grad=False,
                                 compress_statistics=quant.double_quant, quant_type=quant.quant_type)
    if lin.bias is not None:
        q.bias = nn.Parameter(lin.bias.data.detach().clone(), requires_grad=False)
    # On AVX512-BF16 CPUs bitsandbytes repacks the weight for a faster kernel at the first eval-mode
    # forward and keeps it so; that kernel has no backward, so training after an evaluation would
    # back-propagate wrong input gradients (torch warns "an autograd kernel was not registered").
    # genlab evaluates between training steps: keep the one layout that trains.
    q.support_avx512bf16_for_cpu = False
    return q.to(device)


def quantize_decoder(model: PaliGemma, quant: QuantSettings, targets: Iterable[str] = DECODER_LINEARS,
                     device: torch.device | str = "cpu") -> int:
    """Replace the decoder's target linears by 4-bit layers holding the same weights, one layer at a
    time (each fp32 weight is freed as soon as its 4-bit copy exists), and mark the model
    ``is_loaded_in_4bit`` (what makes peft choose its 4-bit LoRA layers). Layers already in 4 bits
    are left alone. Returns the number of layers replaced."""
    bnb = _quiet_import("bitsandbytes")
    places = [(parent, name) for parent, name, lin in _linears(model, targets)
              if not isinstance(lin, bnb.nn.Linear4bit)]  # (Linear4bit is an nn.Linear too)
    for parent, name in places:
        setattr(parent, name, to_4bit(getattr(parent, name), quant, torch.device(device)))
    model.is_loaded_in_4bit = True
    return len(places)


def dequantized(layer: nn.Module) -> nn.Linear:
    """A plain fp32 ``nn.Linear`` computing what the bitsandbytes 4-bit ``layer`` computes."""
    bnb = _quiet_import("bitsandbytes")
    w = layer.weight
    lin = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device=w.device)
    with torch.no_grad():
        lin.weight.copy_(bnb.functional.dequantize_4bit(w.data, w.quant_state).float())
        if layer.bias is not None:
            lin.bias.copy_(layer.bias.float())
    return lin


def lora_config(lora: LoraSettings, also_train: Iterable[str] = ()):
    """The peft ``LoraConfig`` of these settings; modules in ``also_train`` ("vision_tower",
    "multi_modal_projector") train fully as ``modules_to_save``, which peft saves inside the adapter."""
    peft = _quiet_import("peft")
    return peft.LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, bias="none",
                           target_modules=target_pattern(lora.targets, lora.vision_targets),
                           modules_to_save=list(also_train) or None)


def adapt(model: PaliGemma, mode: Mode, lora: LoraSettings, quant: QuantSettings, device: torch.device | str = "cpu",
          train_vision: bool = False, train_projector: bool = False) -> nn.Module:
    """The model to train in ``mode``: the PaliGemma itself (full) or a peft ``PeftModel`` around it.

    full: the decoder trains; lora / qlora: only the adapters. In every mode the vision tower and the
    projector are frozen (``train.optim.freeze``: no gradients, eval mode) unless ``train_vision`` /
    ``train_projector``. qlora quantises the decoder linears first and checks that peft put its
    bitsandbytes LoRA layers on every one of them."""
    if mode not in MODES:
        raise ConfigError(f"--mode={mode}: choose from {list(MODES)}")
    parts = {"vision_tower": (model.vision_tower, train_vision),
             "multi_modal_projector": (model.multi_modal_projector, train_projector)}
    for part, trained in parts.values():
        if not trained:
            freeze(part)
    if mode == "full":
        return model
    if mode == "qlora":
        quantize_decoder(model, quant, lora.targets, device)
    peft = _quiet_import("peft")
    also = [name for name, (_, on) in parts.items() if on] + (["embed_tokens"] if lora.train_embeddings else [])
    wrapped = peft.get_peft_model(model, lora_config(lora, also))
    if mode == "qlora":
        check_4bit_adapters(wrapped, lora.targets)
    return wrapped


def check_4bit_adapters(model: nn.Module, targets: Iterable[str]) -> None:
    """Every adapted layer must be peft's bitsandbytes 4-bit LoRA layer over a ``Linear4bit``
    (a plain LoRA layer over a 4-bit weight would silently train something else)."""
    lora_bnb = _quiet_import("peft.tuners.lora.bnb")
    bnb = _quiet_import("bitsandbytes")
    adapted = [(n, m) for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in set(targets)
               and hasattr(m, "lora_A") and ".language_model." in f".{n}"]
    wrong = [n for n, m in adapted if not isinstance(m, lora_bnb.Linear4bit)
             or not isinstance(m.get_base_layer(), bnb.nn.Linear4bit)]
    if not adapted or wrong:
        raise RuntimeError(f"peft did not choose its 4-bit LoRA layers for {wrong or 'any layer'}")


def base_of(model: nn.Module) -> PaliGemma:
    """The PaliGemma inside a PeftModel (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def merged_model(model: nn.Module, mode: Mode) -> PaliGemma:
    """A plain fp32 PaliGemma computing what the trained ``model`` computes (a copy; ``model`` is left
    as it was). full: a copy; lora: peft's merge, ``W + (alpha / r) B A``; qlora: the same merge into
    the de-quantised 4-bit weights (so the export answers exactly as the trained model did; peft's own
    4-bit merge would quantise the sum again)."""
    import copy

    work = copy.deepcopy(model)
    if mode == "full":
        return work.float().eval()
    if mode == "lora":
        return work.merge_and_unload().float().eval()
    peft = _quiet_import("peft")
    lora, adapters = copy.deepcopy(work.peft_config["default"]), peft.get_peft_model_state_dict(work)
    plain = work.unload()  # the base with its 4-bit layers, trained modules_to_save in place
    bnb = _quiet_import("bitsandbytes")
    for parent, name, layer in _linears(plain, DECODER_LINEARS, bnb.nn.Linear4bit):
        setattr(parent, name, dequantized(layer))
    plain.is_loaded_in_4bit = False
    lora.inference_mode = False
    wrapped = peft.get_peft_model(plain.float(), lora)
    peft.set_peft_model_state_dict(wrapped, adapters)
    return wrapped.merge_and_unload().eval()


def save_adapter(model: nn.Module, folder: str | Path) -> None:
    """peft's adapter format (adapter_config.json + adapter_model.safetensors: the LoRA factors and any
    fully trained module), loadable with ``peft.PeftModel.from_pretrained(PaliGemma(cfg), folder)``.
    peft writes into a scratch folder beside ``folder``; each file is then renamed into place, so a
    crash leaves the previous adapter or the new one, never half a file."""
    import os
    import shutil

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=".adapter-", dir=folder.parent))
    try:
        model.save_pretrained(str(scratch), safe_serialization=True)
        for f in sorted(scratch.iterdir(), key=lambda f: f.name == "adapter_config.json"):  # config last
            os.replace(f, folder / f.name)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def parameter_report(model: nn.Module) -> dict[str, Any]:
    """Trainable / total parameter counts and the bytes of the stored weights by dtype (a 4-bit weight
    counts its packed bytes and quantisation constants)."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    by_dtype: dict[str, int] = {}
    for p in model.parameters():
        key = "nf4" if type(p).__name__ == "Params4bit" else str(p.dtype).replace("torch.", "")
        nbytes = p.numel() * p.element_size()
        qs = getattr(p, "quant_state", None)
        if qs is not None:
            nbytes += _quant_state_bytes(qs)
        by_dtype[key] = by_dtype.get(key, 0) + nbytes
    return {"trainable_parameters": trainable, "parameters": sum(p.numel() for p in model.parameters()),
            "weight_bytes": by_dtype}


def _quant_state_bytes(qs) -> int:
    n = qs.absmax.numel() * qs.absmax.element_size()
    if getattr(qs, "state2", None) is not None:  # double quantisation: 8-bit absmax + fp32 constants of those
        n += qs.state2.absmax.numel() * qs.state2.absmax.element_size() + qs.state2.code.numel() * 4
    return n
