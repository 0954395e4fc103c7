// Package policy reads fwp's declarative policy files (YAML): providers,
// provider contexts, sublayers, callouts, filters and deletions, to be
// applied in one transaction. Every error says file:line:column and why.
//
//	lifetime: persistent          # default lifetime of the objects below
//	# nodes: {hosts: [web-1], labels: {role: web}}   # fleet documents only (package fleet)
//	providers:
//	  - {key: example-vendor, name: Example Vendor}
//	provider_contexts:
//	  - {key: example-data, provider: example-vendor, data: "opaque bytes"}   # or data_hex: 0a0b
//	sublayers:
//	  - {key: example-sub, provider: example-vendor, weight: 100}
//	callouts:
//	  - {key: example.inspect, layer: ALE_AUTH_CONNECT_V4, flags: [uses_provider_context]}
//	filters:
//	  - key: example-block-telnet
//	    layer: ALE_AUTH_CONNECT_V4
//	    sublayer: example-sub
//	    weight: auto                # auto, index:N (0-15) or a number
//	    conditions:
//	      - {field: ip_remote_port, match: equal, value: 23}
//	      - {field: ip_remote_address, values: [10.0.0.0/8, 192.0.2.1]}   # a list: ORed
//	      - {field: ip_remote_address, values_file: drop.txt}             # one value a line
//	    action: block               # permit, callout_terminating, ...
//	    flags: [clear_action_right]
//	# delete:                     # deletions run first
//	#   - {kind: filter, key: old-rule}
//
// Deletions run first, then the objects in the order above. docs/policy.md
// is the reference of every attribute; examples/policies has ready files.
//
// A list condition (values, or values_file: a file of one value per line,
// blank lines and what follows '#' or ';' ignored, as blocklists are
// published) is the filter with one condition per value, which WFP ORs;
// an EQUAL list on an address or integer field is held as one condition
// whose value is an engine.List (a few bytes per value).
// Parse never opens a file: ParseWith is given the values files' contents
// (Options.ValuesFiles), which a client reads (ValuesFileNames) and sends
// with the policy; an error in one names its file and line.
package policy
