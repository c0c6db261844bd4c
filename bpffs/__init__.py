"""bpffs: the Linux BPF object model (maps, programs, bpffs pins) in user space.

One import namespace over the design card's folders, so that no generic top-level module
("client", "vm") lands in site-packages:

    bpffs.daemon   -> bpffsd/    the trio daemon: store, control socket, FUSE bpffs, persistence
    bpffs.client   -> client/    the client library, the ELF loader and the `bpffs` CLI
    bpffs.vm       -> vm/        the eBPF VM and verifier; knows nothing of trio, sockets or FUSE
    bpffs.protocol               the control socket's wire format, owned by neither side
    bpffs.paths                  default socket, mount and state locations, for both sides

In a checkout, bpffs/daemon, bpffs/client and bpffs/vm are symlinks to those folders, so
`python3 -c 'import bpffs.daemon'` from the repository root works without an install; an
install (setup.py's package_dir) maps the same names to the same folders. The daemon imports
bpffs.protocol and bpffs.paths, never bpffs.client (tests/test_layout.py checks both).
"""
