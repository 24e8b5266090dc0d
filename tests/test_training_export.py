"""Export: the ONNX checker, dynamic batch, torch-vs-ORT parity, refusal of a drifting model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

import training.export
from service.bundle import DECODER, ENCODER, Tolerance
from service.preprocessing import InputSpec, list_image_files, load_image_file, stack
from training.config import FitConfig
from training.errors import ExportError
from training.export import PARITY_TOLERANCE, OnnxModel, OnnxOutputs, compare, export_model
from training.fit import build_bundle
from training.model import VAE, VAEConfig

pytestmark = pytest.mark.usefixtures("torch_one_thread")
SPEC = InputSpec(height=32, width=32)


def _real_inputs(demo_data: Path, count: int = 5) -> np.ndarray:
    files = list_image_files(demo_data / "test" / "good")[:count]
    return stack([load_image_file(p, SPEC) for p in files])


def _random_model(latent_channels: int = 0) -> VAE:
    torch.manual_seed(0)
    cfg = VAEConfig(
        image_size=32, latent_dim=8, width=8, max_width=16, latent_channels=latent_channels
    )
    return VAE(cfg).eval()


def test_bundle_graphs_pass_the_checker(trained_bundle: Path) -> None:
    for name, inputs, outputs in (
        (ENCODER, ["image"], ["mu", "logvar"]),
        (DECODER, ["z"], ["recon"]),
    ):
        model = onnx.load(str(trained_bundle / name))
        onnx.checker.check_model(model, full_check=True)
        assert [i.name for i in model.graph.input] == inputs
        assert [o.name for o in model.graph.output] == outputs
        batch_dim = model.graph.input[0].type.tensor_type.shape.dim[0]
        assert batch_dim.dim_param and not batch_dim.dim_value, "batch axis must be dynamic"


@pytest.mark.parametrize("latent_channels", [0, 4], ids=["vector", "spatial"])
def test_ort_matches_torch_on_real_inputs(
    demo_data: Path, tmp_path: Path, latent_channels: int
) -> None:
    model = _random_model(latent_channels)
    images = _real_inputs(demo_data)
    onnx_model, report = export_model(model, tmp_path, images)
    assert report.n_inputs == 5
    assert all(d <= 1e-3 for d in report.max_abs_diff.values())
    with torch.no_grad():
        mu, logvar = model.encoder(torch.from_numpy(images))
        recon = model.decoder(mu)
    for batch_size in (1, 2, 5):
        out = onnx_model.run(images, batch_size=batch_size)
        tol = PARITY_TOLERANCE
        np.testing.assert_allclose(out.mu, mu.numpy(), atol=tol.atol, rtol=tol.rtol)
        np.testing.assert_allclose(out.logvar, logvar.numpy(), atol=tol.atol, rtol=tol.rtol)
        np.testing.assert_allclose(out.recon, recon.numpy(), atol=tol.atol, rtol=tol.rtol)


def test_compare_refuses_outputs_beyond_tolerance() -> None:
    expected = {name: np.ones((2, 3), dtype=np.float32) for name in ("mu", "logvar", "recon")}
    close = OnnxOutputs(*(v + 1e-5 for v in expected.values()))
    assert compare(expected, close, Tolerance(1e-4, 0.0), n_inputs=2).max_abs_diff["mu"] < 2e-5
    far = OnnxOutputs(expected["mu"], expected["logvar"], expected["recon"] + 0.01)
    with pytest.raises(ExportError, match=r"recon differs from PyTorch by up to 0\.01"):
        compare(expected, far, Tolerance(1e-4, 1e-3), n_inputs=2)
    short = OnnxOutputs(expected["mu"][:1], expected["logvar"], expected["recon"])
    with pytest.raises(ExportError, match="shape"):
        compare(expected, short, Tolerance(1, 1), n_inputs=2)


def test_no_bundle_is_written_when_parity_fails(
    demo_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A tolerance nothing can meet stands in for an exporter that changed the model.
    monkeypatch.setattr(training.export, "PARITY_TOLERANCE", Tolerance(atol=-1.0, rtol=0.0))
    out = tmp_path / "bundle"
    with pytest.raises(ExportError, match="refusing to write the bundle"):
        build_bundle(
            _random_model(),
            _real_inputs(demo_data),
            SPEC,
            out,
            config=FitConfig(image_size=32, local_window=4, weights={"recon_error": 1.0}),
            facts={},
        )
    assert list(tmp_path.iterdir()) == [], "no bundle and no staging folder may remain"


def test_onnx_model_runs_any_batch_size(trained_bundle: Path) -> None:
    onnx_model = OnnxModel(trained_bundle / ENCODER, trained_bundle / DECODER)
    images = np.random.default_rng(0).random((3, 3, 32, 32), dtype=np.float32)
    whole = onnx_model.run(images, batch_size=3)
    single = onnx_model.run(images, batch_size=1)
    assert whole.recon.shape == (3, 3, 32, 32)
    np.testing.assert_allclose(single.recon, whole.recon, atol=1e-5)
