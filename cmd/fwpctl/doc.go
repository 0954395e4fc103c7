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
//	fwpctl fleet apply -f doc.yaml [--name N] --etcd-endpoints URL,...
//	fwpctl fleet delete NAME --etcd-endpoints URL,...
//	fwpctl fleet status [--local STATE-DIR/fleet-status.json] --etcd-endpoints URL,...
//
// The fleet commands talk to etcd, not fwpd (--etcd-endpoints or
// $FWP_ETCD_ENDPOINTS, --etcd-prefix, TLS with --etcd-cert, --etcd-key,
// --etcd-cacert); fleet apply refuses a document the hosts would refuse,
// before writing it.
//
// Every command takes --help and -o table|json. Exit codes: 0 ok, 1 failed,
// 2 usage, 3 access denied, 4 daemon unreachable.
package main
