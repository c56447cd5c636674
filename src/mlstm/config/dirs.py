"""A sweep job's directory name: the overrides that made the job, with nothing in them that nests directories.

Hydra names a job's directory after its overrides (`hydra.job.override_dirname`, e.g. `cell=lstm,seed=1`). A value
with a path separator (`dataset.path=/data/x.txt`) would put the job several folders deep, under `dataset.path=`.
configs/train.yaml's `hydra.sweep.subdir` passes the name through the `flat_dir` resolver: every "/" becomes "%2F"
(as in a URL), so a job's directory is always one level under the sweep directory and names without "/" are left
exactly as Hydra makes them. A name longer than a file system allows (255 bytes) is cut to 200 bytes plus a hash of
the whole.
"""

import hashlib

from omegaconf import OmegaConf

SEPARATOR = "/"
ESCAPED = "%2F"
MAX_BYTES = 255  # NAME_MAX of common file systems (ext4, xfs, btrfs, tmpfs)


def flat_dir(name: str) -> str:
    """`dataset.path=/data/x.txt,seed=1` -> `dataset.path=%2Fdata%2Fx.txt,seed=1`; other names unchanged."""
    flat = str(name).replace(SEPARATOR, ESCAPED)
    encoded = flat.encode()
    if len(encoded) > MAX_BYTES:
        digest = hashlib.sha256(encoded).hexdigest()[:16]
        flat = encoded[:200].decode(errors="ignore") + "-" + digest
    return flat


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("flat_dir"):
        OmegaConf.register_new_resolver("flat_dir", flat_dir)
