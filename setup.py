"""Maps the design card's folders under the one import namespace `bpffs`.

bpffsd/ -> bpffs.daemon, client/ -> bpffs.client, vm/ -> bpffs.vm, so that no generic
top-level module ("client", "vm") lands in site-packages. Subpackages are found on disk.
"""

from setuptools import find_packages, setup

PACKAGE_DIRS = {"bpffs.daemon": "bpffsd", "bpffs.client": "client", "bpffs.vm": "vm"}

packages = [
    f"{name}.{sub}" if sub else name
    for name, folder in PACKAGE_DIRS.items()
    for sub in ["", *find_packages(folder)]
]

setup(packages=packages, package_dir=PACKAGE_DIRS)
