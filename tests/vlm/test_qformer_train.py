"""BLIP-2 stage 1 (genlab.vlm.qformer_train): the objectives against independent formulas, a tiny run
end to end (Recall@K, similarity grid, resume, init_from), `genlab qformer eval` and bad input."""

import io
import json
import tarfile

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

pytest.importorskip("transformers")

from genlab.data.captions import CaptionPairs, load_captions  # noqa: E402
from genlab.train.checkpoint import latest_checkpoint, read_safetensors  # noqa: E402
from genlab.vlm.alignment import CaptionBatches, QFormerSettings, text_ids  # noqa: E402
from genlab.vlm.qformer_train import (QFormerTrainConfig, aligner_loss, build_aligner, hard_negatives,  # noqa: E402
                                      new_parameters, train)
from tests._cli import fails, snapshot  # noqa: E402
from tests.vlm.tiny_blip import bert_folder, vision_folder  # noqa: E402
from genlab.cli import main  # noqa: E402


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("blip")
    vision_folder(root / "vision")
    bert_folder(root / "bert")
    return root


def tiny_cfg(assets, run_dir, steps=4, **train):
    cfg = QFormerTrainConfig(run_dir=str(run_dir), vision=str(assets / "vision"),
                             qformer=QFormerSettings(bert=str(assets / "bert"), num_query_tokens=4,
                                                     image_text_hidden_size=16, max_text_tokens=24))
    cfg.data.shapes_train, cfg.data.shapes_val = 24, 12
    cfg.eval.n_images, cfg.eval.grid = 12, 4
    for k, v in dict(steps=steps, batch_size=6, checkpoint_every=2, log_every=1, threads=1, progress=False,
                     **train).items():
        setattr(cfg.train, k, v)
    return cfg


def test_hard_negatives_never_draw_a_positive():
    torch.manual_seed(0)
    sim = torch.randn(6, 6) * 5
    pos = torch.eye(6, dtype=torch.bool)
    pos[0, 1] = pos[1, 0] = True  # a repeated caption
    pos[5] = True  # every caption matches image 5: it has no negative
    for _ in range(50):
        rows, neg = hard_negatives(sim, pos)
        assert rows.tolist() == [0, 1, 2, 3, 4]
        assert not pos[rows, neg].any()


def test_itc_equals_the_max_over_queries_infonce(assets, tmp_path):
    """With distinct images and captions, ITC is the mean of the two cross-entropies of
    max_q cos(query_q(image), text) / temp, computed here query by query."""
    cfg = tiny_cfg(assets, tmp_path / "r")
    model, tok, _ = build_aligner(cfg)
    data = load_captions(cfg.data, "train", 16)
    pairs = CaptionPairs(data, 16)
    firsts = [k for k, (i, j) in enumerate(data.pairs()) if j == 0][:5]  # one caption per image
    batch = CaptionBatches(text_ids(data), tok)([pairs[k] for k in firsts])
    assert len(set(batch["caption_id"].tolist())) == 5
    loss, metrics = aligner_loss(model, batch, itm=False, itm_weight=1.0)
    q = model.qformer
    with torch.no_grad():
        feats = model.vision(batch["pixels"].float() / 127.5 - 1)
        h = q.query_features(feats)  # (B, Q, D)
        txt = F.normalize(q.text_projection(q.text_features(batch["input_ids"], batch["attention_mask"])[:, 0]), dim=-1)
        sims = torch.stack([F.normalize(q.vision_projection(h[:, k]), dim=-1) @ txt.T for k in range(h.shape[1])])
        logits = sims.max(0).values / q.temp
        y = torch.arange(5)
        want = (F.cross_entropy(logits, y) + F.cross_entropy(logits.T, y)) / 2
    assert torch.allclose(loss, want, atol=1e-5), (loss, want)
    assert "itm" not in metrics
    loss_itm, metrics = aligner_loss(model, batch, itm=True, itm_weight=1.0)
    assert loss_itm > loss and 0 <= float(metrics["itm_acc"]) <= 1


def test_new_parameters_are_the_queries_and_cross_attention(assets, tmp_path):
    model, _, _ = build_aligner(tiny_cfg(assets, tmp_path / "r"))
    names = {id(p): n for n, p in model.qformer.named_parameters()}
    picked = [names[id(p)] for p in new_parameters(model.qformer)]
    assert picked[0] == "query_tokens" and all(".crossattention." in n for n in picked[1:])
    assert len(picked) > 1 and not any(p.requires_grad for p in model.vision.parameters())


def test_tiny_run_end_to_end_resume_and_eval(assets, tmp_path, capsys):
    const = dict(schedule="constant", warmup_steps=0)  # a 2-step run's schedule is a prefix of the 4-step one
    run = train(tiny_cfg(assets, tmp_path / "run", steps=4, **const))
    report = json.loads((run / "eval.json").read_text())
    assert {"i2t_r1", "i2t_r5", "t2i_r10", "n_images", "n_texts"} <= set(report) and report["n_images"] == 12
    assert (run / "similarity.png").stat().st_size > 0 and (run / "loss.png").is_file()
    saved = read_safetensors(latest_checkpoint(run) / "model.safetensors")
    assert any(k.startswith("qformer.crossattention") or ".crossattention." in k for k in saved)
    assert not any(k.startswith("vision.") for k in saved)  # the frozen tower stays out of checkpoints
    # the learning rates of the two groups: lr for what BERT initialised, 10 x lr for the new parts
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    lrs = next(r for r in logged if "lr/new" in r)
    assert lrs["lr/new"] == pytest.approx(10 * lrs["lr/rest"]) and lrs["lr/rest"] == pytest.approx(1e-4)

    # resume: a run cut at step 2 and continued ends with the uninterrupted run's weights, bit for bit
    # (the data order, the hard negatives' random draws and the optimizer state all come back)
    cut = train(tiny_cfg(assets, tmp_path / "cut", steps=2, **const))
    train(tiny_cfg(assets, cut, steps=4, **const), resume=True)
    a, b = read_safetensors(latest_checkpoint(run) / "model.safetensors"), \
        read_safetensors(latest_checkpoint(cut) / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    # init_from: a new run starts from this run's Q-Former
    init = train(tiny_cfg(assets, tmp_path / "init", steps=1, init_from=str(run)))
    assert "initialised from" in capsys.readouterr().out and (init / "eval.json").is_file()

    # genlab qformer eval on the run's own held-out split
    assert main(["qformer", "eval", "--checkpoint", str(run), "--n-images", "6", "--out", str(tmp_path / "ev")]) == 0
    ev = json.loads((tmp_path / "ev" / "eval.json").read_text())
    assert ev["n_images"] == 6 and (tmp_path / "ev" / "similarity.png").is_file()

    # ... and on img2dataset-style shards with a corrupt image: the skipped count is in the log and the report
    shards = tmp_path / "cc"
    shards.mkdir()
    with tarfile.open(shards / "00000.tar", "w") as tar:
        for i in range(5):
            jpg = io.BytesIO()
            Image.fromarray(np.full((20, 30, 3), 40 * i, np.uint8)).save(jpg, "JPEG")
            for ext, data in (("jpg", jpg.getvalue() if i != 2 else b"not a jpeg"), ("txt", f"scene {i}".encode())):
                info = tarfile.TarInfo(f"00000000{i}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    capsys.readouterr()
    assert main(["qformer", "eval", "--checkpoint", str(run), "--data.format", "webdataset", "--data.path",
                 str(shards), "--data.val-fraction", "0", "--split", "train", "--out", str(tmp_path / "ev-cc")]) == 0
    assert "skipped 1 corrupt image" in capsys.readouterr().out
    ev = json.loads((tmp_path / "ev-cc" / "eval.json").read_text())
    assert ev["n_images"] == 4 and "skipped 1 corrupt image" in ev["data"]


def test_bad_input_is_one_line_and_writes_nothing(assets, tmp_path, capsys):
    common = ["qformer", "train", "--qformer.bert", str(assets / "bert"), "--train.steps", "1"]
    fails([*common, "--vision", str(tmp_path / "nope"), "--run-dir", str(tmp_path / "r")], capsys, "--vision")
    assert not (tmp_path / "r").exists()
    fails([*common, "--vision", str(assets / "vision"), "--qformer.bert", str(tmp_path), "--run-dir",
           str(tmp_path / "r")], capsys, "--qformer.bert")
    fails([*common, "--vision", str(assets / "vision"), "--train.batch-size", "1", "--run-dir", str(tmp_path / "r")],
          capsys, "batch")
    assert not (tmp_path / "r").exists()
    fails(["qformer", "eval", "--checkpoint", str(tmp_path / "none")], capsys, "none")
    before = snapshot(assets)
    fails([*common, "--vision", str(assets / "vision"), "--data.format", "webdataset", "--data.path",
           str(tmp_path / "empty"), "--run-dir", str(tmp_path / "r")], capsys, "empty")
    assert snapshot(assets) == before and not (tmp_path / "r").exists()
