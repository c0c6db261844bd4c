"""Unmodified BPF tools against bpffsd: bpf(2) through seccomp user notification.

`bpffs exec [--socket S] -- CMD ARGS...` runs CMD under a seccomp filter whose listener this
process (a bpffsd client) serves: every bpf() goes to bpffsd, and the few syscalls tools use to
accept our mount and fds (statfs, readlink and fdinfo of /proc/self/fd/N, mount -t bpf) are
answered as the kernel's bpffs would answer them. Modules, one concept each:

    abi         the ABI numbers (x86_64 syscalls, seccomp) not already in bpffs.vm.uapi
    filter      the classic-BPF program: which syscalls are sent to us
    notify      ctypes: install the filter, NOTIF_RECV / SEND / ID_VALID / ADDFD
    target      one caller: its memory (/proc/TID/mem), its fds (pidfd_getfd), its paths
    attr        union bpf_attr per command with the kernel's size rules; info structs; fdinfo
    context     what handlers share: outcomes (Reply / Inject / CONTINUE), the bpffsd client,
                our mounts, the caller's object fds
    handlers    one function per bpf command, and the dispatch of every intercepted syscall
    files       statfs, readlink and fdinfo of object fds, mount -t bpf: what tools check
    supervisor  fork + filter + exec, and the loop
    agent       the OCI seccomp agent: runc/crun hand it containers' listeners, each caller
                served over a bpffsd connection made with its own ids (`bpffsd
                --seccomp-agent PATH` runs it)

What a tool sees differently from the kernel (each deliberate; compared with bpftool 7.1,
libbpf 1.1 and cilium/ebpf 0.9.1 on Linux 6.18):
  * ids are bpffsd's own (1, 2, ...); memlock is whole pages; tags are the classic SHA-1
    ones (`r0 = 0; exit` is a04f5eef06a7f555; this 6.18 kernel says 59f4a931744dcdc6);
  * programs are never jited (`not jited`, jited_prog_len 0); xlated is the program as
    loaded, with map ids in map loads: helper calls show as bpf_map_lookup_elem#1 and context
    offsets are the __sk_buff ones, where the kernel shows its rewritten, inlined code;
  * run_time_ns / run_cnt are always counted (the kernel only with kernel.bpf_stats_enabled);
  * no BTF: BTF_LOAD is EINVAL, so libbpf and cilium/ebpf load without it; bpftool then
    prints hex dumps where the kernel's BTF formats values, no `btf_id`, no `; source` lines;
    and libbpf warns "Failed to bump RLIMIT_MEMLOCK" where setrlimit is refused (its memcg
    probe loads a cgroup_skb program, a type bpffsd does not have);
  * commands and types bpffsd lacks are the kernel's answer for a kernel without them
    (EINVAL: freeze, links, attach, BTF ids, iterators); batch commands are served, but
    never fail with ENOSPC for a full hash bucket, as the kernel's can;
  * object fds are sockets to processes outside the filter (`socket:[N]` in /proc/PID/fd,
    S_IFSOCK in fstat); inside, readlink and fdinfo show the kernel's text;
  * bpf() never reaches the kernel: kernel bpffs pins and kernel objects are not usable
    under `bpffs exec`; no_new_privs is set, so setuid programs run without privileges;
  * the supervisor acts with the credentials `bpffs exec` was started with (the daemon's
    rules apply to that user); a caller that has become another user or group since gets
    EPERM from bpf(). A root caller without the capabilities (effective, in our user
    namespace) that the kernel asks for a command gets EPERM (EACCES for a pin the mode bits
    close to it without CAP_DAC_OVERRIDE), though bpffsd would serve root: handlers.py's
    PRIVILEGED_COMMANDS; the verifier still applies root's bounds to its programs;
  * fdinfo is emulated for opens without O_CLOEXEC (fopen "r", as bpftool reads it); x86_64
    only; when CMD exits, descendants it left running lose the supervisor (their bpf() is
    ENOSYS from then on).
"""

from .supervisor import run

__all__ = ["run"]
