"""Loading clang-built BPF objects into bpffsd, client side (as libbpf and tc do): the ELF is
read here, maps are created or reused from their pins, relocations name the maps' fds, and the
daemon only sees MAP_CREATE, OBJ_GET/PIN and PROG_LOAD."""

from .elf import MapSpec, ObjectSpec, Pinning, ProgramSpec, read_object, type_of_section

__all__ = ["MapSpec", "ObjectSpec", "Pinning", "ProgramSpec", "read_object", "type_of_section"]
