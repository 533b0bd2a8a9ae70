"""Walking a latent under a 5×5 masked context model (Minnen 2018, Cheng 2020) a wavefront at a time.

The causal 5×5 mask reaches two rows up (columns j-2 … j+2) and two columns left, so position
(i, j) depends only on positions of smaller t = j + 3i. Every position of one wavefront t can then
be predicted, rounded (encoder) or read (decoder) together: an H × W latent takes
(W - 1) + 3(H - 1) + 1 sequential steps instead of H·W. Encoder and decoder call `walk` with the
same wavefronts, shapes and operations, so the decoder rebuilds the encoder's ŷ bit for bit; the
results equal the raster walk's to float precision (the batched context differs from a per-position
convolution only by rounding).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

KERNEL = 5
PAD = KERNEL // 2

# next_symbols(scales, means, rows, cols) -> (symbols, ŷ values), all (B, P, M): P positions of one
# wavefront, M latent channels. The encoder rounds its latents there; the decoder reads a stream.
NextSymbols = Callable[[Tensor, Tensor, Tensor, Tensor], tuple[Tensor, Tensor]]


def wavefronts(
    height: int, width: int, device: torch.device | None = None
) -> list[tuple[Tensor, Tensor]]:
    """(rows, cols) of the positions of each wavefront t = j + 3i, by increasing t; within one
    wavefront by increasing row."""
    fronts = []
    for t in range(width + 3 * (height - 1)):
        rows = torch.arange(max(0, -(-(t - width + 1) // 3)), min(height - 1, t // 3) + 1)
        if len(rows):
            fronts.append((rows.to(device), (t - 3 * rows).to(device)))
    return fronts


def wavefront_order(height: int, width: int) -> Tensor:
    """Flat positions (i·W + j) in the order `walk` visits them: the order of the symbols."""
    return torch.cat([rows * width + cols for rows, cols in wavefronts(height, width)])


@torch.no_grad()
def walk(
    params: Tensor,
    context_prediction: nn.Conv2d,
    entropy_parameters: nn.Module,
    next_symbols: NextSymbols,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Visit a (B, ·, H, W) latent wavefront by wavefront.

    `params` are the hyper-decoder's outputs; each wavefront's context comes from the ŷ already
    known (masked 5×5 weights as one matrix product over the gathered windows), its scales and
    means from `entropy_parameters` on (hyper, context), then `next_symbols` fixes its symbols.
    Returns ŷ, the symbols, scales and means, each (B, M, H, W)."""
    batch, _, height, width = params.shape
    channels = context_prediction.in_channels
    y_pad = params.new_zeros(batch, channels, height + 2 * PAD, width + 2 * PAD)
    symbols = params.new_zeros(batch, channels, height, width)
    scales_all = torch.zeros_like(symbols)
    means_all = torch.zeros_like(symbols)
    weight = context_prediction.weight
    taps = torch.ones(weight[0].numel(), dtype=torch.bool, device=weight.device)
    mask = getattr(context_prediction, "mask", None)  # CompressAI's MaskedConv2d keeps one
    if mask is not None:  # only the causal taps (12 of 25) can reach known values
        weight = weight * mask
        taps = mask.flatten(1).any(dim=0)
    weight = weight.flatten(1)[:, taps]
    bias = context_prediction.bias
    offsets = torch.arange(KERNEL, device=params.device)
    for rows, cols in wavefronts(height, width, params.device):
        n = len(rows)
        window_rows = (rows[:, None] + offsets)[:, :, None].expand(-1, KERNEL, KERNEL)
        window_cols = (cols[:, None] + offsets)[:, None, :].expand(-1, KERNEL, KERNEL)
        windows = y_pad[:, :, window_rows, window_cols]  # (B, C, P, 5, 5)
        windows = windows.transpose(1, 2).reshape(batch * n, -1)[:, taps]
        ctx = windows @ weight.T
        if bias is not None:
            ctx = ctx + bias
        hyper = params[:, :, rows, cols].transpose(1, 2).reshape(batch * n, -1)
        joint = torch.cat((hyper, ctx), dim=1).T[None, :, None, :]  # (1, C' + C, 1, B·P)
        gaussian = entropy_parameters(joint)[0, :, 0, :].T.reshape(batch, n, -1)
        scales, means = gaussian.chunk(2, dim=2)  # (B, P, M) each
        q, values = next_symbols(scales, means, rows, cols)
        y_pad[:, :, rows + PAD, cols + PAD] = values.transpose(1, 2)
        symbols[:, :, rows, cols] = q.transpose(1, 2)
        scales_all[:, :, rows, cols] = scales.transpose(1, 2)
        means_all[:, :, rows, cols] = means.transpose(1, 2)
    y_hat = y_pad[:, :, PAD : PAD + height, PAD : PAD + width]
    return y_hat, symbols, scales_all, means_all
