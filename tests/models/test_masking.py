import pytest
import torch

from medmae.models import random_masking, visible_count


@pytest.mark.parametrize(("n", "ratio", "keep"), [(196, 0.75, 49), (10, 0.75, 2), (10, 0.5, 5), (7, 0.0, 7)])
def test_exact_visible_count(n: int, ratio: float, keep: int) -> None:
    tokens = torch.randn(8, n, 4)
    m = random_masking(tokens, ratio, torch.Generator().manual_seed(0))
    assert visible_count(n, ratio) == keep
    assert m.visible.shape == (8, keep, 4)
    assert torch.equal(m.mask.sum(dim=1), torch.full((8,), float(n - keep)))


def test_masks_differ_per_sample_and_visible_tokens_are_the_unmasked_ones() -> None:
    tokens = torch.randn(16, 64, 3)
    m = random_masking(tokens, 0.75, torch.Generator().manual_seed(1))
    assert len({tuple(row.tolist()) for row in m.mask}) == 16
    for b in range(16):
        kept = (m.mask[b] == 0).nonzero().squeeze(1)
        assert torch.equal(kept, m.ids_keep[b])
        assert torch.equal(m.visible[b], tokens[b, kept])


def test_ids_restore_puts_visible_tokens_back_in_place() -> None:
    """What the decoder does: [visible, mask tokens] gathered by ids_restore is the full sequence."""
    tokens = torch.randn(4, 20, 2)
    m = random_masking(tokens, 0.6, torch.Generator().manual_seed(2))
    filler = torch.full((4, 20 - m.visible.shape[1], 2), float("nan"))
    full = torch.cat([m.visible, filler], dim=1).gather(1, m.ids_restore.unsqueeze(-1).expand(-1, -1, 2))
    visible = m.mask == 0
    assert torch.equal(full[visible], tokens[visible])
    assert torch.isnan(full[~visible]).all()


def test_same_generator_seed_same_mask_different_seed_different_mask() -> None:
    tokens = torch.randn(4, 49, 8)
    a = random_masking(tokens, 0.75, torch.Generator().manual_seed(5)).mask
    b = random_masking(tokens, 0.75, torch.Generator().manual_seed(5)).mask
    c = random_masking(tokens, 0.75, torch.Generator().manual_seed(6)).mask
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("ratio", [-0.1, 1.0, 0.999])
def test_bad_ratio(ratio: float) -> None:
    with pytest.raises(ValueError, match="mask_ratio"):
        random_masking(torch.randn(1, 10, 2), ratio)
