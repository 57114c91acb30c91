"""The clean-context block-diffusion objective (SDAR / BD3-LM style), for ``lopa train --objective block_diffusion``.

Blocks are aligned at absolute position 0. Each training row holds two copies of one sequence side by side:
a noisy copy, whose answer tokens are masked block by block (one ratio per block, uniform in (0, 1), at least
one mask per sequence), and the clean sequence. A noisy block attends to itself (bidirectionally) and to the
clean blocks before it; a clean block attends to the clean blocks up to itself. Both copies sit at the same
positions (0..T-1), so the noisy block sees exactly the context it will see at inference: the committed
K/V of the finished blocks before it. The loss is cross-entropy on the masked answer positions, predicted
at their own position (no logit shift, as in SDAR).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..models.transformer import Transformer


def bd_mask(T: int, block_size: int) -> torch.Tensor:
    """bool [2T, 2T] (True = may attend): queries and keys are the noisy copy [0, T) then the clean one [T, 2T)."""
    block = torch.arange(T) // block_size
    same = block[:, None] == block[None, :]
    before = block[None, :] < block[:, None]
    upto = block[None, :] <= block[:, None]
    noisy = torch.cat([same, before], dim=1)  # [T, 2T]
    clean = torch.cat([torch.zeros_like(same), upto], dim=1)
    return torch.cat([noisy, clean], dim=0)


def make_bd_batch(pairs, block_size: int, mask_id: int, eos: int, rng: torch.Generator):
    """(prompt ids, answer ids) pairs -> tokens [B, 2T] (noisy, clean), targets [B, T], loss mask [B, T].
    Each sequence is padded with EOS to the end of its last block (the EOS block is learned whole)."""
    ends = [-(-(len(p) + len(a)) // block_size) * block_size for p, a in pairs]
    T = max(ends)
    clean = torch.full((len(pairs), T), eos, dtype=torch.long)
    loss_mask = torch.zeros(len(pairs), T, dtype=torch.bool)
    for b, ((p, a), end) in enumerate(zip(pairs, ends)):
        clean[b, : len(p) + len(a)] = torch.tensor(p + a)
        answer = torch.arange(len(p), end)  # the answer and its EOS padding
        blocks = answer // block_size
        ratios = torch.rand(int(blocks[-1] - blocks[0]) + 1, generator=rng)
        masked = torch.rand(len(answer), generator=rng) < ratios[blocks - blocks[0]]
        if not masked.any():
            masked[torch.randint(len(answer), (1,), generator=rng)] = True
        loss_mask[b, answer[masked]] = True
    noisy = clean.masked_fill(loss_mask, mask_id)
    return torch.cat([noisy, clean], dim=1), clean, loss_mask


def bd_loss(model: Transformer, tokens: torch.Tensor, targets: torch.Tensor, loss_mask: torch.Tensor,
            block_size: int) -> torch.Tensor:
    """Masked-token cross-entropy of the noisy copy under bd_mask; both copies at positions 0..T-1."""
    T = targets.shape[1]
    positions = torch.arange(T, device=tokens.device).repeat(2)  # [2T]
    hidden = model(tokens, attn_mask=bd_mask(T, block_size).to(tokens.device), positions=positions)
    logits = model.lm_head(hidden[:, :T]).float()  # [B, T, V]: position i predicted at i
    return F.cross_entropy(logits[loss_mask], targets[loss_mask])
