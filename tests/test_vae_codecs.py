"""The SD and MAISI latent codecs: shapes on odd sizes, intensity mapping, tiling, strict manifest loading."""

import io
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from paramkit import repo_params
from vae_helpers import (  # single_torch_thread is a fixture
    as_params,
    single_torch_thread,  # noqa: F401
    synthetic_ct,
    tiny_params,
)

from ctdiff.models.vae.maisi import MaisiCodec, maisi_config
from ctdiff.models.vae.weights import (
    MANIFEST_JSON,
    WeightsError,
    load_vae,
    new_codec,
    runtime_settings,
    save_weights,
    scratch_config,
    write_manifest,
)

pytestmark = pytest.mark.usefixtures("single_torch_thread")
HU_RANGE = (-1000.0, 1000.0)


def _codec(use_maisi: bool, **overrides):
    vae = as_params(tiny_params(use_maisi, **overrides)).vae
    torch.manual_seed(0)
    return new_codec(vae, HU_RANGE, scratch_config(vae)), vae


@pytest.mark.parametrize(
    ("use_maisi", "shape", "latent_shape", "downsample"),
    [(True, (13, 21, 19), (4, 4, 6, 5), (4, 4, 4)), (False, (5, 21, 19), (4, 5, 3, 3), (1, 8, 8))],
    ids=["maisi", "sd"],
)
def test_round_trip_of_odd_sizes_keeps_the_shape(use_maisi, shape, latent_shape, downsample):
    codec, _ = _codec(use_maisi)
    hu = torch.from_numpy(synthetic_ct(shape, 0))[None, None]
    assert codec.downsample == downsample
    assert codec.latent_shape(shape) == latent_shape
    latent = codec.encode_hu(hu)
    assert tuple(latent.shape) == (1, *latent_shape)
    mean, std = codec.encode_posterior_hu(hu)
    torch.testing.assert_close(mean, latent)
    assert std.shape == mean.shape and (std > 0).all()
    recon_x01, z_mu, z_sigma = codec.reconstruct_train(codec.pad(codec.hu_to_x01(hu)))
    assert z_mu.shape == z_sigma.shape == latent.shape and recon_x01.requires_grad
    recon = codec.decode_hu(latent, shape)
    assert tuple(recon.shape) == (1, 1, *shape)
    assert recon.dtype == torch.float32 and recon.min() >= -1000.0 and recon.max() <= 1000.0
    assert codec.decode_hu(latent).shape[2:] == tuple(s * f for s, f in zip(latent_shape[1:], downsample))


def test_sd_latent_holds_one_slice_per_input_slice():
    codec, _ = _codec(False)
    hu = torch.from_numpy(synthetic_ct((6, 16, 16), 0))[None, None]
    whole = codec.encode_hu(hu)
    for k in (0, 5):  # slices are independent: one slice alone encodes to the same latent slice
        alone = codec.encode_hu(hu[:, :, k : k + 1])
        torch.testing.assert_close(alone[:, :, 0], whole[:, :, k], rtol=1e-4, atol=1e-5)


def test_intensity_mapping_round_trips_inside_the_range():
    codec, _ = _codec(True)
    hu = torch.tensor([-1500.0, -1000.0, -250.0, 0.0, 999.0, 3000.0])
    x01 = codec.hu_to_x01(hu)
    assert x01.tolist() == pytest.approx([0.0, 0.0, 0.375, 0.5, 0.9995, 1.0])
    assert codec.x01_to_hu(x01).tolist() == pytest.approx([-1000.0, -1000.0, -250.0, 0.0, 999.0, 1000.0])
    assert codec.compression_ratio((16, 16, 16)) == 16.0


def _untiled_twin(codec: MaisiCodec, vae) -> MaisiCodec:
    twin = MaisiCodec(codec.config, HU_RANGE, tile=(128, 128, 128), overlap=vae.maisi.overlap)
    twin.module.load_state_dict(codec.module.state_dict())
    return twin


def test_tiles_stitch_exactly_onto_latent_voxels():
    # With a purely local encoder (4x4x4 mean) and decoder (nearest 4x upsampling) every tile computes
    # exactly what the whole volume would, so tiled == untiled shows the windows sit on latent voxels
    # and are blended and cropped back correctly.
    codec, vae = _codec(True, **{"maisi.tile": [16, 16, 16]})
    twin = _untiled_twin(codec, vae)
    for c in (codec, twin):
        c.module.encode = lambda x: (F.avg_pool3d(x, 4), F.max_pool3d(x, 4))  # (mean, "std")
        c.module.decode = lambda z: F.interpolate(z, scale_factor=4, mode="nearest")
    hu = torch.from_numpy(synthetic_ct((45, 50, 47), 1))[None, None]
    latent, std = twin.encode_posterior_hu(hu)
    for tiled, whole in zip(codec.encode_posterior_hu(hu), (latent, std)):
        torch.testing.assert_close(tiled, whole, rtol=0, atol=1e-5)
    torch.testing.assert_close(codec.decode_hu(latent, hu.shape[2:]), twin.decode_hu(latent, hu.shape[2:]),
                               rtol=0, atol=1e-2)


def test_tiled_and_untiled_maisi_agree_on_a_volume_larger_than_the_tile():
    # The real network: tiles see their own group-norm statistics and a cut receptive field, so results
    # differ; a random-weight network is the most sensitive case, hence correlation bounds.
    codec, vae = _codec(True, **{"maisi.tile": [32, 32, 32]})
    twin = _untiled_twin(codec, vae)
    hu = torch.from_numpy(synthetic_ct((34, 37, 18), 1))[None, None]  # 2 x 2 x 1 tiles
    latent_tiled, latent = codec.encode_hu(hu), twin.encode_hu(hu)
    assert np.corrcoef(latent_tiled.flatten(), latent.flatten())[0, 1] > 0.95
    recon_tiled, recon = codec.decode_hu(latent, hu.shape[2:]), twin.decode_hu(latent, hu.shape[2:])
    assert np.corrcoef(recon_tiled.flatten(), recon.flatten())[0, 1] > 0.85


def test_tiles_that_do_not_start_on_latent_voxels_are_rejected():
    vae = as_params(tiny_params(True, **{"maisi.tile": [16, 16, 16], "maisi.overlap": 0.4})).vae
    with pytest.raises(ValueError, match="multiple of 4"):
        new_codec(vae, HU_RANGE, scratch_config(vae))


@pytest.mark.parametrize("use_maisi", [True, False], ids=["maisi", "sd"])
def test_manifest_round_trip_is_verified_and_strict(tmp_path, use_maisi):
    codec, vae = _codec(use_maisi)
    vae_dir = tmp_path / "vae"
    vae_dir.mkdir()
    files = save_weights(codec, vae_dir)
    write_manifest(vae_dir, codec, ".", files, {"origin": "scratch", "epochs": 0, "width": [8]},
                   runtime_settings(vae))

    loaded = load_vae(vae_dir)  # everything from the manifest: no params
    assert loaded.manifest["weights"]["origin"] == "scratch" and loaded.name == codec.name
    assert loaded.hu_range == HU_RANGE and loaded.manifest["runtime"] == runtime_settings(vae)
    hu = torch.from_numpy(synthetic_ct((8, 16, 16), 0))[None, None]
    torch.testing.assert_close(loaded.encode_hu(hu), codec.encode_hu(hu))
    np.testing.assert_array_equal(loaded.round_trip(hu[0, 0].numpy()),
                                  codec.decode_hu(codec.encode_hu(hu), hu.shape[2:])[0, 0].numpy())

    weights = vae_dir / next(iter(files))
    weights.write_bytes(weights.read_bytes() + b"\0")
    with pytest.raises(WeightsError, match="sha256"):
        load_vae(vae_dir)
    (vae_dir / MANIFEST_JSON).unlink()
    with pytest.raises(WeightsError, match="run the vae_fit stage"):
        load_vae(vae_dir)


def test_released_maisi_architecture_matches_the_published_checkpoint():
    """``vae.maisi.arch`` (the committed defaults) against public facts about the released weights.

    ``MONAI/maisi_ct_generative`` ``models/autoencoder.pt`` (sha256 ``1f8a7a05...``, pinned in params) is
    byte-identical to ``nvidia/NV-Generate-CT`` ``models/autoencoder_v1.pt``: 83,831,868 bytes holding a
    state dict of 130 tensors. The key names themselves are checked by strict loading at fetch time.
    """
    vae = repo_params({"vae.use_maisi": True}).vae
    assert vae.maisi.hub.sha256.startswith("1f8a7a05")
    state = new_codec(vae, HU_RANGE, maisi_config(vae.maisi.arch, vae.latent_channels)).module.state_dict()
    buf = io.BytesIO()
    torch.save(state, buf)
    assert len(state) == 130
    assert abs(len(buf.getvalue()) - 83_831_868) < 0.001 * 83_831_868  # the pickle's names differ a little


def test_maisi_num_splits_changes_memory_not_results():
    """``vae.maisi.num_splits`` (MONAI's per-convolution split; the released GPU config uses several) gives the
    same latents and reconstructions as no split, where MONAI can split; elsewhere a clear error instead of
    the wrongly shaped latents MONAI returns silently."""
    whole, _ = _codec(True, **{"maisi.tile": [32, 32, 32]})
    split, _ = _codec(True, **{"maisi.tile": [32, 32, 32], "maisi.num_splits": 2})
    split.module.load_state_dict(whole.module.state_dict())
    hu = torch.from_numpy(synthetic_ct((32, 32, 32), 3))[None, None]  # deepest level 8 = 2 pieces of 4
    latent = whole.encode_hu(hu)
    torch.testing.assert_close(split.encode_hu(hu), latent, rtol=0, atol=1e-5)
    torch.testing.assert_close(split.decode_hu(latent, (32, 32, 32)), whole.decode_hu(latent, (32, 32, 32)),
                               rtol=0, atol=1e-3)  # HU
    odd = torch.from_numpy(synthetic_ct((16, 20, 16), 3))[None, None]  # deepest 5 along H: 2 pieces do not fit
    with pytest.raises(ValueError, match=r"num_splits=2 cannot split .* num_splits in \[1\]"):
        split.encode_hu(odd)
    small, _ = _codec(True, **{"maisi.num_splits": 2})  # tile 16: deepest 4, pieces of 2
    with pytest.raises(ValueError, match="vae.maisi.tile"):
        small.decode_hu(latent, (32, 32, 32))


def test_loading_prints_no_install_accelerate_hint(tmp_path):
    """diffusers' "install accelerate" hint used to open the log of every stage that loads the SD VAE.
    A fresh interpreter: diffusers' log handler keeps the stderr it found at import, which pytest swaps."""
    codec, vae = _codec(False)
    files = save_weights(codec, tmp_path)
    write_manifest(tmp_path, codec, ".", files, {"origin": "scratch", "epochs": 0, "width": [8]},
                   runtime_settings(vae))
    script = ("import sys; from pathlib import Path; from ctdiff.models.vae.weights import load_vae; "
              "load_vae(Path(sys.argv[1])); print('loaded')")
    out = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "loaded" and "accelerate" not in out.stderr + out.stdout


# --------------------------------------------------------------------------------- MAISI conventions
FEET_FIRST_PRONE = (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, -1.0)  # i -> R, j -> A, k -> I (LPS columns)
OBLIQUE_PERMUTED = (0.0, 0.0, 1.0, 0.99, 0.141, 0.0, -0.141, 0.99, 0.0)  # i ~ S, j ~ L, k ~ P, slightly tilted


def _coordinate_volume(shape, direction):
    """(1, 3, D, H, W): each voxel's R, A and S coordinates (mm, the grid at unit spacing) on the channels."""
    d, h, w = shape
    k, j, i = np.meshgrid(np.arange(d), np.arange(h), np.arange(w), indexing="ij")
    lps = np.asarray(direction, float).reshape(3, 3) @ np.stack([i.ravel(), j.ravel(), k.ravel()]).astype(float)
    ras = np.diag([-1.0, -1.0, 1.0]) @ lps
    return torch.from_numpy(ras.reshape(3, *shape))[None]


@pytest.mark.parametrize("direction", [None, FEET_FIRST_PRONE, OBLIQUE_PERMUTED], ids=["hfs", "ffp", "oblique"])
def test_maisi_sees_each_volume_as_ras_xyz_and_the_layout_comes_back_bit_exact(direction):
    from ctdiff.models.vae.base import IDENTITY_DIRECTION
    from ctdiff.models.vae.maisi import RasOrientation

    shape = (4, 6, 8)
    volume = _coordinate_volume(shape, direction or IDENTITY_DIRECTION)
    orientation = RasOrientation.of(direction)
    ras = orientation.to_ras(volume)
    assert torch.equal(orientation.from_ras(ras), volume)
    # a step along axis a of the RAS array moves mostly along R, A, S (a = 0, 1, 2), and forward
    for axis in range(3):
        step = torch.diff(ras, dim=2 + axis).mean(dim=(2, 3, 4))[0]  # (3,) mm of R, A, S
        assert step[axis] > 0.9 and step.abs().argmax() == axis
    assert ras.shape[2:] == orientation.ras_shape(shape)

    # The codec hands the network exactly that array, and its latents come back in the caller's layout.
    codec, _ = _codec(True)
    seen = []
    encode = codec.module.encode
    codec.module.encode = lambda x: seen.append(x.clone()) or encode(x)
    hu = torch.from_numpy(synthetic_ct((8, 12, 16), 3))[None, None]
    latent = codec.encode_hu(hu, direction)
    assert torch.equal(seen[0], RasOrientation.of(direction).to_ras(codec.hu_to_x01(hu)))
    assert latent.shape[2:] == (2, 3, 4)  # (D, H, W) / 4, not the RAS array's order
    assert codec.decode_hu(latent, hu.shape[2:], direction).shape == hu.shape


def test_a_batch_of_mixed_orientations_runs_each_item_in_its_own():
    codec, _ = _codec(True)
    hu = torch.from_numpy(np.stack([synthetic_ct((8, 12, 16), s) for s in (4, 5)]))[:, None]
    together = codec.encode_hu(hu, [FEET_FIRST_PRONE, (1, 0, 0, 0, 1, 0, 0, 0, 1)])
    torch.testing.assert_close(together[0:1], codec.encode_hu(hu[0:1], FEET_FIRST_PRONE), rtol=0, atol=1e-6)
    torch.testing.assert_close(together[1:2], codec.encode_hu(hu[1:2]), rtol=0, atol=1e-6)
    assert not torch.allclose(codec.encode_hu(hu[0:1], FEET_FIRST_PRONE), codec.encode_hu(hu[0:1]))


def test_fp16_group_norms_never_reach_the_training_paths():
    """MAISI's norm_float16 (on wherever the codec runs on CUDA) made the fine-tuning paths crash in fp32:
    'Input type (c10::Half) and bias type (float) should be the same'. The codec turns it on only inside
    its own autocast inference; the training paths run with fp32 norms, whatever precision the caller uses."""
    from monai.apps.generation.maisi.networks.autoencoderkl_maisi import MaisiGroupNorm3D

    codec, vae = _codec(True)
    forced = MaisiCodec(codec.config, HU_RANGE, vae.maisi.tile, vae.maisi.overlap, norm_float16=True)
    norms = [m for m in forced.module.modules() if isinstance(m, MaisiGroupNorm3D)]
    x01 = forced.hu_to_x01(torch.from_numpy(synthetic_ct((8, 16, 16), 6))[None, None])
    assert not any(n.norm_float16 for n in norms)
    mean, std = forced.posterior_x01(x01)  # the train stage's "full" fine-tuning, fp32
    recon = forced.decode_x01(mean)  # decode_x01_train
    recon.float().abs().mean().backward()
    with forced.inference():
        assert all(n.norm_float16 for n in norms)
    assert not any(n.norm_float16 for n in norms)
    # What the fix prevents: fp16 norm outputs feeding fp32 convolutions outside an fp16 autocast.
    for n in norms:
        n.norm_float16 = True
    with pytest.raises(RuntimeError, match="Half"):
        forced.decode_x01(mean.detach())
