"""Only LoRA parameters get gradients and only they change under AdamW."""

from __future__ import annotations

import torch
from torch import nn

from lora_torch import freeze_base_model, inject_lora, lora_parameters, unfreeze_lora_parameters


def _causal_lm_loss(model, token_ids):
    return model(token_ids, labels=token_ids).loss


def test_grads_exist_only_on_lora_params(tiny_model, token_ids, randomize_lora):
    freeze_base_model(inject_lora(tiny_model, ["c_attn", "c_proj"], rank=4, verbose=False))
    randomize_lora(tiny_model)
    _causal_lm_loss(tiny_model, token_ids).backward()
    lora_names = {name for name, _ in lora_parameters(tiny_model)}
    assert len(lora_names) == 12  # 2 layers x 3 modules x (A, B)
    for name, param in tiny_model.named_parameters():
        if name in lora_names:
            assert param.grad is not None and param.grad.abs().sum().item() > 0, name
        else:
            assert param.grad is None, name


def test_adamw_steps_change_only_lora(tiny_model, token_ids, snapshot):
    freeze_base_model(inject_lora(tiny_model, ["c_attn", "c_proj"], rank=4, verbose=False))
    tiny_model.train()
    before = snapshot(tiny_model)
    trainable = [p for p in tiny_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=5e-4, weight_decay=0.01)
    losses = []
    for _ in range(4):
        optimizer.zero_grad()
        loss = _causal_lm_loss(tiny_model, token_ids)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        losses.append(loss.item())
    after = tiny_model.state_dict()
    changed = sorted(name for name in before if not torch.equal(before[name], after[name]))
    assert changed == sorted(name for name, _ in lora_parameters(tiny_model))
    assert losses[-1] < losses[0]  # B left zero after step 1, so the adapter is really learning


def test_freeze_then_unfreeze_sets_flags():
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 2))
    inject_lora(model, ["1"], rank=2, verbose=False)
    model.requires_grad_(False)
    unfreeze_lora_parameters(model)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["1.lora.lora_A", "1.lora.lora_B"]
    model.requires_grad_(True)
    freeze_base_model(model)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["1.lora.lora_A", "1.lora.lora_B"]


def test_base_param_named_like_lora_is_still_frozen():
    # The tutorial decided by a "lora_" substring; a base module called "explora_head" would have trained.
    model = nn.Module()
    model.explora_head = nn.Linear(3, 3)
    freeze_base_model(model)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == []
