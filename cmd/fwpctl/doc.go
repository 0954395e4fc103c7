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
//	fwpctl version
//	fwpctl completion bash|zsh
//	fwpctl help [COMMAND]
//	fwpctl fleet apply -f doc.yaml [--name N] --etcd-endpoints URL,...
//	fwpctl fleet delete NAME --etcd-endpoints URL,...
//	fwpctl fleet status [--local STATE-DIR/fleet-status.json] --etcd-endpoints URL,...
//
// The fleet commands talk to etcd, not fwpd (--etcd-endpoints or
// $FWP_ETCD_ENDPOINTS, --etcd-prefix, TLS with --etcd-cert, --etcd-key,
// --etcd-cacert); fleet apply refuses a document the hosts would refuse,
// before writing it.
//
// Every command takes --help and -o table|json (tables aligned, objects by
// key next to their IDs, times local; json stable for scripts). fwpctl
// help is the manual. Exit codes: 0 ok, 1 failed, 2 usage (also fwpctl
// with no arguments), 3 access denied, 4 daemon unreachable or gone during
// the command (events --follow and watch end so when fwpd stops; a write
// whose answer was lost says it cannot know whether it committed, and how
// to check). At fwpd's connection limit fwpctl says so.
package main
