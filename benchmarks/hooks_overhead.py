"""Foundation benchmarks: recording overhead, recorder memory vs steps, predict_noise throughput.

    python benchmarks/hooks_overhead.py [--quick]

Prints tables and writes benchmarks/results/hooks_overhead.json. All ratios are measured in one
run with interleaved repetitions (this machine is noisy).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import interleaved, table, write_json  # noqa: E402

from diffusion_xai import AttentionRecorder, XAIPipeline  # noqa: E402
from diffusion_xai.testing import architecture_pipeline, tiny_pipeline  # noqa: E402


def model(name: str) -> tuple[XAIPipeline, int]:
    if name == "shapesworld":
        try:
            return XAIPipeline.shapesworld(), 64
        except FileNotFoundError:
            name = "tiny-random"
    if name == "tiny-random":
        return XAIPipeline(tiny_pipeline("sd1")), 64
    return XAIPipeline(architecture_pipeline(name)), 256


def overhead(xp: XAIPipeline, size: int, steps: int, reps: int) -> dict:
    def plain():
        xp.generate("a red circle on the left", seed=0, num_inference_steps=steps, height=size, width=size,
                    output_type="latent", progress=False)

    def recorded():
        with xp.hooks(AttentionRecorder()):
            plain()
    t = interleaved({"plain": plain, "recorded": recorded}, reps=reps)
    return {"plain_s": t["plain"], "recorded_s": t["recorded"], "ratio": t["recorded"] / t["plain"]}


def memory(xp: XAIPipeline, size: int) -> list[dict]:
    rows = []
    for steps in (10, 50):
        for per_step in (False, True):
            rec = AttentionRecorder(per_step=per_step)
            with xp.hooks(rec):
                xp.generate("a red circle", seed=0, num_inference_steps=steps, height=size, width=size,
                            output_type="latent", progress=False)
            rows.append({"steps": steps, "per_step_bins": per_step, "state_MiB": rec.state_bytes() / 2**20})
    return rows


def throughput(xp: XAIPipeline, size: int, n: int, batch: int, reps: int) -> dict:
    f = xp.vae_scale_factor
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 4, size // f, size // f, generator=g)
    t = torch.randint(0, 1000, (n,), generator=g)
    emb = xp.encode_prompt("a red circle")
    enc = emb.embeds.expand(batch, -1, -1)

    def wrapped():
        xp.predict_noise(x, t, emb, batch_size=batch)

    @torch.no_grad()
    def direct():
        for i in range(0, n, batch):
            _ = xp.unet(x[i:i + batch], t[i:i + batch], encoder_hidden_states=enc[: x[i:i + batch].shape[0]]).sample
    tm = interleaved({"direct": direct, "predict_noise": wrapped}, reps=reps)
    return {"direct_s": tm["direct"], "predict_noise_s": tm["predict_noise"],
            "throughput_ratio": tm["direct"] / tm["predict_noise"]}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true", help="fewer repetitions, no SD 1.5 architecture")
    p.add_argument("--models", default=None, help="comma-separated subset of shapesworld,sd15")
    a = p.parse_args()
    reps = 3 if a.quick else 5
    results = {}
    rows = []
    names = a.models.split(",") if a.models else ["shapesworld"] + ([] if a.quick else ["sd15"])
    for name in names:
        xp, size = model(name)
        steps = 20 if name == "shapesworld" else 2
        r = overhead(xp, size, steps, reps if name == "shapesworld" else 3)
        thr = throughput(xp, size, n=256 if name == "shapesworld" else 8,
                         batch=64 if name == "shapesworld" else 4, reps=reps if name == "shapesworld" else 2)
        results[name] = {"size": size, "steps": steps, **r, **thr}
        rows.append({"model": name, "size": f"{size}x{size}", "steps": steps, "plain_s": r["plain_s"],
                     "recorded_s": r["recorded_s"], "overhead_ratio": r["ratio"],
                     "predict_noise_throughput": thr["throughput_ratio"]})
        if name == "shapesworld":
            results["memory"] = memory(xp, size)
        del xp
    print(table(rows, "Recording overhead (full cross-attention recording / none) and predict_noise throughput "
                      "(direct unet / predict_noise)"))
    if "memory" in results:
        print()
        print(table(results["memory"], "Recorder state vs number of steps (ShapesWorld model)"))
    print("\nwrote", write_json("hooks_overhead_" + "_".join(names), results))


if __name__ == "__main__":
    main()
