package ebpf

//go:generate go tool bpf2go -cc clang-14 -strip llvm-strip -target bpfel -type reauth_flow -type flow_note -type flow_event fwpreauth bpf/reauth.c -- -O2 -g -Wall -I/usr/include/x86_64-linux-gnu
