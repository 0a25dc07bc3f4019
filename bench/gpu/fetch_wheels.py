"""Download the wheels the GPU machine lacks, for its Python 3.12 on x86-64, into ``bench/gpu/wheels/``.

The GPU machine has JAX, NumPy, SciPy, h5py, pandas, matplotlib, scikit-image, scikit-learn,
rich, absl-py, tqdm and PyYAML, but neither TensorFlow nor Keras, and no network. The kit
(``bench/gpu/kit.py``) runs on the JAX backend and needs only what is listed in ``WHEELS``:
Keras with the two dependencies that the machine lacks, and astropy and photutils (FITS cutouts
and the surface-brightness labels). Run this once on a machine with access to the package
index; the folder is ignored by git and travels to the GPU machine with the device call's
``carry``. Its total must stay well inside the 64 MiB a call can carry, together with the
repository's own files: about 18 MB.

    python bench/gpu/fetch_wheels.py
    python bench/gpu/fetch_wheels.py --dest /tmp/wheels --python-version 3.12
"""

import argparse
import pathlib
import subprocess
import sys

HERE = pathlib.Path(__file__).resolve().parent

#: Wheels to carry, pinned to the versions in requirements.txt (or the ones they install).
WHEELS = (
    "keras==3.15.1",
    "namex==0.1.0",
    "optree==0.20.0",
    "astropy==8.0.2",
    "pyerfa==2.0.1.5",
    "astropy-iers-data==0.2026.11.2.0.34.55",
    "photutils==3.0.0",
)

#: Platform tags of the GPU machine (x86-64 Linux, glibc >= 2.28).
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64", "any")

#: The largest total size the wheels may have, in bytes: the repository's tracked files
#: (about 37 MB) travel with them, and a device call carries at most 64 MiB.
MAX_TOTAL_BYTES = 24 * 2**20


def download_command(dest, python_version):
    """The ``pip download`` command for the wheels, binary only, without dependencies."""
    abi = "cp" + python_version.replace(".", "")
    command = [sys.executable, "-m", "pip", "download", "--quiet", "--only-binary=:all:", "--no-deps",
               "--python-version", python_version, "--implementation", "cp", "--abi", abi, "--abi", "abi3",
               "--abi", "none", "--dest", str(dest)]
    for platform in PLATFORMS:
        command += ["--platform", platform]
    return command + list(WHEELS)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dest", default=str(HERE / "wheels"), help="folder for the wheels (default bench/gpu/wheels)")
    parser.add_argument("--python-version", default="3.12", help="Python of the GPU machine (default 3.12)")
    args = parser.parse_args(argv)
    dest = pathlib.Path(args.dest)
    dest.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(download_command(dest, args.python_version), check=False)
    if result.returncode != 0:
        print(f"error: pip could not download the wheels into {dest} (exit {result.returncode})", file=sys.stderr)
        return 1
    wheels = sorted(dest.glob("*.whl"))
    total = sum(path.stat().st_size for path in wheels)
    for path in wheels:
        print(f"{path.stat().st_size / 1e6:7.2f} MB  {path.name}")
    print(f"{total / 1e6:7.2f} MB in {len(wheels)} wheels in {dest}")
    if total > MAX_TOTAL_BYTES:
        print(f"error: the wheels take {total / 2**20:.1f} MiB, more than the {MAX_TOTAL_BYTES / 2**20:.0f} MiB "
              "that fit beside the repository in one device call", file=sys.stderr)
        return 1
    print("carry it to the GPU machine with the device call: carry=[\"bench/gpu/wheels\"]")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
