"""Weights in and out of genlab's Q-Former (``genlab.vlm.qformer``), by strict, explicit key maps.

* ``load_blip2_retrieval`` / ``qformer_state_for_hf``: a transformers ``Blip2ForImageTextRetrieval``
  state dict. genlab's parameter names *are* transformers' names, so the map is the identity on
  ``query_tokens``, ``embeddings.*``, ``qformer.*``, ``vision_projection``, ``text_projection`` and
  ``itm_head``; ``vision_model.*`` (the vision tower, a separate module in genlab) and the
  non-persistent ``embeddings.position_ids`` buffer that older files carry are skipped. ``temp``
  is genlab's alone: loaded if the state holds it, otherwise left as it is, never written.
* ``init_from_bert``: a BERT-family folder (``BertModel`` keys, with or without ``bert.``) gives the
  text embeddings, every self-attention and both feed-forwards of each layer (the query feed-forward
  starts as a copy of the text one, as in BLIP-2); cross-attention, query tokens and heads stay fresh.

Every mismatch is one ``CheckpointMismatchError`` (a ``FileFormatError``) that names the source and
every unexpected, missing or wrongly shaped key.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from genlab.errors import CheckpointMismatchError, FileFormatError
from genlab.io import read_json, read_safetensors

if TYPE_CHECKING:
    from genlab.vlm.qformer import QFormer

_GENLAB_ONLY = ("temp",)  # parameters transformers' Blip2ForImageTextRetrieval does not have
_SKIPPED_PREFIXES = ("vision_model.",)
_SKIPPED_KEYS = ("embeddings.position_ids",)


def _report(where: str, unexpected: list[str], missing: list[str], bad_shape: list[str]) -> None:
    """Raise CheckpointMismatchError naming every problem (none: return)."""
    problems = [f"{label}: {', '.join(items)}" for label, items in (
        ("unexpected keys", unexpected), ("missing keys", missing), ("shape mismatches", bad_shape)) if items]
    if problems:
        raise CheckpointMismatchError(f"{where} does not fit the Q-Former: " + "; ".join(problems))


def _copy(model: "QFormer", state: dict[str, Tensor]) -> None:
    """Copy ``state`` (genlab names, shapes already checked) into the model's parameters in place,
    keeping each parameter's dtype and device."""
    own = model.state_dict()
    with torch.no_grad():
        for name, value in state.items():
            own[name].copy_(value)


def load_blip2_retrieval(model: "QFormer", state: dict[str, Tensor], where: str) -> None:
    """Load a ``Blip2ForImageTextRetrieval`` state dict (``state``, transformers names) into ``model``.

    Strict: every genlab parameter except ``temp`` must be in ``state`` with its shape, and ``state``
    may hold nothing else besides ``vision_model.*``, ``embeddings.position_ids`` and ``temp``.
    Otherwise a CheckpointMismatchError naming ``where`` and each offending key; nothing is copied
    then. Values are cast to the model's dtype and device.
    """
    own = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    picked: dict[str, Tensor] = {}
    unexpected, bad_shape = [], []
    for key, value in state.items():
        if key.startswith(_SKIPPED_PREFIXES) or key in _SKIPPED_KEYS:
            continue
        if key not in own:
            unexpected.append(key)
        elif tuple(value.shape) != own[key]:
            bad_shape.append(f"{key}: given {tuple(value.shape)} vs model {own[key]}")
        else:
            picked[key] = value
    missing = [k for k in own if k not in state and k not in _GENLAB_ONLY]
    _report(where, unexpected, missing, bad_shape)
    _copy(model, picked)


def qformer_state_for_hf(model: "QFormer") -> dict[str, Tensor]:
    """``model``'s weights under transformers' ``Blip2ForImageTextRetrieval`` names (detached, on
    their device): everything but the vision tower (a separate module) and ``temp`` (not in HF)."""
    return {k: v.detach() for k, v in model.state_dict().items() if k not in _GENLAB_ONLY}


# ----------------------------------------------------------------------------- BERT initialisation
_BERT_LAYER = re.compile(r"encoder\.layer\.(\d+)\.(.+)")
_BERT_IGNORED = re.compile(r"(embeddings\.position_ids|pooler\..*|cls\..*)")
# fields of config.json that must agree with the model's config
_BERT_FIELDS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                "hidden_act", "max_position_embeddings", "layer_norm_eps")


def _bert_targets(key: str) -> list[str] | None:
    """The genlab names a BertModel key (no ``bert.`` prefix) initialises; [] for keys that are read
    but not copied as such (token types, folded into positions), None for keys no rule covers."""
    if key in ("embeddings.word_embeddings.weight", "embeddings.position_embeddings.weight"):
        return [key]
    if key == "embeddings.token_type_embeddings.weight":
        return []
    if key.startswith("embeddings.LayerNorm."):
        return ["qformer.layernorm." + key[len("embeddings.LayerNorm."):]]
    m = _BERT_LAYER.fullmatch(key)
    if m is None:
        return None
    base, rest = f"qformer.encoder.layer.{m.group(1)}.", m.group(2)
    if rest.startswith("attention.self."):
        return [base + "attention.attention." + rest[len("attention.self."):]]
    if rest.startswith("attention.output."):
        return [base + rest]
    for ffn in ("intermediate.", "output."):
        if rest.startswith(ffn):  # the text feed-forward, and the query one as a copy of it
            return [base + rest, base + ffn[:-1] + "_query." + rest[len(ffn):]]
    return None


def init_from_bert(model: "QFormer", folder: str | Path) -> dict:
    """Initialise ``model``'s text side from a BERT-family folder (``config.json`` +
    ``model.safetensors`` with BertModel keys, ``bert.``-prefixed or not), in place.

    Copied: word and position embeddings, the embedding LayerNorm (to ``qformer.layernorm``), every
    layer's self-attention, and its feed-forward into both ``intermediate``/``output`` and
    ``intermediate_query``/``output_query``. BERT's token-type embedding of type 0 is added to every
    position embedding (the Q-Former has no token types), so ``model.text_features`` equals
    ``BertModel`` with token_type_ids 0 (its default). The pooler (and ``cls.*`` heads) are ignored.
    Left fresh: ``query_tokens``, cross-attention, the projections, ``itm_head`` and ``temp``.

    A Q-Former with fewer layers than the BERT (``num_hidden_layers``) takes the BERT's first layers;
    the deeper ones are dropped (a cheaper Q-Former for a CPU). Returns ``{"loaded": number of
    parameters set, "fresh": [names left as they were], "dropped_layers": BERT layers not used}``.
    Raises FileFormatError naming the file for a missing folder / config.json / model.safetensors or
    a damaged file, and CheckpointMismatchError (a FileFormatError) naming every config field,
    unexpected key, missing key or shape that does not fit ``model``.
    """
    folder = Path(folder)
    config_path, weights_path = folder / "config.json", folder / "model.safetensors"
    if not folder.is_dir():
        raise FileFormatError(f"{folder}: no such folder (expected a BERT-family model folder with config.json "
                              f"and model.safetensors, e.g. sentence-transformers/all-MiniLM-L6-v2)")
    for path in (config_path, weights_path):
        if not path.is_file():
            raise FileFormatError(f"{path} is missing (a BERT-family folder holds config.json and "
                                  f"model.safetensors)")
    bert = read_json(config_path)
    cfg = model.config
    # A Q-Former may be shallower than the BERT (the first layers are copied, deeper ones dropped).
    deeper = bert.get("num_hidden_layers", cfg.num_hidden_layers) - cfg.num_hidden_layers
    wrong = [f"{k}={bert.get(k)!r} vs model {getattr(cfg, k)!r}" for k in _BERT_FIELDS
             if k in bert and bert[k] != getattr(cfg, k) and not (k == "num_hidden_layers" and deeper > 0)]
    if bert.get("position_embedding_type", "absolute") != "absolute":
        wrong.append(f"position_embedding_type={bert['position_embedding_type']!r} (only 'absolute')")
    if wrong:
        raise CheckpointMismatchError(f"{config_path} does not fit the Q-Former: {', '.join(wrong)}")

    raw = read_safetensors(weights_path)
    own = model.state_dict()
    shapes = {k: tuple(v.shape) for k, v in own.items()}
    picked: dict[str, Tensor] = {}
    unexpected, bad_shape, misshapen = [], [], set()
    token_types = None
    for file_key, value in raw.items():
        key = file_key[len("bert."):] if file_key.startswith("bert.") else file_key
        if _BERT_IGNORED.fullmatch(key) or _BERT_IGNORED.fullmatch(file_key):
            continue
        layer = _BERT_LAYER.fullmatch(key)
        if deeper > 0 and layer is not None and int(layer.group(1)) >= cfg.num_hidden_layers:
            continue  # a layer below the Q-Former's depth
        targets = _bert_targets(key)
        if targets is None:
            unexpected.append(file_key)
            continue
        if key == "embeddings.token_type_embeddings.weight":
            if value.dim() != 2 or value.shape[1] != cfg.hidden_size:
                bad_shape.append(f"{file_key}: file {tuple(value.shape)}, expected (types, {cfg.hidden_size})")
            token_types = value
        for name in targets:
            if name not in shapes:  # e.g. a layer the model does not have
                unexpected.append(file_key)
            elif tuple(value.shape) != shapes[name]:
                bad_shape.append(f"{file_key}: file {tuple(value.shape)} vs model {name} {shapes[name]}")
                misshapen.add(name)
            else:
                picked[name] = value
    expected = {k for k in own if _is_bert_initialised(k)}
    missing = sorted({_bert_source(k) for k in expected - set(picked) - misshapen})
    if token_types is None:
        missing.append("embeddings.token_type_embeddings.weight")
    _report(str(weights_path), sorted(set(unexpected)), missing, bad_shape)
    position = "embeddings.position_embeddings.weight"
    picked[position] = picked[position].float() + token_types[0].float()  # (P, D) + (D,)
    _copy(model, picked)
    return {"loaded": len(picked), "fresh": [k for k in own if k not in picked], "dropped_layers": max(deeper, 0)}


def _bert_source(name: str) -> str:
    """The BertModel key that initialises genlab parameter ``name`` (the inverse of ``_bert_targets``)."""
    if name.startswith("qformer.layernorm."):
        return "embeddings.LayerNorm." + name[len("qformer.layernorm."):]
    if name.startswith("qformer."):
        name = name[len("qformer."):].replace(".attention.attention.", ".attention.self.")
        return name.replace("_query.", ".")
    return name


def _is_bert_initialised(name: str) -> bool:
    """Whether ``init_from_bert`` sets genlab parameter ``name`` (everything of the text side)."""
    if name.startswith(("embeddings.", "qformer.layernorm.")):
        return True
    return name.startswith("qformer.encoder.") and ".crossattention." not in name
