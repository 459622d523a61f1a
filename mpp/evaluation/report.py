"""PNG figures of mpp.evaluation.diagnostics arrays, and a report.md that embeds them (recipes/inspect_run.py).

Figures are bare matplotlib.figure.Figure objects, rendered by Agg on savefig: no pyplot state,
no display needed, nothing to close.
"""

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure
from matplotlib.patches import Patch, Rectangle

from mpp.evaluation import diagnostics as dg
from mpp.models.families import token_region
from mpp.models.masking import MASK_TOKEN, RANDOM_PATCH, UNCHANGED
from mpp.models.model import MPP

KIND_NAMES = {MASK_TOKEN: "[mask] token", RANDOM_PATCH: "random patch", UNCHANGED: "unchanged"}


@dataclass
class ReportFigure:
    file: str  # PNG name inside the output folder
    caption: str


@dataclass
class Skipped:
    name: str
    reason: str


def _save(fig: Figure, path: Path) -> None:
    fig.savefig(path, dpi=110, bbox_inches="tight")


def plot_predictions(pred: dict, path: Path) -> None:
    """One row per image: input with corrupted patches framed, predictions painted in, truth painted in."""
    B, p = len(pred["input"]), pred["patch_size"]
    fig = Figure(figsize=(6, 2 * B), layout="constrained")
    axes = fig.subplots(B, 3, squeeze=False)
    titles = ("input, corrupted patches framed", f"predicted ({pred['target']})", "true")
    for i in range(B):
        for ax, key, title in zip(axes[i], ("input", "predicted", "true"), titles):
            ax.imshow(pred[key][i].clip(0, 1), interpolation="nearest")
            ax.set_axis_off()
            if i == 0:
                ax.set_title(title, fontsize=8)
        for (r, c), k in np.ndenumerate(pred["kind"][i]):
            if k >= 0:
                axes[i, 0].add_patch(
                    Rectangle((c * p - 0.5, r * p - 0.5), p, p, fill=False, lw=1.2, ec=dg.KIND_RGB[int(k)])
                )
    handles = [Patch(fc="none", ec=dg.KIND_RGB[k], label=n) for k, n in KIND_NAMES.items()]
    fig.legend(handles=handles, loc="outside lower center", ncol=3, fontsize=7, frameon=False)
    _save(fig, path)


def plot_components(components: np.ndarray, path: Path) -> None:
    """Patch-embedding principal components (n, p, p, C) as tiles, 7 per row (Fig. 7 left)."""
    n = len(components)
    cols = min(7, n)
    rows = -(-n // cols)
    fig = Figure(figsize=(cols * 0.9, rows * 0.9))
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax in axes.flat:
        ax.set_axis_off()
    for ax, c in zip(axes.flat, components):
        ax.imshow(c if c.shape[-1] == 3 else c.mean(-1), cmap="gray", interpolation="nearest")
    fig.suptitle("RGB embedding filters (first principal components)", fontsize=8)
    _save(fig, path)


def plot_pos_similarity(sim: np.ndarray, path: Path) -> None:
    """sim (gh, gw, gh, gw): one small heat map per position, laid out on the patch grid (Fig. 7 centre)."""
    gh, gw = sim.shape[:2]
    size = min(0.6, 8 / max(gh, gw))
    fig = Figure(figsize=(gw * size, gh * size))
    axes = fig.subplots(gh, gw, squeeze=False, gridspec_kw=dict(wspace=0.05, hspace=0.05))
    for (i, j), ax in np.ndenumerate(axes):
        im = ax.imshow(sim[i, j], vmin=-1, vmax=1, cmap="viridis", interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
    fig.colorbar(im, ax=axes, shrink=0.6, label="cosine similarity")
    fig.supxlabel("input patch column", fontsize=8)
    fig.supylabel("input patch row", fontsize=8)
    _save(fig, path)


def plot_attention_distance(distance: np.ndarray, path: Path, img_size: int) -> None:
    """distance (L, H) in pixels: one dot per head at its layer (Fig. 7 right)."""
    L, H = distance.shape
    fig = Figure(figsize=(4, 3.2))
    ax = fig.subplots()
    for h in range(H):
        ax.scatter(np.arange(1, L + 1), distance[:, h], s=12, alpha=0.8, label=f"head {h + 1}" if H <= 16 else None)
    ax.set_xlabel("network depth (layer)")
    ax.set_ylabel("mean attention distance (pixels)")
    ax.set_ylim(0, img_size)
    ax.set_xticks(np.arange(1, L + 1))
    if H <= 16:
        ax.legend(fontsize=6, ncol=2, frameon=False)
    _save(fig, path)


def plot_rollout(images: np.ndarray, rollout: np.ndarray, path: Path) -> None:
    """images (B, H, W, 3) in [0, 1], rollout (B, gh, gw): image, image weighted by its map, the map (Fig. 6)."""
    B, H, W, _ = images.shape
    fig = Figure(figsize=(1.6 * B, 5))
    axes = fig.subplots(3, B, squeeze=False)
    for i in range(B):
        m = rollout[i] / max(rollout[i].max(), 1e-12)  # (gh, gw) in [0, 1], as in the paper's figure
        up = np.kron(m, np.ones((H // m.shape[0], W // m.shape[1])))  # (H, W) one value per patch
        axes[0, i].imshow(images[i], interpolation="nearest")
        axes[1, i].imshow(images[i] * up[..., None], interpolation="nearest")
        axes[2, i].imshow(
            rollout[i], cmap="viridis", interpolation="nearest"
        )  # own colour range: shows faint structure
        for ax in axes[:, i]:
            ax.set_axis_off()
    for ax, title in zip(axes[:, 0], ("input", "input x rollout / max", "rollout (own scale)")):
        ax.set_title(title, fontsize=8, loc="left")
    _save(fig, path)


def distance_over(encoder, images: torch.Tensor, batch_size: int = 8) -> np.ndarray:
    """(L, H) mean attention distance averaged over images (B, 3, H, W), a few at a time to bound memory."""
    # distances in pixels between the regions tokens stand for (a hybrid's patch_size is its feature-map patch, 1)
    grid, p = tuple(encoder.patch_embed.grid_size), token_region(encoder)[0]
    total = 0.0
    for chunk in images.split(batch_size):
        d = dg.mean_attention_distance(
            dg.attention_maps(encoder, chunk), grid, p, encoder.num_prefix_tokens
        )  # (L, b, H)
        total = total + d.sum(axis=1)
    return total / len(images)


def write_report(
    out_dir: Path,
    title: str,
    notes: list[str],
    figures: list[ReportFigure],
    skipped: list[Skipped],
    tables: list[str] = (),
) -> Path:
    """report.md linking each PNG with its caption, then what was skipped and why."""
    lines = [f"# {title}", ""] + [f"- {n}" for n in notes] + [""]
    for f in figures:
        lines += [f"![{Path(f.file).stem}]({f.file})", "", f"*{f.caption}*", ""]
    lines += list(tables)
    if skipped:
        lines += ["## Skipped", ""] + [f"- {s.name}: {s.reason}" for s in skipped] + [""]
    path = out_dir / "report.md"
    path.write_text("\n".join(lines))
    return path


def _layer_table(distance: np.ndarray) -> str:
    rows = [f"| {i + 1} | {d.mean():.1f} | {d.min():.1f} | {d.max():.1f} |" for i, d in enumerate(distance)]
    return "\n".join(
        [
            "## Mean attention distance per layer",
            "",
            "| layer | mean over heads (px) | min | max |",
            "|---|---|---|---|",
            *rows,
            "",
        ]
    )


def inspect_model(
    model: MPP,
    head_loaded: bool,
    images: torch.Tensor,
    distance_images: torch.Tensor,
    out_dir: Path,
    notes: list[str],
    seed: int = 0,
) -> tuple[Path, list[Skipped]]:
    """Every figure that this model allows, written to out_dir; (report.md path, what was skipped).

    images (B, 3, H, W) uint8 are shown; distance_images (M, 3, H, W) uint8 give the attention distances.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    enc = model.encoder.eval()
    figures, skipped, tables = [], [], []
    img_size = images.shape[-1]

    if head_loaded:
        pred = dg.mpp_predictions(model, images, seed=seed)
        plot_predictions(pred, out_dir / "mpp_predictions.png")
        figures.append(
            ReportFigure(
                "mpp_predictions.png",
                f"MPP predictions ({pred['target']}): corrupted patches framed, predicted and true contents painted "
                "in; "
                f"masked accuracy {pred['accuracy']:.3f} on these images.",
            )
        )
    else:
        skipped.append(
            Skipped(
                "MPP predictions",
                f"no {dg.HEAD_FILE} beside the weights, so the mask token and prediction head are unknown",
            )
        )

    plot_components(dg.patch_embed_components(enc, 28), out_dir / "patch_embed_pca.png")
    figures.append(
        ReportFigure("patch_embed_pca.png", "Figure 7 left: first principal components of the patch-embedding filters.")
    )

    try:
        plot_pos_similarity(dg.pos_embed_similarity(enc), out_dir / "pos_embed_similarity.png")
        figures.append(
            ReportFigure(
                "pos_embed_similarity.png",
                "Figure 7 centre: cosine similarity of each patch's position embedding with all others.",
            )
        )
    except ValueError as e:
        skipped.append(Skipped("position-embedding similarity", str(e)))

    try:
        distance = distance_over(enc, distance_images)  # (L, H)
        maps = dg.attention_maps(enc, images)  # (L, B, H, T, T)
    except ValueError as e:  # attention modules we cannot recompute (e.g. rotary)
        skipped += [Skipped("mean attention distance", str(e)), Skipped("attention rollout", str(e))]
    else:
        plot_attention_distance(distance, out_dir / "attention_distance.png", img_size)
        figures.append(
            ReportFigure(
                "attention_distance.png",
                f"Figure 7 right: mean attention distance of each head by layer, over {len(distance_images)} images.",
            )
        )
        tables.append(_layer_table(distance))
        rollout = dg.attention_rollout(
            maps, enc.num_prefix_tokens, tuple(enc.patch_embed.grid_size), from_class_token=enc.has_class_token
        )
        plot_rollout(images.permute(0, 2, 3, 1).numpy() / 255, rollout, out_dir / "attention_rollout.png")
        source = "the class token" if enc.has_class_token else "the mean over patch tokens (no class token)"
        figures.append(
            ReportFigure("attention_rollout.png", f"Figure 6: attention rollout from {source} onto the input.")
        )

    return write_report(out_dir, "What the ViT learned", notes, figures, skipped, tables), skipped
