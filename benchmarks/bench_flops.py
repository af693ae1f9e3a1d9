"""What the GPU parts of each stage cost at real size, counted, not timed: the floating-point operations of the
released VAEs and of the GPU preset's networks (presets/real.yaml), from PyTorch's FlopCounterMode on the
meta device (nothing is computed, so it runs on any machine in seconds).

    python benchmarks/bench_flops.py [--tflops 100]

Seconds are FLOPs divided by an assumed sustained throughput (``--tflops``, default 100 TFLOP/s: about a third
of an H100's dense bf16 peak, what convolution-heavy 3D networks reach in practice). They are estimates,
labelled as such in docs/real-size.md; a GPU run replaces them with measurements.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch
import yaml
from torch.utils.flop_counter import FlopCounterMode

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from ctdiff.models.denoiser import build_unet  # noqa: E402
from ctdiff.models.reference import build_reference_net  # noqa: E402
from ctdiff.models.vae.maisi import maisi_config  # noqa: E402
from ctdiff.params import leaves, params_from_dict, read_params_yaml, set_dotted  # noqa: E402

VOLUME = (300, 512, 512)  # a real thin series (D, H, W)
SD_RELEASED = {"in_channels": 3, "out_channels": 3, "down_block_types": ["DownEncoderBlock2D"] * 4,
               "up_block_types": ["UpDecoderBlock2D"] * 4, "block_out_channels": [128, 256, 512, 512],
               "layers_per_block": 2, "latent_channels": 4, "norm_num_groups": 32}


def flops(fn) -> float:
    with torch.device("meta"), FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


def gpu_params():
    raw = set_dotted(read_params_yaml(REPO / "params.yaml"),
                     leaves(yaml.safe_load((REPO / "presets" / "real.yaml").read_text())))
    return params_from_dict(raw)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tflops", type=float, default=100.0, help="assumed sustained TFLOP/s")
    args = parser.parse_args()
    params = gpu_params()
    voxels = math.prod(VOLUME)
    from diffusers import AutoencoderKL
    from monai.apps.generation.maisi.networks.autoencoderkl_maisi import AutoencoderKlMaisi

    with torch.device("meta"):
        sd = AutoencoderKL(**SD_RELEASED)
        maisi = AutoencoderKlMaisi(**maisi_config(params.vae.maisi.arch, 4), norm_float16=False, num_splits=1,
                                   dim_split=1)
    sd_encode = flops(lambda: sd.encode(torch.empty(1, 3, 512, 512)).latent_dist.mean) * VOLUME[0]
    sd_decode = flops(lambda: sd.decode(torch.empty(1, 4, 64, 64))) * VOLUME[0]
    cube = 64
    maisi_encode = flops(lambda: maisi.encode(torch.empty(1, 1, cube, cube, cube))) / cube**3 * voxels
    maisi_decode = flops(lambda: maisi.decode(torch.empty(1, 4, cube // 4, cube // 4, cube // 4))) / cube**3 * voxels

    tp, ep, sp = params.train, params.train.sampling, params.sr_reference
    rows = []
    for arm, down, enc, dec in (("sd", (1, 8, 8), sd_encode, sd_decode), ("maisi", (4, 4, 4), maisi_encode,
                                                                          maisi_decode)):
        latent_patch = [p // f for p, f in zip(tp.patch, down)]
        latent_volume = [math.ceil(s / f) for s, f in zip(VOLUME, down)]
        with torch.device("meta"):
            unet = build_unet(tp.unet, 4)
        window = flops(lambda: unet(torch.empty(1, 8, *latent_patch), timesteps=torch.empty(1)))  # noqa: B023
        step = 3 * window * tp.batch_size  # forward + backward of a batch
        # evaluate: windows at train.sampling.overlap over the whole latent, per sampling step and draw
        stride = [max(1, int(p * (1 - ep.overlap))) for p in latent_patch]
        windows = math.prod(max(1, math.ceil((v - p) / s) + 1) for v, p, s in zip(latent_volume, latent_patch, stride))
        sampling = windows * window * ep.steps * ep.samples
        rows += [
            (arm, "vae_check (per case)", "encode + decode", enc + dec),
            (arm, "train (per case, once)", "encode the case's two volumes for the latent cache", 2 * enc),
            (arm, "train (per step)", f"UNet forward + backward, batch {tp.batch_size}", step),
            (arm, "evaluate (per case)", f"{ep.samples} draws x {ep.steps} steps x {windows} latent windows + "
                                         f"{ep.samples + 2} decodes + 2 encodes", sampling + (ep.samples + 2) * dec
             + 2 * enc),
        ]
    with torch.device("meta"):
        net = build_reference_net(sp)
    ref_window = flops(lambda: net(torch.empty(1, 1, *sp.patch)))
    ref_windows = math.prod(max(1, math.ceil((v - p) / int(p * (1 - sp.overlap))) + 1)
                            for v, p in zip(VOLUME, sp.patch))
    rows += [("both", "sr_reference (per step)", f"UNet forward + backward, batch {sp.batch_size}",
              3 * ref_window * sp.batch_size),
             ("both", "sr_reference / evaluate (per case)", f"{ref_windows} windows, forward",
              ref_windows * ref_window)]
    print(f"GPU work at real size ({' x '.join(map(str, VOLUME))}), presets/real.yaml; seconds at an assumed "
          f"{args.tflops:g} TFLOP/s sustained:\n")
    print("| arm | stage part | what | TFLOP | est. s |")
    print("|---|---|---|---:|---:|")
    for arm, part, what, total in rows:
        print(f"| {arm} | {part} | {what} | {total / 1e12:.3g} | {total / (args.tflops * 1e12):.3g} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
