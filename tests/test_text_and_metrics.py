import math

import torch

from varedit_lab.config import TextConfig
from varedit_lab.metrics import MAX_PSNR, EditQuality, ScaleBitAccuracy
from varedit_lab.text import TextEncoder


def test_tiny_text_encoder_is_deterministic_and_frozen():
    a, b = TextEncoder.from_config(TextConfig()), TextEncoder.from_config(TextConfig())
    texts = ["make the red circle blue", "remove the green square"]
    fa, fb = a.encode(texts), b.encode(texts)
    torch.testing.assert_close(fa.features, fb.features)
    assert fa.features.shape[-1] == a.width == 128
    assert fa.lengths.tolist() == [len(t.encode()) + 1 for t in texts]  # bytes + </s>
    assert (fa.features[1, fa.lengths[1]:] == 0).all()  # right padding is zero
    assert not any(p.requires_grad for p in a.parameters())
    a.train()
    assert not a.model.training
    # different instructions give different features
    assert (fa.features[0, :5] - fa.features[1, :5]).abs().max() > 1e-3


def test_text_cache_reuses_embeddings():
    enc = TextEncoder.from_config(TextConfig())
    first = enc.encode(["add a yellow star"]).features
    calls = []
    original = enc._encode_uncached
    enc._encode_uncached = lambda texts: calls.append(list(texts)) or original(texts)
    second = enc.encode(["add a yellow star", "add a blue star"]).features
    assert calls == [["add a blue star"]]
    torch.testing.assert_close(second[0, : first.shape[1]], first[0])


def test_edit_quality_on_known_images():
    b, h = 2, 8
    source = torch.full((b, 3, h, h), -1.0)
    target = source.clone()
    mask = torch.zeros(b, 1, h, h)
    mask[:, :, :4] = 1
    target[:, :, :4] = 1.0  # the edit turns the top half white
    metric = EditQuality()
    metric.update(target.clone(), source, target, mask)  # perfect edit
    perfect = metric.compute()
    assert perfect["success"] == MAX_PSNR and perfect["preservation"] == MAX_PSNR
    metric.reset()
    metric.update(source.clone(), source, target, mask)  # copy the source: fails inside the mask
    copy = metric.compute()
    assert copy["success"] == 0.0  # MSE 1 in [0, 1] units -> 0 dB
    assert copy["preservation"] == MAX_PSNR and copy["balance"] == 0.0
    edited = target.clone()
    edited[:, :, 4:] = 0.0  # over-edit outside: error 0.5 in [0, 1] units
    metric.reset()
    metric.update(edited, source, target, mask)
    out = metric.compute()
    expected_p = 10 * math.log10(1 / 0.25)
    torch.testing.assert_close(out["preservation"], torch.tensor(expected_p))
    torch.testing.assert_close(out["balance"], torch.tensor(2 * MAX_PSNR * expected_p / (MAX_PSNR + expected_p)))
    torch.testing.assert_close(out["preservation_l1"], torch.tensor(0.5))


def test_scale_bit_accuracy():
    metric = ScaleBitAccuracy((1, 4))
    target = torch.zeros(2, 5, 3, dtype=torch.uint8)
    pred = target.clone()
    pred[:, 1:3] = 1  # half of scale 1 wrong
    metric.update(pred, target)
    out = metric.compute()
    assert out["scale0_bit_acc"] == 1.0 and out["scale1_bit_acc"] == 0.5
    torch.testing.assert_close(out["bit_acc"], torch.tensor(0.6))
