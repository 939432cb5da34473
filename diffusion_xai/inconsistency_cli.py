"""``diffusion-xai localize IMAGE "caption" --out DIR``: text-image inconsistency localisation (D-TIIL).

Writes into ``DIR``: ``result/`` (the full :class:`~diffusion_xai.inconsistency.InconsistencyResult`),
``image.png``, ``mask.png`` (binary region), ``overlay.png`` (soft region over the image), ``edited.png``
(the text-consistent edit), ``localize.png`` (image | region | edit, caption words shaded by score) and
``localize.json`` (score, decision, words and their scores, files, settings).
"""

from __future__ import annotations

import json
from pathlib import Path

from . import inconsistency as inc


def register(subparsers) -> None:
    """Add the ``localize`` subcommand to the CLI's subparsers."""
    p = subparsers.add_parser("localize", help="which words of a caption and which pixels of an image disagree "
                                               "(D-TIIL)")
    p.add_argument("image", help="image file (converted to RGB; size must be a multiple of the VAE factor)")
    p.add_argument("caption")
    p.add_argument("--align-steps", type=int, default=inc.DEFAULT_ALIGN_STEPS,
                   help=f"Adam steps of each embedding alignment (default {inc.DEFAULT_ALIGN_STEPS})")
    p.add_argument("--lr", type=float, default=inc.DEFAULT_LR, help=f"Adam learning rate (default {inc.DEFAULT_LR})")
    p.add_argument("--align-batch", type=int, default=inc.DEFAULT_ALIGN_BATCH,
                   help=f"(t, noise) samples per alignment step (default {inc.DEFAULT_ALIGN_BATCH})")
    p.add_argument("--strength", type=float, default=inc.DEFAULT_STRENGTH, help="noise level of the masks, (0, 1)")
    p.add_argument("--mask-seeds", type=int, default=inc.DEFAULT_MASK_SEEDS, help="noises averaged per mask")
    p.add_argument("--mask-threshold", type=float, default=inc.DEFAULT_MASK_THRESHOLD,
                   help=f"edit-region threshold (default {inc.DEFAULT_MASK_THRESHOLD})")
    p.add_argument("--final-threshold", type=float, default=None,
                   help="final-region threshold (default: the model's calibration for the alignment settings, "
                        f"else {inc.DEFAULT_FINAL_THRESHOLD})")
    p.add_argument("--blur", type=float, default=inc.DEFAULT_BLUR_SIGMA, help="mask blur sigma in latent pixels")
    p.add_argument("--refine-tolerance", type=float, default=inc.DEFAULT_REFINE_TOLERANCE,
                   help="RGB distance (0..255) of the pixel refinement of the final mask "
                        f"(default {inc.DEFAULT_REFINE_TOLERANCE:g}; 0 turns it off)")
    p.add_argument("--word-score", choices=inc.WORD_SCORES, default=inc.DEFAULT_WORD_SCORE,
                   help=f"which word score picks the word (default {inc.DEFAULT_WORD_SCORE})")
    p.add_argument("--threshold", type=float, default=None,
                   help="consistency decision threshold (default: the model's calibration for the alignment "
                        f"settings, stored by benchmarks/inconsistency.py, else {inc.DEFAULT_THRESHOLD})")
    p.add_argument("--word-samples", type=int, default=inc.DEFAULT_WORD_SAMPLES, help="samples of the word scores")
    p.add_argument("--inpaint", default=None,
                   help="folder / hub id of a diffusers inpainting pipeline for the edit (default: masked latent "
                        "blending with the analysed model)")
    p.add_argument("--steps", type=int, default=None, help="denoising steps of the edit")
    p.add_argument("--guidance", type=float, default=None, help="guidance scale of the edit")
    p.add_argument("--model", default="shapesworld",
                   help="'shapesworld' (embedded, default), 'tiny-random', or a diffusers folder / hub id")
    p.add_argument("--device", default=None, help="e.g. cpu, cuda (default: where the model loads)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="out", help="output folder")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(func=cmd_localize)


def cmd_localize(a) -> int:
    """Run the ``localize`` subcommand (see the module docstring for the files it writes)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    from .cli import load_model

    path = Path(a.image)
    if not path.exists():
        raise FileNotFoundError(f"image {path} does not exist")
    with Image.open(path) as im:
        image = im.convert("RGB")
    xp = load_model(a.model, a.device)
    inpaint = None
    if a.inpaint:
        from diffusers import AutoPipelineForInpainting

        inpaint = AutoPipelineForInpainting.from_pretrained(a.inpaint)
        if a.device:
            inpaint = inpaint.to(a.device)
    res = inc.localize_inconsistency(
        xp, image, a.caption, align_steps=a.align_steps, lr=a.lr, align_batch=a.align_batch, strength=a.strength,
        num_mask_seeds=a.mask_seeds, mask_threshold=a.mask_threshold, final_threshold=a.final_threshold,
        blur_sigma=a.blur, refine_tolerance=a.refine_tolerance or None, word_score=a.word_score,
        threshold=a.threshold, word_samples=a.word_samples, inpaint_pipeline=inpaint,
        num_inference_steps=a.steps, guidance_scale=a.guidance, seed=a.seed, progress=not a.no_progress)
    out = Path(a.out)
    res.save(out / "result")
    files = {name: str(out / f"{name}.png") for name in ("image", "mask", "overlay", "edited", "localize")}
    res.image.save(files["image"])
    Image.fromarray(res.mask.numpy().astype("uint8") * 255).save(files["mask"])
    res.overlay().save(files["overlay"])
    res.edited_image.save(files["edited"])
    fig = res.plot()
    fig.savefig(files["localize"], dpi=120)
    plt.close(fig)
    summary = {**res.to_dict(), "image_file": str(path), "model": a.model, "files": files}
    (out / "localize.json").write_text(json.dumps(summary, indent=2))
    verdict = "consistent" if res.consistent else "INCONSISTENT"
    print(f"{verdict}: score {res.score:.4f} (threshold {res.threshold:.4f})")
    print("word scores: " + ", ".join(f"{w}={s:+.4g}" for w, s in res.word_score_dict().items()))
    if not res.consistent:
        print(f"inconsistent word(s): {', '.join(res.inconsistent_words) or '-'}; "
              f"region: {100 * float(res.mask.float().mean()):.1f}% of the image")
    print(f"{res.unet_evals} UNet evals in {res.seconds:.1f} s; wrote {out / 'localize.json'}")
    return 0


__all__ = ["cmd_localize", "register"]
