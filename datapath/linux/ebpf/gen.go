package ebpf

//go:generate go tool bpf2go -cc clang-14 -strip llvm-strip -target bpfel -type layer_cfg -type filter_meta -type bitset -type bs_key -type addr_key -type int_key -type port_block -type redirect_cfg -type redirect_state -type tuple_key -type records -type config -type callout_flow -type flow_key -type callout_cfg -type host_run -type in_listen_key -type in_listener -type udp_reply_key -type udp_reply fwp bpf/fwp.c -- -O2 -g -Wall -I/usr/include/x86_64-linux-gnu
