"""LoRA fine-tuning (``peft``): only the trainable adapters are captured, exactly; the frozen base
costs nothing."""

from __future__ import annotations

import tempfile
from pathlib import Path

import peft
import torch
from test_transformers import TextTask, TokenData, assert_accounted, assert_exact, fit, gpt2

from mstore_lightning.capture.layers import select_layers
from mstore_lightning.config import CapturePolicy


def lora_gpt2() -> torch.nn.Module:
    config = peft.LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True
    )
    return peft.get_peft_model(gpt2(tie=False), config)


def test_only_the_adapters_are_planned_and_hooked():
    torch.manual_seed(0)
    model = lora_gpt2()
    plans, uncovered = select_layers(model, CapturePolicy())
    trainable = {n.rpartition(".")[0] for n, p in model.named_parameters() if p.requires_grad}
    assert set(plans) == trainable and uncovered == []
    assert all(".lora_A." in n or ".lora_B." in n for n in plans)
    assert len(plans) == 2 * 2 * 3  # 2 blocks x (c_attn, attn.c_proj, mlp.c_proj) x (A, B)


def test_a_lora_gpt2_fine_tune_captures_every_adapter_exactly():
    torch.manual_seed(0)
    task = TextTask(lora_gpt2(), "lm")
    frozen = {n: p.detach().clone() for n, p in task.named_parameters() if not p.requires_grad}
    with tempfile.TemporaryDirectory() as tmp:
        store, ref = fit(Path(tmp) / "s.zarr", task, TokenData(9, 8, padded=True), 4, epochs=2)
        assert_accounted(store, task, {})  # every trainable tensor captured, none reported
        assert all("lora_" in n for n in store.layers)
        assert_exact(store, ref, task)
    for n, p in task.named_parameters():  # the base stayed frozen
        if n in frozen:
            assert torch.equal(p, frozen[n])
