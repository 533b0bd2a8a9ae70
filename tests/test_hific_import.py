"""`lic import hific-port`: the PyTorch port's files as our codec, against the port's own outputs.

The fixture (tests/fixtures/hific/README.md) holds a tiny port model with seeded random weights,
an input, what the port computed from it, and the key/shape list of a paper-size port model.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from src.cli import main as lic
from src.codecs.hific import (
    PORT_DROP,
    PORT_RULES,
    HificCodec,
    coding_buffers,
    port_codec_config,
)
from src.codecs.importing import fit_problems, import_weights, rename_state
from src.codecs.loading import load_codec
from src.errors import CheckpointError
from tests.helpers import fixture_path

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def port():
    """The fixture's input (in [0, 1]) and the port's outputs."""
    x = torch.load(fixture_path("hific", "input.pt"))["input"].float() / 255
    return x, torch.load(fixture_path("hific", "outputs.pt"))


def imported(tmp_path, **options) -> HificCodec:
    source = fixture_path("hific", "state_dict.pt")
    _, out = import_weights("hific-port", source, tmp_path / "port.ckpt", options=options)
    return load_codec(out)


def z_likelihood(codec: HificCodec, z_hat: torch.Tensor) -> torch.Tensor:
    """The factorized density's likelihood of given (already quantised) z values."""
    density = codec.entropy_bottleneck
    c = z_hat.shape[1]
    values = z_hat.transpose(0, 1).reshape(c, 1, -1)
    likelihood = density.likelihood_lower_bound(density._likelihood(values)[0])
    return likelihood.reshape(c, z_hat.shape[0], *z_hat.shape[2:]).transpose(0, 1)


@torch.no_grad()
def test_every_stage_matches_the_port(tmp_path, port):
    x, ref = port
    codec = imported(tmp_path)
    config = codec.config()
    assert config["signed_io"] and config["hyper_padding"] == "reflect"
    assert config["density_filters"] == [3, 3, 3] and config["density_final_factor"]
    y = codec._encode(x)
    torch.testing.assert_close(y, ref["y"], rtol=0, atol=1e-5)
    torch.testing.assert_close(codec.hyper_latent(y), ref["z"], rtol=0, atol=1e-5)
    # From the port's rounded z on: its means, scales, rounded y and likelihoods.
    means, scales = codec.hyper_parameters(ref["z_hat"], y.shape[-2:])
    torch.testing.assert_close(means, ref["means"], rtol=0, atol=1e-5)
    bounded = codec.gaussian_conditional.lower_bound_scale(scales)
    torch.testing.assert_close(bounded, ref["scales"], rtol=0, atol=1e-5)
    y_hat, y_lik = codec.gaussian_conditional(y, scales, means=means, training=False)
    torch.testing.assert_close(y_hat, ref["y_hat"], rtol=0, atol=1e-5)
    torch.testing.assert_close(y_lik, ref["y_likelihood_gaussian"], rtol=1e-5, atol=1e-8)
    z_lik = z_likelihood(codec, ref["z_hat"])
    torch.testing.assert_close(z_lik, ref["z_likelihood"], rtol=1e-5, atol=1e-8)
    # The port's rate: log(p + 1e-9) summed over y and z, per pixel.
    port_bits = sum(-torch.log(p + 1e-9).sum() / math.log(2) for p in (y_lik, z_lik))
    assert float(port_bits) / x[0, 0].numel() == pytest.approx(float(ref["q_bpp"]), rel=1e-5)
    # The reconstruction of its test-mode pass ([-1, 1] → tanh → [0, 1], clamped).
    x_hat = codec._decode(ref["y_hat"]).clamp(0, 1)
    torch.testing.assert_close(x_hat, ref["reconstruction"], rtol=0, atol=1e-5)


@torch.no_grad()
def test_logistic_latents_as_the_port_med_release(tmp_path, port):
    x, ref = port
    codec = imported(tmp_path, likelihood="logistic")
    means, scales = codec.hyper_parameters(ref["z_hat"], ref["y"].shape[-2:])
    _, y_lik = codec.gaussian_conditional(ref["y"], scales, means=means, training=False)
    torch.testing.assert_close(y_lik, ref["y_likelihood_logistic"], rtol=1e-5, atol=1e-8)
    assert not torch.allclose(y_lik, ref["y_likelihood_gaussian"])


@torch.no_grad()
def test_the_imported_codec_codes_for_real(tmp_path, port):
    x, _ = port
    codec = imported(tmp_path)
    decoded = codec.decompress_bytes(codec.compress_to_bytes(x))
    assert torch.equal(decoded, codec(x).x_hat.clamp(0, 1))
    # Quantiles found by bisection: the density's tails hold all but ~1e-9 of its mass.
    density = codec.entropy_bottleneck
    logits = density._logits_cumulative(density.quantiles, stop_gradient=True)
    torch.testing.assert_close(logits, density.target.expand_as(logits), rtol=0, atol=1e-3)


def test_every_paper_size_key_maps_onto_ours():
    shapes = {
        k: tuple(v)
        for k, v in json.loads(fixture_path("hific", "paper_keys.json").read_text()).items()
    }
    assert sum(k.startswith("Discriminator.") for k in shapes) > 0
    renamed = rename_state(shapes, PORT_RULES, drop=PORT_DROP)
    args = {"normalize_input_image": True, "likelihood_type": "gaussian"}
    config = port_codec_config(renamed, args)
    assert (config["N"], config["M"], config["hyper_channels"]) == (60, 220, 320)
    assert config["n_residual_blocks"] == 9
    codec = HificCodec(**config)
    # The importer adds only the quantiles (bisection) and the coding tables.
    computed = {"entropy_bottleneck.quantiles", *coding_buffers(codec)}
    filled = {**renamed, **{k: tuple(codec.state_dict()[k].shape) for k in computed}}
    assert fit_problems(codec, filled) == []
    assert not computed & set(renamed)


def test_bad_files_and_options_are_refused(tmp_path):
    source = tmp_path / "d_only.pt"
    torch.save({"model_state_dict": {"Discriminator.conv_out.bias": torch.zeros(1)}}, source)
    with pytest.raises(CheckpointError, match="not a HiFIC port state dict"):
        import_weights("hific-port", source, tmp_path / "o.ckpt")
    with pytest.raises(CheckpointError, match="takes the options"):
        import_weights(
            "hific-port",
            fixture_path("hific", "state_dict.pt"),
            tmp_path / "o.ckpt",
            options={"N": 3},
        )
    with pytest.raises(CheckpointError, match="nothing is downloaded.*Justin-Tan"):
        import_weights("hific-port", tmp_path / "hific_low.pt", tmp_path / "o.ckpt")


def test_cli_imports_a_port_file(tmp_path, capsys):
    out = tmp_path / "port.ckpt"
    assert lic(["import", "hific-port", str(fixture_path("hific", "state_dict.pt")), str(out)]) == 0
    assert "hific" in capsys.readouterr().out and out.is_file()


@pytest.mark.parametrize("hyper_padding", ["zeros", "reflect"])
def test_images_too_small_for_reflection_are_padded_up(hyper_padding):
    """The encoder's reflections need 32 px, the port's hyper-analysis 80: smaller images (a
    narrow last tile) are padded up to that and still code."""
    codec = HificCodec(N=4, M=8, hyper_channels=8, n_residual_blocks=1, hyper_padding=hyper_padding)
    codec.eval().prepare_for_coding()
    for size in ((64, 96), (2, 17), (80, 80)):
        x = torch.rand(1, 3, *size)
        assert codec(x).x_hat.shape == x.shape
        assert codec.decompress_bytes(codec.compress_to_bytes(x)).shape == x.shape
