"""ImageReward through its real loader: a tiny ImageReward.pt with BLIP's own key names + med_config.json + a
bert-style vocab.txt folder (written by soarbench.metrics.synthetic), checked against an independent
re-implementation of BLIP's vit.py / med.py forward written here on plain tensor ops from the same state dict,
and against torchvision's transform for the images."""
from __future__ import annotations

import json
import math
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import soarbench  # noqa: F401  (torchvision's CPU fallback before torchvision is imported below)
from soarbench.errors import UserError
from soarbench.metrics import imagereward as ir
from soarbench.metrics.clipscore import openai_clip_pixels
from soarbench.metrics import synthetic
from soarbench.metrics.registry import METRICS, build_metric

SIZES = synthetic.IMAGEREWARD_SIZES["tiny"]
V_WIDTH, V_DEPTH, PATCH, SIZE = SIZES["vision_width"], SIZES["vision_depth"], SIZES["patch"], SIZES["image_size"]
V_HEADS = V_WIDTH // 64  # BLIP's ViTs use 64-wide heads
T_DEPTH, T_HEADS = SIZES["text_depth"], SIZES["text_heads"]
VOCAB = synthetic.BERT_TINY_VOCAB
MED = synthetic.imagereward_med_config("tiny")


def blip_state(seed: int = 0):
    return synthetic.imagereward_state("tiny", seed)


def write_files(root: Path, state=None) -> tuple[Path, Path]:
    return synthetic.write_imagereward(root, "tiny", state=state)


# ------------------------------------------------------ independent reference: BLIP's forward on raw tensors


def layer_norm(x, s, prefix, eps):
    return F.layer_norm(x, x.shape[-1:], s[f"{prefix}.weight"], s[f"{prefix}.bias"], eps)


def lin(x, s, prefix):
    return x @ s[f"{prefix}.weight"].T + s[f"{prefix}.bias"]


def heads(x, n):
    b, length, width = x.shape
    return x.view(b, length, n, width // n).transpose(1, 2)


def attend(q, k, v, n, additive_mask=None):
    scores = heads(q, n) @ heads(k, n).transpose(-1, -2) / math.sqrt(q.shape[-1] // n)
    if additive_mask is not None:
        scores = scores + additive_mask
    out = scores.softmax(-1) @ heads(v, n)
    return out.transpose(1, 2).reshape(q.shape)


def reference_vit(s, pixels):
    v = "blip.visual_encoder"
    x = F.conv2d(pixels, s[f"{v}.patch_embed.proj.weight"], s[f"{v}.patch_embed.proj.bias"], stride=PATCH)
    x = torch.cat([s[f"{v}.cls_token"].expand(len(x), -1, -1), x.flatten(2).transpose(1, 2)], dim=1)
    x = x + s[f"{v}.pos_embed"]
    for i in range(V_DEPTH):
        b = f"{v}.blocks.{i}"
        h = layer_norm(x, s, f"{b}.norm1", 1e-6)
        q, k, val = lin(h, s, f"{b}.attn.qkv").chunk(3, dim=-1)
        x = x + lin(attend(q, k, val, V_HEADS), s, f"{b}.attn.proj")
        h = layer_norm(x, s, f"{b}.norm2", 1e-6)
        x = x + lin(F.gelu(lin(h, s, f"{b}.mlp.fc1")), s, f"{b}.mlp.fc2")
    return layer_norm(x, s, f"{v}.norm", 1e-6)


def reference_reward(s, pixels, input_ids, attention_mask):
    e, eps = "blip.text_encoder", MED["layer_norm_eps"]
    image = reference_vit(s, pixels)
    positions = torch.arange(input_ids.shape[1])
    x = s[f"{e}.embeddings.word_embeddings.weight"][input_ids] + s[f"{e}.embeddings.position_embeddings.weight"][
        positions]
    x = layer_norm(x, s, f"{e}.embeddings.LayerNorm", eps)
    mask = (1.0 - attention_mask[:, None, None, :].float()) * -10000.0  # med.py's extended attention mask
    for i in range(T_DEPTH):
        L = f"{e}.encoder.layer.{i}"
        for block, context, m in (("attention", None, mask), ("crossattention", image, None)):
            kv = x if context is None else context
            a = attend(lin(x, s, f"{L}.{block}.self.query"), lin(kv, s, f"{L}.{block}.self.key"),
                       lin(kv, s, f"{L}.{block}.self.value"), T_HEADS, m)
            x = layer_norm(lin(a, s, f"{L}.{block}.output.dense") + x, s, f"{L}.{block}.output.LayerNorm", eps)
        h = F.gelu(lin(x, s, f"{L}.intermediate.dense"))
        x = layer_norm(lin(h, s, f"{L}.output.dense") + x, s, f"{L}.output.LayerNorm", eps)
    r = x[:, 0]
    for name in (0, 2, 4, 6, 7):
        r = lin(r, s, f"mlp.layers.{name}")
    return ((r - 0.16717362830052426) / 1.0333394966054072).squeeze(-1)


def torchvision_transform(size):
    """ImageReward's own preprocessing, built from torchvision as the official package builds it."""
    from torchvision.transforms import CenterCrop, Compose, InterpolationMode, Normalize, Resize, ToTensor

    return Compose([Resize(size, interpolation=InterpolationMode.BICUBIC), CenterCrop(size),
                    lambda im: im.convert("RGB"), ToTensor(),
                    Normalize((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))])


def images() -> list[Image.Image]:
    rng = np.random.default_rng(3)
    sizes = [(64, 64), (70, 64), (64, 78), (33, 80), (32, 32)]  # crops at x.5 offsets
    out = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in sizes]
    out.append(out[0].convert("RGBA"))  # converted to RGB after resizing, as the official transform does
    return out


PROMPTS = ["a photo of a red cube", "two blue balls", "a red ball and a blue cube.", "zebra", "a red ball",
           "a photo of a red cube"]


# ------------------------------------------------------------------------------------------------ tests


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return write_files(tmp_path_factory.mktemp("imagereward"))


@pytest.fixture(scope="module")
def metric(files):
    model, tok = files
    return ir.ImageRewardMetric(model=str(model), tokenizer=str(tok), device="cpu", batch_size=2)


def test_preprocessing_equals_torchvision_transform():
    transform = torchvision_transform(SIZE)
    for image in images():
        assert torch.allclose(openai_clip_pixels(image, SIZE), transform(image), atol=1e-6)


def test_tokens_are_bert_wordpiece_with_dec_and_enc_added_padded_to_35(metric):
    tokens = metric.tokenize(["A photo of two RED cubes", "[ENC] zebra " + "a " * 40])
    ids, mask = tokens["input_ids"], tokens["attention_mask"]
    assert ids.shape == (2, 35)
    # [CLS] a photo of two red cube ##s [SEP], then [PAD]
    assert ids[0, :9].tolist() == [2, 5, 6, 7, 13, 8, 10, 12, 3] and ids[0, 9:].eq(0).all()
    assert mask[0].tolist() == [1] * 9 + [0] * 26
    enc = len(VOCAB) + 1  # [DEC] is added first (bos), then [ENC]
    assert metric.tokenizer.bos_token_id == len(VOCAB) and ids[1, 1] == enc and ids[1, 2] == 1  # zebra -> [UNK]
    assert ids[1, -1] == 3 and mask[1].all()  # truncated to 35 with [SEP] kept


def test_score_equals_the_reference_forward(files, metric):
    model, _ = files
    state = torch.load(model / "ImageReward.pt", weights_only=True)
    transform = torchvision_transform(SIZE)
    pixels = torch.stack([transform(im) for im in images()])
    tokens = metric.tokenize(PROMPTS)
    with torch.no_grad():
        expected = reference_reward(state, pixels, tokens["input_ids"], tokens["attention_mask"])
    got = [r["score"] for r in metric.score(images(), PROMPTS)]
    np.testing.assert_allclose(got, expected.numpy(), rtol=0, atol=2e-5)
    assert np.ptp(got) > 0.05  # the images and prompts really move the reward
    assert got[0] == pytest.approx(got[5], abs=1e-5)  # RGBA is converted after the resize: same pixels here


def test_batching_and_order_do_not_change_scores(files, metric):
    model, tok = files
    one = ir.ImageRewardMetric(model=str(model / "ImageReward.pt"), tokenizer=str(tok), device="cpu", batch_size=1)
    a = [r["score"] for r in metric.score(images(), PROMPTS)]
    b = [r["score"] for r in one.score(images()[::-1], PROMPTS[::-1])][::-1]
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_info_and_registry(files, metric):
    model, tok = files
    assert metric.info.name == "imagereward" and metric.info.higher_is_better
    assert "1.0333394966054072" in metric.info.scale and f"local:{model}" in metric.info.version
    assert METRICS.meta("imagereward")["weights"] == ["imagereward-v1", "bert-base-uncased-tokenizer"]
    built = build_metric("imagereward", model=str(model), tokenizer=str(tok), device="cpu")
    assert built.score(images()[:1], PROMPTS[:1])[0]["score"] == pytest.approx(
        metric.score(images()[:1], PROMPTS[:1])[0]["score"], abs=1e-6)


def test_default_names_resolve_under_the_weights_root(tmp_path, monkeypatch):
    write_files(tmp_path)
    monkeypatch.setenv("SOARBENCH_REWARD_CKPTS", str(tmp_path))
    metric = ir.ImageRewardMetric(device="cpu")
    assert metric.info.version.startswith("imagereward-v1.0-transformers/imagereward-v1@")
    assert "bert-base-uncased-tokenizer@" in metric.info.version


def test_missing_and_wrong_files_are_one_line_user_errors(files, tmp_path):
    model, tok = files
    with pytest.raises(UserError, match="imagereward-v1"):  # names the fixing command
        ir.ImageRewardMetric(weights_root=str(tmp_path / "empty"), device="cpu")

    no_med = tmp_path / "no_med"
    no_med.mkdir()
    (no_med / "ImageReward.pt").write_bytes((model / "ImageReward.pt").read_bytes())
    with pytest.raises(UserError, match="med_config.json is missing"):
        ir.ImageRewardMetric(model=str(no_med), tokenizer=str(tok), device="cpu")

    state = blip_state()
    del state["blip.text_encoder.encoder.layer.1.crossattention.self.key.weight"]
    broken, _ = write_files(tmp_path / "broken", state)
    with pytest.raises(UserError, match="text encoder weights do not fit"):
        ir.ImageRewardMetric(model=str(broken), tokenizer=str(tok), device="cpu")

    stranger = OrderedDict(blip_state(), **{"head.weight": torch.zeros(1)})
    other, _ = write_files(tmp_path / "other", stranger)
    with pytest.raises(UserError, match="not an ImageReward checkpoint"):
        ir.ImageRewardMetric(model=str(other), tokenizer=str(tok), device="cpu")

    no_cross, _ = write_files(tmp_path / "no_cross")
    (no_cross / "med_config.json").write_text(json.dumps({**MED, "add_cross_attention": False}))
    with pytest.raises(UserError, match="add_cross_attention must be true"):
        ir.ImageRewardMetric(model=str(no_cross), tokenizer=str(tok), device="cpu")

    small_vocab, _ = write_files(tmp_path / "small_vocab")
    with pytest.raises(UserError, match="do not fit the text encoder"):
        big = tmp_path / "big_tok"
        big.mkdir()
        (big / "vocab.txt").write_text("\n".join([*VOCAB, "extra"]) + "\n")
        ir.ImageRewardMetric(model=str(small_vocab), tokenizer=str(big), device="cpu")

    with pytest.raises(UserError, match="2 images and 1 prompts"):
        ir.ImageRewardMetric(model=str(model), tokenizer=str(tok), device="cpu").score(images()[:2], PROMPTS[:1])
