"""Rate-distortion plots: PSNR and MS-SSIM (dB) against bpp, one line per curve."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from src.evaluation.metrics import ms_ssim_db  # noqa: E402


def plot_rd(curves: dict[str, dict[str, list[float]]], path: str | Path) -> Path:
    """Draw `{name: {"bpp": [...], "psnr": [...], "ms_ssim": [...]}}` side by side into `path`."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, curve in curves.items():
        order = sorted(range(len(curve["bpp"])), key=lambda i: curve["bpp"][i])
        bpp = [curve["bpp"][i] for i in order]
        style = "o-" if len(bpp) > 1 else "o"
        left.plot(bpp, [curve["psnr"][i] for i in order], style, label=name, markersize=4)
        right.plot(
            bpp,
            [float(ms_ssim_db(curve["ms_ssim"][i])) for i in order],
            style,
            label=name,
            markersize=4,
        )
    for ax, ylabel in ((left, "PSNR-RGB (dB)"), (right, "MS-SSIM-RGB (dB)")):
        ax.set_xlabel("bits per pixel")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    left.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
