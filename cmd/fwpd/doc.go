// Command fwpd is fwp's daemon: the management plane (package mgmt) over
// one filter engine, served as gRPC on a unix socket, and the kernel
// datapath that enforces the policy on the system's own sockets.
//
//	fwpd [--socket PATH] [--state-dir DIR] [--admin-group G] [--metrics-addr ADDR]
//	     [--datapath kernel|none] [--cgroup PATH] [--keep-hooks-on-exit] [--bpffs-dir DIR]
//
// Root and members of --admin-group may change policy; everyone who can
// open the socket may read it. With --datapath kernel (the default) every
// commit is compiled into the eBPF maps before it takes effect, and a
// policy the kernel cannot enforce is refused. Proxies query redirects
// through the API and mark their outbound sockets through the side socket
// PATH.fd (SCM_RIGHTS). SIGTERM or SIGINT shut it down gracefully; the
// hooks go with it unless --keep-hooks-on-exit.
package main
