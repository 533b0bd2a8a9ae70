"""`lic import`: the shared registry and checks, and CompressAI's zoo files as our checkpoints."""

from __future__ import annotations

import re

import pytest
import torch
from compressai.zoo.image import model_architectures, model_urls

from src.cli import main as lic
from src.codecs.compressai_zoo import CompressAICodec
from src.codecs.importing import fit_problems, get_format, import_weights, rename_state
from src.codecs.loading import load_codec
from src.errors import CheckpointError
from src.utils.checkpoints import load_weights

pytestmark = pytest.mark.usefixtures("one_thread")
TINY_WIDTHS = {"cheng2020-anchor": (8,), "cheng2020-attn": (8,)}


def zoo_style(
    state: dict[str, torch.Tensor], lists: str = "_{name}.{i}"
) -> dict[str, torch.Tensor]:
    """A CompressAI 1.2.8 state dict as older files store it: trained under DataParallel, the
    entropy bottleneck's parameter lists named as in the zoo's files (`_matrices.0`) or, with
    `lists="_{one}{i}"`, as CompressAI 1.1 names them (`_matrix0`)."""
    singular = {"matrices": "matrix", "biases": "bias", "factors": "factor"}

    def old_list(match: re.Match) -> str:
        name, i = match.group(1), match.group(2)
        return "." + lists.format(name=name, one=singular[name], i=i)

    lists_re = re.compile(r"\.(matrices|biases|factors)\.(\d+)$")
    return {f"module.{lists_re.sub(old_list, key)}": value for key, value in state.items()}


def compressai_model(arch: str, seed: int = 0):
    """CompressAI's own model at a tiny width, seeded, with its coding tables built."""
    torch.manual_seed(seed)
    net = model_architectures[arch](*TINY_WIDTHS.get(arch, (8, 12)))
    net.update(force=True)
    return net.eval()


@pytest.mark.parametrize("arch", list(model_urls))
def test_zoo_file_imports_to_byte_identical_streams(arch, tmp_path):
    net = compressai_model(arch)
    source = tmp_path / "weights.pth.tar"
    torch.save(zoo_style(net.state_dict()), source)
    _, out = import_weights("compressai", source, tmp_path / "out.ckpt", arch=arch, quality=2)
    codec = load_codec(out)
    codec.set_coding_options(coding_order="raster")  # CompressAI's own order, for byte parity
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    reference = [group[0] for group in net.compress(x)["strings"]]
    assert codec.compress(x).streams == reference
    assert torch.equal(
        codec.decompress_bytes(codec.compress_to_bytes(x)),
        net.decompress([[s] for s in reference], net.compress(x)["shape"])["x_hat"].clamp(0, 1),
    )


def test_compressai_1_1_key_names_import(tmp_path):
    net = compressai_model("mbt2018-mean")
    old = zoo_style(net.state_dict(), lists="_{one}{i}")
    assert "module.entropy_bottleneck._matrix0" in old
    torch.save(old, tmp_path / "w.pth.tar")
    codec, _ = import_weights(
        "compressai", tmp_path / "w.pth.tar", tmp_path / "o.ckpt", "mbt2018-mean", 1
    )
    assert torch.equal(codec.net.entropy_bottleneck.matrices[0], net.entropy_bottleneck.matrices[0])


def test_published_name_says_arch_and_quality(tmp_path):
    net = compressai_model("bmshj2018-hyperprior")
    source = tmp_path / "bmshj2018-hyperprior-ms-ssim-3-92dd7878.pth.tar"
    torch.save(net.state_dict(), source)
    codec, out = import_weights("compressai", source, tmp_path / "out.ckpt")
    assert (codec.arch, codec.quality) == ("bmshj2018-hyperprior", 3)
    assert (codec.config()["N"], codec.config()["M"]) == (8, 12)
    checkpoint = torch.load(out, weights_only=True)
    assert checkpoint["imported_from"]["source"] == source.name
    assert len(checkpoint["imported_from"]["sha256"]) == 64


def test_paper_width_keeps_the_quality_table(tmp_path):
    net = model_architectures["bmshj2018-factorized"](128, 192)  # quality 1's widths
    source = tmp_path / "bmshj2018-factorized-prior-1-446d5c7f.pth.tar"
    torch.save(net.state_dict(), source)
    codec, _ = import_weights("compressai", source, tmp_path / "out.ckpt")
    assert codec.config()["N"] is None and codec.config()["M"] is None


def test_wrong_architecture_is_refused_with_the_keys(tmp_path):
    source = tmp_path / "weights.pth.tar"
    torch.save(compressai_model("bmshj2018-factorized").state_dict(), source)
    with pytest.raises(
        CheckpointError, match="does not fit bmshj2018-hyperprior: .*not filled.*h_a"
    ):
        import_weights(
            "compressai", source, tmp_path / "o.ckpt", arch="bmshj2018-hyperprior", quality=1
        )


def test_missing_file_says_where_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(CheckpointError, match=r"nothing is downloaded.*compressai\.zoo") as err:
        import_weights("compressai", "bmshj2018-hyperprior-1-7eb97409.pth.tar", tmp_path / "o.ckpt")
    assert str(tmp_path / "torch" / "hub" / "checkpoints") in str(err.value)


def test_torch_hub_cache_is_searched(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    cache = tmp_path / "torch" / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.save(
        compressai_model("mbt2018-mean").state_dict(), cache / "mbt2018-mean-1-e522738d.pth.tar"
    )
    codec, _ = import_weights("compressai", "mbt2018-mean-1-e522738d.pth.tar", tmp_path / "o.ckpt")
    assert codec.arch == "mbt2018-mean"


def test_unknown_name_needs_arch_and_quality(tmp_path):
    source = tmp_path / "my_finetune.pth.tar"
    torch.save(compressai_model("mbt2018").state_dict(), source)
    with pytest.raises(CheckpointError, match="--arch ARCH --quality Q"):
        import_weights("compressai", source, tmp_path / "o.ckpt")


def test_unknown_format_lists_the_known_ones():
    with pytest.raises(CheckpointError, match="known formats: .*compressai"):
        get_format("nope")


def test_imported_checkpoint_warm_starts_a_recipe(tmp_path):
    """`ckpt=` takes an imported file: the recipe's codec gets exactly its weights."""
    from src.lightning_modules.rate_distortion import RateDistortion

    net = compressai_model("bmshj2018-hyperprior")
    source = tmp_path / "w.pth.tar"
    torch.save(net.state_dict(), source)
    _, out = import_weights(
        "compressai", source, tmp_path / "o.ckpt", arch="bmshj2018-hyperprior", quality=1
    )
    codec = CompressAICodec("bmshj2018-hyperprior", 1, N=8, M=12)
    recipe = RateDistortion(codec=codec, lmbda=0.01, optimizer=torch.optim.Adam)
    load_weights(recipe, out)
    assert torch.equal(recipe.codec.net.g_a[0].weight, net.g_a[0].weight)


def test_cli_import_then_compress(tmp_path, sample_root, capsys):
    source = tmp_path / "w.pth.tar"
    torch.save(compressai_model("bmshj2018-factorized").state_dict(), source)
    out = tmp_path / "o.ckpt"
    assert (
        lic(
            [
                "import",
                "compressai",
                str(source),
                str(out),
                "--arch",
                "bmshj2018-factorized",
                "--quality",
                "1",
            ]
        )
        == 0
    )
    assert "parameters" in capsys.readouterr().out
    photo = next((sample_root / "val").iterdir())
    assert lic(["compress", "--ckpt", str(out), str(photo), str(tmp_path / "p.lic")]) == 0
    assert (
        lic(["decompress", "--ckpt", str(out), str(tmp_path / "p.lic"), str(tmp_path / "p.png")])
        == 0
    )


def test_rename_and_fit_report_every_difference():
    codec = CompressAICodec("bmshj2018-factorized", 1, N=8, M=12)
    state = rename_state(codec.net.state_dict(), [(r"^", "net.")])
    assert fit_problems(codec, state) == []
    shapes = {k: tuple(v.shape) for k, v in state.items()}  # a key/shape list works the same
    assert fit_problems(codec, shapes) == []
    shapes["net.g_a.0.weight"] = (9, 3, 5, 5)
    shapes["net.extra"] = (1,)
    del shapes["net.g_s.0.weight"]
    problems = " ".join(fit_problems(codec, shapes))
    assert "net.g_s.0.weight" in problems and "net.extra" in problems and "(9, 3, 5, 5)" in problems
    with pytest.raises(CheckpointError, match="two source keys"):
        rename_state({"a.x": 1, "b.x": 2}, [(r"^[ab]\.", "")])
    assert rename_state({"a": 1, "num_batches": 2}, [], drop=["num_.*"]) == {"a": 1}
