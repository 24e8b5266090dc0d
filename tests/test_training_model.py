"""The networks (training/model.py): a fully convolutional VAE, a defect head, export wrappers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from service.scoring import LatentGrid
from training.model import (
    COARSE_STRIDE,
    VAE,
    CoarseGraph,
    DefectHead,
    DefectHeads,
    FlatDecoder,
    FlatEncoder,
    ProbabilityHead,
    VAEConfig,
    cell_padding,
    downsample,
    pad_to_cells,
)

pytestmark = pytest.mark.usefixtures("torch_one_thread")


def _small(**changes: int) -> VAEConfig:
    options = {
        "width": 4,
        "max_width": 16,
        "latent_channels": 3,
        "head_width": 2,
        "coarse_factor": 0,
        **changes,
    }
    return VAEConfig(**options)


@pytest.mark.parametrize(
    ("height", "width", "channels", "stride"),
    [(32, 48, 3, 8), (48, 32, 1, 8), (32, 32, 3, 4), (64, 32, 1, 16), (16, 40, 3, 8)],
)
def test_any_input_size_keeps_its_shape(
    height: int, width: int, channels: int, stride: int
) -> None:
    cfg = _small(channels=channels, latent_stride=stride)
    model = VAE(cfg).eval()
    x = torch.rand(2, channels, height, width)
    with torch.no_grad():
        recon, mu, logvar = model(x)
        assert model.head is not None
        logits = model.head(x, recon)
    rows, columns = cfg.grid(height, width)
    assert (rows, columns) == (height // stride, width // stride)
    assert mu.shape == logvar.shape == (2, cfg.latent_channels, rows, columns)
    assert recon.shape == x.shape
    assert float(recon.min()) >= 0.0 and float(recon.max()) <= 1.0
    assert logits.shape == (2, cfg.head_count, height, width)


def test_grid_latent_size_and_size_multiple() -> None:
    cfg = VAEConfig(latent_channels=4, latent_stride=8, coarse_factor=0)
    assert cfg.grid(32, 48) == (4, 6)
    assert cfg.latent_size(32, 48) == 4 * 4 * 6
    assert cfg.levels == 3
    # The defect head halves the input three times: it needs multiples of 8 even at stride 4.
    assert VAEConfig(latent_stride=4, coarse_factor=0).size_multiple == 8
    assert VAEConfig(latent_stride=4, head_width=0, coarse_factor=0).size_multiple == 4
    assert VAEConfig(latent_stride=16, coarse_factor=0).size_multiple == 16
    # The coarse VAE's cells are 8 of its pixels, each the mean of factor x factor input pixels.
    assert VAEConfig().size_multiple == 32 and VAEConfig().crop_multiple == 8
    assert VAEConfig(coarse_factor=2).size_multiple == 16
    with pytest.raises(ValueError, match="multiple of 32"):
        VAEConfig().grid(32, 48)
    assert VAEConfig(width=8, max_width=16, latent_stride=16).level_widths() == [8, 16, 16, 16]
    for height, width in ((30, 48), (32, 44), (0, 32), (4, 8)):
        with pytest.raises(ValueError, match="multiple of 8"):
            cfg.grid(height, width)


def test_probability_head_of_one_head_is_its_sigmoid_in_the_unit_range() -> None:
    torch.manual_seed(0)
    model = VAE(_small(head_count=1)).eval()
    assert model.head is not None
    x, recon = torch.rand(3, 3, 16, 24), torch.rand(3, 3, 16, 24)
    with torch.no_grad():
        probability = ProbabilityHead(model.head)(x, recon)
        logits = model.head(x, recon)
    assert probability.shape == (3, 16, 24)
    torch.testing.assert_close(probability, torch.sigmoid(logits).squeeze(1))
    assert float(probability.min()) >= 0.0 and float(probability.max()) <= 1.0


def test_several_heads_start_apart_and_export_their_mean_probability() -> None:
    torch.manual_seed(0)
    model = VAE(_small(head_count=3)).eval()
    assert isinstance(model.head, DefectHeads) and len(model.head.members) == 3
    firsts = [next(member.parameters()) for member in model.head.members]
    assert not torch.equal(firsts[0], firsts[1]) and not torch.equal(firsts[1], firsts[2])
    x, recon = torch.rand(2, 3, 16, 24), torch.rand(2, 3, 16, 24)
    with torch.no_grad():
        logits = model.head(x, recon)
        probability = ProbabilityHead(model.head)(x, recon)
        each = [torch.sigmoid(member(x, recon))[:, 0] for member in model.head.members]
    assert logits.shape == (2, 3, 16, 24)
    torch.testing.assert_close(probability, torch.stack(each).mean(dim=0))


def test_one_head_is_the_plain_head_and_a_count_below_one_is_refused() -> None:
    assert isinstance(VAE(_small(head_count=1)).head, DefectHead)
    with pytest.raises(ValueError, match="head_count is 0"):
        _small(head_count=0)


def test_no_head_when_head_width_is_zero() -> None:
    assert VAE(_small(head_width=0)).head is None


def test_flat_decoder_of_flat_encoder_is_the_unflattened_path() -> None:
    torch.manual_seed(1)
    cfg = _small(latent_channels=3)
    model = VAE(cfg).eval()
    x = torch.rand(2, 3, 32, 48)
    grid = cfg.grid(32, 48)
    with torch.no_grad():
        mu, logvar = model.encoder(x)
        flat_mu, flat_logvar = FlatEncoder(model.encoder)(x)
        recon = FlatDecoder(model.decoder, cfg.latent_channels, grid)(flat_mu)
        expected = model.decoder(mu)
    assert flat_mu.shape == flat_logvar.shape == (2, cfg.latent_size(32, 48))
    assert torch.equal(recon, expected)
    assert torch.equal(flat_logvar, logvar.flatten(1))
    assert torch.equal(model(x)[0], expected)  # eval mode decodes the mean
    # The flat layout is the one the service reads: channel-major, then row, then column.
    cells = LatentGrid(cfg.latent_channels, *grid).cell_vectors(flat_mu.numpy())
    expected_cells = mu.numpy().reshape(2, cfg.latent_channels, -1).transpose(0, 2, 1)
    np.testing.assert_array_equal(cells, expected_cells)
    np.testing.assert_array_equal(cells[1, 1 * grid[1] + 4], mu[1, :, 1, 4].numpy())


def test_eval_mode_decodes_the_mean_train_mode_samples() -> None:
    model = VAE(_small()).eval()
    x = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        first, mu, _ = model(x)
        assert torch.equal(first, model.decoder(mu))
        model.train()
        torch.manual_seed(0)
        sampled, _, _ = model(x)
    assert not torch.allclose(sampled, first)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("channels", 2),
        ("width", 0),
        ("max_width", 0),
        ("latent_channels", 0),
        ("res_blocks", -1),
        ("head_width", -1),
        ("latent_stride", 3),
        ("latent_stride", 64),
    ],
)
def test_bad_model_config_names_the_field(field: str, value: int) -> None:
    with pytest.raises(ValueError, match=rf"{field}( is)? {value}\b"):
        VAEConfig(**{field: value})


def test_config_round_trips_through_its_dict() -> None:
    cfg = _small(latent_stride=16, res_blocks=2)
    assert VAEConfig(**cfg.to_dict()) == cfg


def test_the_coarse_vae_sees_the_whole_image_downsampled() -> None:
    torch.manual_seed(0)
    cfg = _small(coarse_factor=4, coarse_width=4)
    model = VAE(cfg).eval()
    assert model.coarse is not None and model.coarse.cfg == cfg.coarse()
    assert model.coarse.head is None and model.coarse.coarse is None
    assert cfg.coarse().latent_stride == COARSE_STRIDE and cfg.coarse().width == 4
    x = torch.rand(2, 3, 64, 96)
    with torch.no_grad():
        small, recon = CoarseGraph(model.coarse, 4, (64, 96))(x)
    np.testing.assert_allclose(
        small.numpy(), x.view(2, 3, 16, 4, 24, 4).mean(dim=(3, 5)).numpy(), rtol=1e-5, atol=1e-6
    )
    assert recon.shape == small.shape == (2, 3, 16, 24)
    # The local model's parameters do not include the coarse VAE's: they are trained apart.
    own = {id(p) for p in model.own_parameters()}
    assert own.isdisjoint(id(p) for p in model.coarse.parameters())
    assert len(own) + len(list(model.coarse.parameters())) == len(list(model.parameters()))
    with pytest.raises(ValueError, match="coarse_factor is 3"):
        VAEConfig(coarse_factor=3)


def test_a_coarse_cell_past_32_pixels_pads_its_input_instead_of_coarsening_the_input_size() -> None:
    # At factor 8 a coarse cell is 64 input pixels, but sides stay multiples of 32: a frame of
    # another shape keeps the sizes it had at factor 4.
    assert VAEConfig(coarse_factor=8).size_multiple == 32
    assert VAEConfig(coarse_factor=8).grid(160, 96) == (20, 12)
    torch.manual_seed(0)
    cfg = _small(coarse_factor=8, coarse_width=4)
    model = VAE(cfg).eval()
    assert model.coarse is not None
    x = torch.rand(2, 3, 160, 96)  # 20 x 12 at the coarse VAE's resolution: not whole cells
    small = downsample(x, 8)
    assert cell_padding(20, 12) == (4, 4)
    padded = pad_to_cells(small, (4, 4))
    assert padded.shape == (2, 3, 24, 16)
    # The padding repeats the last row and column; the image itself is left as it is.
    assert torch.equal(padded[..., :20, :12], small)
    assert torch.equal(padded[..., 20:, :12], small[..., 19:20, :].expand(2, 3, 4, 12))
    assert torch.equal(padded[..., :20, 12:], small[..., :, 11:12].expand(2, 3, 20, 4))
    with torch.no_grad():
        graph_small, recon = CoarseGraph(model.coarse, 8, (160, 96))(x)
        whole = model.coarse.decoder(model.coarse.encoder(padded)[0])
    assert torch.equal(graph_small, small)
    assert recon.shape == (2, 3, 20, 12)
    assert torch.equal(recon, whole[..., :20, :12])
    # Whole cells are not padded.
    assert cell_padding(16, 24) == (0, 0)
    cells = torch.rand(1, 3, 16, 24)
    assert pad_to_cells(cells, (0, 0)) is cells
    with pytest.raises(ValueError, match="no coarse VAE"):
        _small().coarse()
