"""bf16 training steps on a CPU: the forward runs in bf16 autocast, evaluation stays fp32 (what the exported graph serves)."""

from __future__ import annotations

import numpy as np
import torch

from medtriage.config import DataConfig, TrainerConfig
from medtriage.config.schema import AugmentOn, Precision
from medtriage.data.torch.datasets import CachedSplit
from medtriage.model.networks import PreprocessSpec, build_triage_net
from medtriage.model.predict import predict_logits
from medtriage.training.loop import TrainingLoop
from medtriage.training.optimiser import native_bf16


def _split(n: int, seed: int) -> CachedSplit:
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 2
    images = torch.rand(n, 1, 28, 28, generator=g) * 0.5 + labels.view(-1, 1, 1, 1) * 0.3
    return CachedSplit(images, labels, np.array(["a"] * n), np.arange(n))


def _loop(precision: Precision, channels_last: bool) -> TrainingLoop:
    torch.manual_seed(0)
    net = build_triage_net("resnet10", 2, PreprocessSpec(size=28))
    trainer = TrainerConfig(device="cpu", precision=precision, channels_last=channels_last, augment_on=AugmentOn.device, max_epochs=1)
    data = DataConfig(source="npz", pool_dir="unused", batch_size=16)
    return TrainingLoop(trainer, data, net, {"train": _split(32, 0), "val": _split(16, 1)}, torch.device("cpu"))


def _trace_forward_dtypes(loop: TrainingLoop) -> list[torch.dtype]:
    seen = []
    conv = next(m for m in loop.model.modules() if isinstance(m, torch.nn.Conv2d))
    conv.register_forward_hook(lambda _m, _i, out: seen.append(out.dtype))
    return seen


def test_bf16_on_cpu_trains_in_bf16_and_evaluates_in_fp32(caplog):
    loop = _loop(Precision.bf16, channels_last=True)
    dtypes = _trace_forward_dtypes(loop)
    images, labels = loop.splits["train"].images[:16], loop.splits["train"].labels[:16]
    loss = loop.train_step(images, labels)
    assert torch.isfinite(loss) and dtypes == [torch.bfloat16]
    assert all(p.dtype == torch.float32 for p in loop.model.parameters())  # master weights stay fp32

    predictions = loop.predict("val")
    assert dtypes[1:] == [torch.float32]  # evaluation: fp32, as the exported graph serves
    fp32 = predict_logits(loop.eval_model, loop.splits["val"].images, 256, "cpu")
    np.testing.assert_array_equal(predictions.logits, fp32)
    if native_bf16(torch.device("cpu")):
        assert "slower than fp32" not in caplog.text


def test_bf16_on_cpu_repeats_exactly():
    """Reruns repeat their figures on a CPU (the accuracy benchmark relies on it), in bf16 too."""
    losses = []
    for _ in range(2):
        loop = _loop(Precision.bf16, channels_last=True)
        losses.append(
            [loop.train_step(loop.splits["train"].images[i : i + 16], loop.splits["train"].labels[i : i + 16]).item() for i in (0, 16)]
        )
    assert losses[0] == losses[1]


def test_fp32_preset_on_cpu_has_no_autocast():
    loop = _loop(Precision.fp32, channels_last=False)
    dtypes = _trace_forward_dtypes(loop)
    loop.train_step(loop.splits["train"].images[:16], loop.splits["train"].labels[:16])
    assert dtypes == [torch.float32]


def test_bf16_on_a_cpu_without_native_bf16_says_it_is_slower(monkeypatch, caplog):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    loop = _loop(Precision.bf16, channels_last=False)
    assert loop.autocast_dtype == torch.bfloat16  # it still does what was asked
    assert "trainer.precision=bf16 on a CPU without native bf16" in caplog.text
