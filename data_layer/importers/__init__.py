"""Importers: turn a source into a dataset directory (docs/architecture.md, "Dataset on disk": images + manifest.csv).

Each `import_<kind>(source, out_dir, ...) -> out_dir` lists the source's images as manifest rows,
then writes them through `write_dataset`, which builds the dataset in a staging directory and
moves it into place only when complete. Files in a supported format are copied byte for byte;
arrays (MedMNIST, CIFAR10, SVHN) and the resized NIH images are written as deterministic PNGs.
Patient identifiers become salted hashes (`salt`, a secret kept out of git) before they reach
the manifest. Content checks are the validation gate's job; importers only refuse what they
cannot map (an unknown label, a file outside the source, a missing file).

`common` holds the shared plumbing, `local` the folder and CSV importers, `public` the paper's
datasets; callers pick one by name (`import_<kind>`) from this package.
"""

from data_layer.importers.common import DEFAULT_FRACTIONS, SourceUnavailableError, assign_splits
from data_layer.importers.local import import_csv, import_folder
from data_layer.importers.public import (
    MEDMNIST_URL,
    import_camelyon16,
    import_cifar10,
    import_medmnist,
    import_nih,
    import_svhn,
)

__all__ = [
    "DEFAULT_FRACTIONS", "MEDMNIST_URL", "SourceUnavailableError", "assign_splits", "import_camelyon16",
    "import_cifar10", "import_csv", "import_folder", "import_medmnist", "import_nih", "import_svhn",
]
