"""bpffsd: the Linux BPF object model (maps, programs, bpffs pins) served from user space."""
