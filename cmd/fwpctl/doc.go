// Command fwpctl is fwp's command-line client: it talks to fwpd over its
// unix socket (--socket, or $FWPD_SOCKET, default /run/fwp/fwpd.sock).
//
//	fwpctl layers
//	fwpctl provider|context|sublayer|callout|filter add|delete|list|show
//	fwpctl apply -f policy.yaml
//	fwpctl explain --layer L --remote ADDR:PORT [--local ADDR:PORT] [--proto tcp] [--app PATH] [--uid N]
//	fwpctl events [--follow] [--since N]
//	fwpctl sessions
//	fwpctl watch [--kind K]
//
// Every command takes --help and -o table|json. Exit codes: 0 ok, 1 failed,
// 2 usage, 3 access denied, 4 daemon unreachable.
package main
