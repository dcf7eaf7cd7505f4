"""Fine-tuning schedule: warmup + cosine per layer-decay group, and decoder-first (LP-FT) holding."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from medmae.finetune.layer_decay import drop_untrained, layer_decay_groups
from medmae.finetune.schedule import adamw_warmup_cosine
from medmae.train.schedule import lr_at_step


class TinySegmenter(nn.Module):
    """Names as the light decoder has them: an encoder (embedding, two blocks, final norm) and a decoder."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.ModuleDict(
            {
                "patch_embed": nn.Linear(4, 4),
                "blocks": nn.ModuleList([nn.Linear(4, 4), nn.Linear(4, 4)]),
                "norm": nn.LayerNorm(4),
            }
        )
        self.head = nn.Linear(4, 2)


def lrs_over(steps: int, hold: int, warmup: int = 3, layer_decay: float = 0.5) -> list[dict[str, float]]:
    net = TinySegmenter()
    groups = layer_decay_groups(net.named_parameters(), depth=2, layer_decay=layer_decay, weight_decay=0.05,
                                encoder_prefix="encoder.")  # fmt: skip
    names = [g["names"][0] for g in groups]
    conf = adamw_warmup_cosine(groups, 1e-3, 1e-6, warmup, steps, encoder_hold=hold)
    opt, sched = conf["optimizer"], conf["lr_scheduler"]["scheduler"]
    seen = []
    for _ in range(steps):
        seen.append({n: g["lr"] for n, g in zip(names, opt.param_groups, strict=True)})
        opt.step()
        sched.step()
    return seen


def test_encoder_holds_at_zero_then_warms_up_while_the_decoder_runs_its_own_schedule() -> None:
    steps, hold, warmup = 20, 8, 3
    seen = lrs_over(steps, hold, warmup)
    block, embed, head = "encoder.blocks.1.weight", "encoder.patch_embed.weight", "head.weight"
    for step, lrs in enumerate(seen):
        assert lrs[head] == pytest.approx(lr_at_step(step, 1e-3, 1e-6, warmup, steps))  # decoder: unchanged
        if step < hold:
            assert lrs[block] == 0.0 and lrs[embed] == 0.0
        else:  # the held groups: their own warmup and cosine over the remaining steps, scaled by layer decay
            want = lr_at_step(step - hold, 1e-3, 1e-6, warmup, steps - hold)
            assert lrs[block] == pytest.approx(0.5 * want) and lrs[embed] == pytest.approx(0.5**3 * want)
    assert seen[hold][block] > 0


def test_held_encoder_weights_do_not_move_and_the_final_norm_is_not_held() -> None:
    net = TinySegmenter()
    groups = layer_decay_groups(net.named_parameters(), depth=2, layer_decay=0.75, weight_decay=0.05,
                                encoder_prefix="encoder.")  # fmt: skip
    held = {n for g in groups if g["encoder"] for n in g["names"]}
    assert held == {f"encoder.{m}.{p}" for m in ("patch_embed", "blocks.0", "blocks.1") for p in ("weight", "bias")}
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    conf = adamw_warmup_cosine(groups, 1e-2, 1e-6, 1, 10, encoder_hold=5)
    opt, sched = conf["optimizer"], conf["lr_scheduler"]["scheduler"]
    for _ in range(5):
        opt.zero_grad()
        enc = net.encoder
        x = enc["blocks"][1](enc["blocks"][0](enc["patch_embed"](torch.randn(8, 4))))
        net.head(enc["norm"](x)).pow(2).sum().backward()
        opt.step()
        sched.step()
    after = dict(net.named_parameters())
    for name in before:
        assert torch.equal(before[name], after[name]) == (name in held), name  # weight decay included


def test_hold_must_leave_steps_to_fine_tune() -> None:
    with pytest.raises(ValueError, match="encoder_hold_steps must be in \\[0, 10\\)"):
        lrs_over(10, hold=10)


def test_drop_untrained_renumbers_the_kept_moments_and_leaves_a_mismatch_alone() -> None:
    state = {
        "state": {0: {"step": 1}, 1: {"step": 2}, 2: {"step": 3}, 3: {"step": 4}},
        "param_groups": [{"params": [0, 1], "lr": 1.0}, {"params": [2, 3], "lr": 2.0}],
    }
    saved_names = [["a", "frozen"], ["b", "c"]]
    got = drop_untrained(state, saved_names, trained={"a", "b", "c"})
    assert got["param_groups"] == [{"params": [0], "lr": 1.0}, {"params": [1, 2], "lr": 2.0}]
    assert got["state"] == {0: {"step": 1}, 1: {"step": 3}, 2: {"step": 4}}
    assert drop_untrained(state, [["a"], ["b", "c"]], trained={"a", "b", "c"}) is state  # sizes differ: untouched
