// Command fwpd is fwp's daemon: the management plane (package mgmt) over
// one filter engine, served as gRPC on a unix socket.
//
//	fwpd [--socket PATH] [--state-dir DIR] [--admin-group G] [--metrics-addr ADDR]
//
// Root and members of --admin-group may change policy; everyone who can
// open the socket may read it. SIGTERM or SIGINT shut it down gracefully.
package main
