// Package policy reads fwp's declarative policy files (YAML): providers,
// provider contexts, sublayers, callouts, filters and deletions, to be
// applied in one transaction. Every error says file:line:column and why.
//
//	lifetime: persistent          # default lifetime of the objects below
//	providers:
//	  - {key: acme, name: ACME}
//	provider_contexts:
//	  - {key: proxy-addr, provider: acme, data: "127.0.0.1:3128"}   # or data_hex: 0a0b
//	sublayers:
//	  - {key: acme-sub, provider: acme, weight: 100}
//	callouts:
//	  - {key: acme-redirect, layer: ALE_CONNECT_REDIRECT_V4, flags: [uses_provider_context]}
//	filters:
//	  - key: block-telnet
//	    layer: ALE_AUTH_CONNECT_V4
//	    sublayer: acme-sub
//	    weight: auto                # auto, index:N (0-15) or a number
//	    conditions:
//	      - {field: ip_remote_port, match: equal, value: 23}
//	      - {field: ip_remote_address, values: [10.0.0.0/8, 192.0.2.1]}   # a list: ORed
//	      - {field: ip_remote_address, values_file: drop.txt}             # one value a line
//	    action: block               # permit, callout_terminating, ...
//	    flags: [clear_action_right]
//	delete:
//	  - {kind: filter, key: old-rule}
//
// Deletions run first, then the objects in the order above.
//
// A list condition (values, or values_file: a file of one value per line,
// blank lines and what follows '#' or ';' ignored, as blocklists are
// published) is the filter with one condition per value, which WFP ORs.
// Parse never opens a file: ParseWith is given the values files' contents
// (Options.ValuesFiles), which a client reads (ValuesFileNames) and sends
// with the policy; an error in one names its file and line.
package policy
