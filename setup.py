"""Maps the design card's folders under the one import namespace `bpffs` (see bpffs/__init__.py).

bpffs/ holds the shared modules (protocol, paths); bpffsd/ -> bpffs.daemon, client/ ->
bpffs.client, vm/ -> bpffs.vm. In a checkout the same mapping is made by the symlinks in bpffs/.
"""

from setuptools import find_packages, setup

PACKAGE_DIRS = {"bpffs": "bpffs", "bpffs.daemon": "bpffsd", "bpffs.client": "client",
                "bpffs.vm": "vm"}

packages = ["bpffs"] + [
    f"{name}.{sub}" if sub else name
    for name, folder in PACKAGE_DIRS.items() if name != "bpffs"
    for sub in ["", *find_packages(folder)]
]

setup(packages=packages, package_dir=PACKAGE_DIRS)
