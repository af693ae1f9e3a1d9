"""The VAE interface as training uses it, the latent cache and patch sampling, with small real codecs of both
families."""

import numpy as np
import pytest
import torch
from trainkit import SHAPE, smooth_field, tiny_params, write_vae
from vae_helpers import single_torch_thread, write_processed  # noqa: F401  (fixture)

from ctdiff.data.processed import split_cases
from ctdiff.models.denoiser import latent_patch_shape
from ctdiff.models.vae.weights import load_vae
from ctdiff.params import ParamsError
from ctdiff.training.latents import LatentCache, PatchSampler, cut_patch, epoch_order, rank_batches, recon_block

pytestmark = pytest.mark.usefixtures("single_torch_thread")


@pytest.fixture(params=[False, True], ids=["sd", "maisi"])
def setup(request, tmp_path):
    params = tiny_params(use_maisi=request.param)
    processed = write_processed(tmp_path / "processed", n_train=2, n_val=0, shape=SHAPE, target_hu=smooth_field,
                                source_slices=5)
    vae = load_vae(write_vae(tmp_path / "vae", params), "cpu")
    return params, vae, split_cases(processed, "train")


def test_posterior_mean_is_the_codecs_own_latent(setup):
    _, vae, cases = setup
    hu = torch.from_numpy(cases[0].load("target").astype(np.float32))[None, None]
    post = vae.encode_posterior_hu(hu)
    assert post.mean.shape == (1, *vae.latent_shape(hu.shape[2:]))
    torch.testing.assert_close(post.mean, vae.encode_hu(hu), rtol=1e-4, atol=1e-5)
    assert (post.std > 0).all()
    # the differentiable patch encoder used while fine-tuning agrees with the no-grad one
    patch = vae.posterior_x01(vae.hu_to_x01(hu))
    torch.testing.assert_close(patch.mean, post.mean, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(patch.std, post.std, rtol=1e-4, atol=1e-5)


def test_training_decode_is_the_codecs_decode_with_gradients_to_the_decoder(setup):
    _, vae, cases = setup
    hu = torch.from_numpy(cases[0].load("target")[:8].astype(np.float32))[None, None]
    post = vae.encode_posterior_hu(hu)
    assert vae.kl(post).ndim == 0 and vae.kl(post) >= 0
    vae.set_trainable("decoder")
    recon01 = vae.decode_x01(post.mean)
    assert recon01.shape == hu.shape and recon01.requires_grad
    torch.testing.assert_close(vae.x01_to_hu(recon01.detach()), vae.decode_hu(post.mean, hu.shape[2:]),
                               rtol=0, atol=0.01)  # HU; slice batches differ in float rounding only
    recon01.mean().backward()
    with_grad = {name for name, p in vae.module.named_parameters() if p.grad is not None}
    assert with_grad and all(name.startswith(("decoder.", "post_quant_conv.")) for name in with_grad)


def test_recon_block_is_a_random_block_of_the_patch_and_its_image_slices(setup):
    _, vae, cases = setup
    hu = torch.from_numpy(cases[0].load("target")[:16].astype(np.float32))[None, None]
    x01 = vae.hu_to_x01(hu)
    latent = vae.encode_posterior_hu(hu).mean
    fd, depth = vae.downsample[0], latent.shape[2]
    rng = np.random.default_rng(0)
    starts = set()
    for _ in range(20):
        block, image = recon_block(latent, x01, vae.downsample, 2, rng)
        assert block.shape[2] == 2 and image.shape[2] == 2 * fd
        start = next(a for a in range(depth - 1) if torch.equal(latent[:, :, a:a + 2], block))
        torch.testing.assert_close(image, x01[:, :, start * fd:(start + 2) * fd], rtol=0, atol=0)
        starts.add(start)
        # what the loss decodes: the block's own reconstruction, the same shape as its image slices
        assert vae.decode_x01(block).shape == image.shape
    assert len(starts) > 1  # random, not always the first slices
    whole, whole_image = recon_block(latent, x01, vae.downsample, 0, rng)
    assert whole is latent and whole_image is x01


def test_set_trainable_freezes_and_unfreezes_the_right_parts(setup):
    _, vae, _ = setup
    assert vae.set_trainable("none") == [] and not vae.module.training
    decoder = {id(p) for p in vae.set_trainable("decoder")}
    for name, p in vae.module.named_parameters():
        assert (id(p) in decoder) == name.startswith(("decoder.", "post_quant_conv."))
    assert len(vae.set_trainable("full")) == len(list(vae.module.parameters()))


def test_cache_on_disk_is_reused_and_keyed_by_vae_and_data(setup, tmp_path):
    _, vae, cases = setup
    cache_dir = tmp_path / "latents"
    (cache_dir / "stale").mkdir(parents=True)
    first = LatentCache.build(vae, cases, cache_dir, progress=False)
    folders = list(cache_dir.iterdir())
    assert len(folders) == 1 and len(list(folders[0].glob("*.pt"))) == len(cases)  # the stale one removed
    again = LatentCache.build(vae, cases, cache_dir, progress=False)
    for a, b in zip(first.cases, again.cases):
        torch.testing.assert_close(a.target.mean, b.target.mean, rtol=0, atol=0)
        torch.testing.assert_close(a.source.std, b.source.std, rtol=0, atol=0)
    # std of posterior samples, estimated by sampling, matches the closed form used for the scale factor
    torch.manual_seed(0)
    samples = torch.cat([c.target.sample().flatten() for c in first.cases for _ in range(20)])
    assert abs(float(samples.std()) / first.target_std() - 1) < 0.05


def test_patch_must_fit_vae_and_unet_and_the_error_names_the_param():
    assert latent_patch_shape([16, 64, 64], (4, 4, 4), 4, "maisi") == (4, 16, 16)
    assert latent_patch_shape([16, 64, 64], (1, 8, 8), 4, "sd") == (16, 8, 8)
    with pytest.raises(ParamsError, match=r"train\.patch \[8, 64, 64\].*\[16, 16, 16\].*try \[16, 64, 64\]"):
        latent_patch_shape([8, 64, 64], (4, 4, 4), 4, "maisi")


def test_cut_patch_edge_pads_numpy_and_torch():
    vol = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6)
    patch = cut_patch(vol, (2, 3, 4), (4, 4, 4))
    assert patch.shape == (4, 4, 4)
    np.testing.assert_array_equal(patch[:2, :2, :2], vol[2:, 3:, 4:])
    np.testing.assert_array_equal(patch[3, 3, 3], vol[3, 4, 5])  # edge replicated
    lat = torch.from_numpy(vol.astype(np.float32))[None].expand(2, -1, -1, -1)
    torch.testing.assert_close(cut_patch(lat, (2, 3, 4), (4, 4, 4)), torch.from_numpy(patch.astype(np.float32))
                               [None].expand(2, -1, -1, -1))


def test_source_and_target_patches_come_from_the_same_place():
    # a volume whose values encode their own coordinates: equal patches <=> equal places
    d, h, w = 12, 16, 16
    coords = (np.arange(d)[:, None, None] * 1000 + np.arange(h)[None, :, None] * 10 + np.arange(w)).astype(np.int16)
    sampler = PatchSampler((2, 2, 2), (2, 4, 4))
    rng = np.random.default_rng(0)
    volumes = [(coords, coords + 1)]
    src, tgt = sampler.image_batch(volumes, [0, 0, 0, 0], sampler.corners(volumes, [0, 0, 0, 0], rng))
    assert src.shape == (4, 1, 4, 8, 8)
    torch.testing.assert_close(tgt, src + 1)
    corners = src[:, 0, 0, 0, 0].long()
    assert ((corners // 1000) % 2 == 0).all() and ((corners // 10 % 100) % 4 == 0).all()  # on the latent grid
    assert len(set(corners.tolist())) > 1  # random places


def test_epoch_is_shared_out_over_ranks_like_a_distributed_sampler():
    order = epoch_order(n_cases=5, per_volume=3, seed=0, epoch=2)
    assert sorted(order.tolist()) == sorted(list(range(5)) * 3)
    assert not np.array_equal(order, epoch_order(5, 3, 0, 3))  # reshuffled each epoch
    per_rank = [list(rank_batches(order, batch_size=2, rank=r, world_size=2)) for r in range(2)]
    assert len(per_rank[0]) == len(per_rank[1]) == 4
    seen = [i for batches in per_rank for b in batches for i in b]
    assert set(seen) == set(range(5)) and len(seen) == 16  # everything, padded by wrapping
