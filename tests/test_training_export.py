"""Export: the ONNX checker, dynamic batch, torch-vs-ORT parity, refusal of a drifting model."""

from __future__ import annotations

import warnings
from dataclasses import fields
from pathlib import Path

import numpy as np
import numpy.typing as npt
import onnx
import pytest
import torch

import training.export
from service.bundle import COARSE, DECODER, ENCODER, HEAD, Tolerance
from service.preprocessing import InputSpec, list_image_files, load_image_file, stack
from service.runtime import OnnxGraphs, output_differences
from service.scoring import ModelOutputs
from training.config import FitConfig
from training.errors import ExportError
from training.export import PARITY_TOLERANCE, export_model, torch_outputs
from training.fit import build_bundle
from training.model import VAE, DefectHeads, VAEConfig

pytestmark = pytest.mark.usefixtures("torch_one_thread")
SPEC = InputSpec(height=32, width=32)
F32Array = npt.NDArray[np.float32]


def _real_inputs(demo_data: Path, spec: InputSpec = SPEC, count: int = 5) -> F32Array:
    files = list_image_files(demo_data / "test" / "good")[:count]
    return stack([load_image_file(p, spec) for p in files])


def _random_model(head_width: int = 4, head_count: int = 1) -> VAE:
    torch.manual_seed(0)
    cfg = VAEConfig(
        width=8, max_width=16, latent_channels=4, head_width=head_width, head_count=head_count
    )
    return VAE(cfg).eval()


def test_bundle_graphs_pass_the_checker(trained_bundle: Path) -> None:
    for name, inputs, outputs in (
        (ENCODER, ["image"], ["mu", "logvar"]),
        (DECODER, ["z"], ["recon"]),
        (HEAD, ["image", "recon"], ["defect_map"]),
        (COARSE, ["image"], ["coarse_input", "coarse_recon"]),
    ):
        model = onnx.load(str(trained_bundle / name))
        onnx.checker.check_model(model, full_check=True)
        assert [i.name for i in model.graph.input] == inputs
        assert [o.name for o in model.graph.output] == outputs
        for tensor in (*model.graph.input, *model.graph.output):
            batch_dim = tensor.type.tensor_type.shape.dim[0]
            assert batch_dim.dim_param and not batch_dim.dim_value, "batch axis must be dynamic"


@pytest.mark.parametrize(
    "spec", [SPEC, InputSpec(height=32, width=64)], ids=["square", "non-square"]
)
def test_ort_matches_torch_on_real_inputs(demo_data: Path, tmp_path: Path, spec: InputSpec) -> None:
    model = _random_model()
    images = _real_inputs(demo_data, spec)
    expected = torch_outputs(model, images)
    graphs, report = export_model(model, tmp_path, images, threads=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([ENCODER, DECODER, HEAD, COARSE])
    assert report.n_inputs == 5 and report.tolerance == PARITY_TOLERANCE
    assert set(report.max_abs_diff) == {f.name for f in fields(ModelOutputs)}
    assert all(d <= 1e-3 for d in report.max_abs_diff.values())
    rows, columns = model.cfg.grid(spec.height, spec.width)
    assert expected.mu.shape == (5, model.cfg.latent_channels * rows * columns)
    assert expected.recon.shape == images.shape
    assert expected.defect_map.shape == (5, spec.height, spec.width)
    factor = model.cfg.coarse_factor
    coarse_shape = (5, 3, spec.height // factor, spec.width // factor)
    assert expected.coarse_input.shape == expected.coarse_recon.shape == coarse_shape
    tol = PARITY_TOLERANCE
    for batch_size in (1, 2, 5):
        out = graphs.run_in_batches(images, batch_size=batch_size)
        for f in fields(ModelOutputs):
            np.testing.assert_allclose(
                getattr(out, f.name),
                getattr(expected, f.name),
                atol=tol.atol,
                rtol=tol.rtol,
                err_msg=f.name,
            )


def test_parity_is_proved_on_at_most_parity_examples_images(
    demo_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(training.export, "PARITY_EXAMPLES", 3)
    images = _real_inputs(demo_data)
    assert images.shape[0] > 3
    _, report = export_model(_random_model(), tmp_path, images, threads=1)
    assert report.n_inputs == 3


def test_export_leaves_the_model_as_it_was(demo_data: Path, tmp_path: Path) -> None:
    model = _random_model()
    images = _real_inputs(demo_data)
    before = torch_outputs(model, images)
    weights = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    graphs, _ = export_model(model, tmp_path, images, threads=1)
    in_training_mode = [name for name, m in model.named_modules() if m.training]
    assert in_training_mode == [], "export must leave every module in eval mode"
    after = torch_outputs(model, images)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, weights[name]), name
    for f in fields(ModelOutputs):
        np.testing.assert_array_equal(getattr(after, f.name), getattr(before, f.name), f.name)
    np.testing.assert_allclose(graphs.run(images).mu, after.mu, atol=1e-4, rtol=1e-3)


def test_several_heads_export_one_graph_of_their_mean_probability(
    demo_data: Path, tmp_path: Path
) -> None:
    model = _random_model(head_count=2)
    images = _real_inputs(demo_data)
    graphs, _ = export_model(model, tmp_path, images, threads=1)
    head = onnx.load(str(tmp_path / HEAD))
    assert [o.name for o in head.graph.output] == ["defect_map"]
    x = torch.from_numpy(images)
    assert isinstance(model.head, DefectHeads)
    with torch.no_grad():
        recon = model.decoder(model.encoder(x)[0])
        each = [torch.sigmoid(member(x, recon))[:, 0] for member in model.head.members]
    mean = torch.stack(each).mean(dim=0).numpy()
    assert np.abs(each[0].numpy() - each[1].numpy()).max() > 1e-3  # two heads, two maps
    np.testing.assert_allclose(graphs.run(images).defect_map, mean, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("head_count", [1, 2])
def test_export_traces_without_warnings(demo_data: Path, tmp_path: Path, head_count: int) -> None:
    """No warning at all; a trace warning means a graph whose branches one input's shapes froze."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        export_model(
            _random_model(head_count=head_count), tmp_path, _real_inputs(demo_data), threads=1
        )


def test_torch_outputs_are_the_flat_inference_path(demo_data: Path) -> None:
    model = _random_model()
    images = _real_inputs(demo_data)
    out = torch_outputs(model, images, batch_size=2)
    with torch.no_grad():
        mu, logvar = model.encoder(torch.from_numpy(images))
        recon = model.decoder(mu)
        assert model.head is not None
        probability = torch.sigmoid(model.head(torch.from_numpy(images), recon))[:, 0]
    np.testing.assert_allclose(out.mu, mu.flatten(1).numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out.logvar, logvar.flatten(1).numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out.recon, recon.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out.defect_map, probability.numpy(), rtol=1e-5, atol=1e-6)
    assert model.coarse is not None
    with torch.no_grad():
        small = torch.nn.functional.avg_pool2d(torch.from_numpy(images), model.cfg.coarse_factor)
        # The coarse VAE reads whole cells of 8 pixels: the edge repeated, then cut off again.
        h, w = small.shape[-2:]
        whole = torch.nn.functional.pad(small, (0, -w % 8, 0, -h % 8), mode="replicate")
        coarse_recon = model.coarse.decoder(model.coarse.encoder(whole)[0])[..., :h, :w]
    np.testing.assert_allclose(out.coarse_input, small.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out.coarse_recon, coarse_recon.numpy(), rtol=1e-5, atol=1e-6)


def test_output_differences_refuse_outputs_beyond_tolerance() -> None:
    ones = np.ones((2, 3), dtype=np.float32)
    expected = ModelOutputs(*[ones] * 6)
    close = ModelOutputs(*[ones + 1e-5] * 6)
    assert output_differences(expected, close, Tolerance(1e-4, 0.0))["mu"] < 2e-5
    far = ModelOutputs(ones, ones, ones, ones, ones, ones + 0.01)
    with pytest.raises(ValueError, match=r"coarse_recon differs by up to 0\.01"):
        output_differences(expected, far, Tolerance(1e-4, 1e-3))
    short = ModelOutputs(ones[:1], *[ones] * 5)
    with pytest.raises(ValueError, match="mu has shape"):
        output_differences(expected, short, Tolerance(1, 1))


def test_no_bundle_is_written_when_parity_fails(
    demo_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A tolerance nothing can meet stands in for an exporter that changed the model.
    monkeypatch.setattr(training.export, "PARITY_TOLERANCE", Tolerance(atol=-1.0, rtol=0.0))
    out = tmp_path / "bundle"
    images = _real_inputs(demo_data)
    with pytest.raises(ExportError, match="refusing to write the bundle"):
        build_bundle(
            _random_model(),
            images,
            images,
            SPEC,
            out,
            config=FitConfig(image_size=32, local_window=4, weights={"recon_error": 1.0}),
            facts={},
        )
    assert list(tmp_path.iterdir()) == [], "no bundle and no staging folder may remain"


def test_a_model_without_a_defect_head_is_refused(demo_data: Path, tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="no defect head"):
        export_model(_random_model(head_width=0), tmp_path, _real_inputs(demo_data))
    assert list(tmp_path.iterdir()) == []


def test_a_model_without_a_coarse_vae_is_refused(demo_data: Path, tmp_path: Path) -> None:
    torch.manual_seed(0)
    cfg = VAEConfig(width=8, max_width=16, latent_channels=4, head_width=4, coarse_factor=0)
    with pytest.raises(ExportError, match="no coarse VAE"):
        export_model(VAE(cfg).eval(), tmp_path, _real_inputs(demo_data))
    assert list(tmp_path.iterdir()) == []


def test_onnx_graphs_run_any_batch_size(trained_bundle: Path) -> None:
    graphs = OnnxGraphs(
        *(trained_bundle / name for name in (ENCODER, DECODER, HEAD, COARSE)), device="cpu"
    )
    images = np.random.default_rng(0).random((3, 3, 32, 32), dtype=np.float32)
    whole = graphs.run_in_batches(images, batch_size=3)
    single = graphs.run_in_batches(images, batch_size=1)
    assert whole.recon.shape == (3, 3, 32, 32) and whole.defect_map.shape == (3, 32, 32)
    assert whole.mu.shape == (3, 32)
    for f in fields(ModelOutputs):
        np.testing.assert_allclose(getattr(single, f.name), getattr(whole, f.name), atol=1e-5)
    np.testing.assert_allclose(graphs.decode(whole.mu), whole.recon, atol=1e-6)
