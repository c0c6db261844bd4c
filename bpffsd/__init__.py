"""bpffsd: the Linux BPF object model (maps, programs, bpffs pins) served from user space."""

__version__ = "0.1.0"
